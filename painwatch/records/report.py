"""Printable reports (PDF, fpdf2): one check, or an animal's whole record.

Every report states the limits of use first (the answers support, never replace, the veterinarian's
judgement; the model card's limits; a warning when the model was trained on synthetic frames), then the
answers: the latest verdict, the time course over the checks (share of pain frames and mean confidence
per check on a date axis, refused frames marked), the checks, the models that answered with their gate
verdicts, and every frame's answer with its certified radius (an L2 norm in [0, 1] pixel units at the
model's input size, and in grey levels; docs/design.md, "Units and conventions") and, when kept, its
thumbnail. Text is set in DejaVu Sans, shipped with matplotlib, so that any animal ID or note prints.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, tzinfo
from pathlib import Path

import matplotlib
import matplotlib.dates as mdates
from fpdf import FPDF
from fpdf.fonts import FontFace
from matplotlib.figure import Figure

from painwatch import __version__
from painwatch.records.history import (
    format_time,
    frame_status,
    gate_summary,
    gate_words,
    limits_of_use,
    local_time,
    verdict_words,
    zone_name,
)
from painwatch.records.service import CheckSummary, FrameRecord

FONT_FOLDER = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
FONT = "DejaVu"
THUMBNAILS_PER_ROW = 6
HEADING = FontFace(emphasis="BOLD", fill_color=(225, 235, 240))


class _Report(FPDF):
    def __init__(self, title: str) -> None:
        super().__init__(orientation="portrait", unit="mm", format="A4")
        self.add_font(FONT, "", str(FONT_FOLDER / "DejaVuSans.ttf"))
        self.add_font(FONT, "B", str(FONT_FOLDER / "DejaVuSans-Bold.ttf"))
        self.add_font(FONT, "I", str(FONT_FOLDER / "DejaVuSans-Oblique.ttf"))
        self.set_title(title)
        self.set_creator(f"painwatch {__version__}")
        self.set_auto_page_break(auto=True, margin=15)
        self.set_margins(15, 15, 15)
        self.report_title = title
        self.add_page()

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font(FONT, "I", 8)
        self.set_text_color(110, 110, 110)
        self.cell(0, 5, f"{self.report_title} - page {self.page_no()}/{{nb}}", align="C")
        self.set_text_color(0, 0, 0)

    def heading(self, text: str, size: float = 13) -> None:
        if self.get_y() > self.h - self.b_margin - 35:  # keep a heading with what follows it
            self.add_page()
        self.ln(2)
        self.set_font(FONT, "B", size)
        self.multi_cell(0, size * 0.5, text, new_x="LMARGIN", new_y="NEXT")
        self.ln(1)
        self.set_font(FONT, "", 9.5)

    def paragraph(self, text: str, *, style: str = "", size: float = 9.5) -> None:
        self.set_font(FONT, style, size)
        self.multi_cell(0, size * 0.5, text, align="L", new_x="LMARGIN", new_y="NEXT")
        self.set_font(FONT, "", 9.5)

    def limits_box(self, lines: Sequence[str]) -> None:
        self.set_fill_color(253, 243, 224)
        self.set_font(FONT, "B", 10)
        self.multi_cell(0, 5.5, "Limits of use", fill=True, new_x="LMARGIN", new_y="NEXT")
        self.set_font(FONT, "", 9)
        for line in lines:
            self.multi_cell(0, 4.6, f"- {line}", fill=True, align="L", new_x="LMARGIN", new_y="NEXT")
        self.set_fill_color(255, 255, 255)
        self.ln(2)

    def rows(self, headings: Sequence[str], rows: Sequence[Sequence[str]], widths: Sequence[float],
             size: float = 8) -> None:
        self.set_font(FONT, "", size)
        with self.table(col_widths=tuple(widths), headings_style=HEADING, line_height=size * 0.55,
                        text_align="LEFT", padding=0.8, repeat_headings=1) as table:
            for values in [headings, *rows]:
                row = table.row()
                for value in values:
                    row.cell(str(value))
        self.set_font(FONT, "", 9.5)
        self.ln(2)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def time_course_png(checks: Sequence[CheckSummary], zone: tzinfo | None = None) -> bytes:
    """The time course of an animal's checks as a PNG: per check on a date axis, the share of pain among
    the answered frames, the mean confidence, and the share of refused frames (grey bars)."""
    times = [local_time(c.created_at, zone).replace(tzinfo=None) for c in checks]
    # A Figure without pyplot: no global state, safe in the page's server threads.
    figure = Figure(figsize=(7.2, 2.8), dpi=150)
    axis = figure.subplots()
    refused = [c.abstained / c.frames if c.frames else 0.0 for c in checks]
    if len(times) > 1:
        span = (max(times) - min(times)).total_seconds() / 86400
        width = max(span / (4 * len(times)), 1 / 96)
    else:
        width = 1 / 24
    axis.bar(times, refused, width=width, color="#bbbbbb", label="refused frames (share)", zorder=1)
    shares = [c.pain_share for c in checks]
    points = [(t, s) for t, s in zip(times, shares, strict=True) if s is not None]
    if points:
        axis.plot(*zip(*points, strict=True), marker="o", color="#b03030",
                  label="pain frames (share of answered)", zorder=3)
    confidences = [(t, c.mean_confidence) for t, c in zip(times, checks, strict=True)
                   if c.mean_confidence is not None]
    if confidences:
        axis.plot(*zip(*confidences, strict=True), marker="s", linestyle="--", color="#1f6f8b",
                  label="mean confidence", zorder=2)
    axis.axhline(0.5, color="#888888", linewidth=0.8, linestyle=":")
    axis.set_ylim(0, 1.02)
    axis.set_ylabel("share / confidence")
    axis.set_xlabel(f"check time ({zone_name(zone)})")
    locator = mdates.AutoDateLocator()
    axis.xaxis.set_major_locator(locator)
    axis.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=3, fontsize=7, frameon=False)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _models(pdf: _Report, checks: Sequence[CheckSummary]) -> None:
    seen: dict[str, CheckSummary] = {}
    for check in checks:
        seen.setdefault(check.model.weights_sha256, check)
    pdf.heading("The model(s) that answered", 11)
    for sha, check in seen.items():
        model, cert = check.model, check.model.certification
        pdf.paragraph(
            f"{model.architecture}, weights SHA-256 {sha}, from {model.bundle_path}. Certified with "
            f"{cert.get('method')}, noise sigma {cert.get('sigma')} per pixel (pixels 0-1), error "
            f"probability alpha {cert.get('alpha')}, at most {cert.get('n')} noise draws per frame.",
            size=8.5)
        for line in gate_words(model.model_card):
            pdf.paragraph(f"Certification gate {line}.", style="B" if "FAILED" in line else "", size=8.5)
        pdf.ln(1)


def _frames(pdf: _Report, check: CheckSummary, frames: Sequence[FrameRecord]) -> None:
    rows = []
    for record in frames:
        result = record.result
        answered = result.class_index >= 0
        rows.append([
            result.name,
            "" if result.time_s is None else f"{result.time_s:.2f}",
            result.label if answered else "abstain",
            _number(result.confidence) if answered else "-",
            f"{result.radius:.4f}",
            f"{result.radius_grey_levels:.2f}",
            frame_status(record),
        ])
    pdf.rows(["frame", "time (s)", "answer", "confidence", "radius (L2)", "grey levels", "status"], rows,
             (46, 15, 16, 19, 18, 15, 51), size=7.5)
    thumbnails = [r for r in frames if r.thumbnail]
    if not thumbnails:
        kept = check.frames_kept != "none"
        pdf.paragraph("No thumbnails." if kept else "The frames are not kept (the clinic's setting).",
                      style="I", size=8)
        return
    side = (pdf.epw - (THUMBNAILS_PER_ROW - 1) * 2) / THUMBNAILS_PER_ROW
    for start in range(0, len(thumbnails), THUMBNAILS_PER_ROW):
        if pdf.get_y() + side + 8 > pdf.h - pdf.b_margin:
            pdf.add_page()
        top = pdf.get_y()
        for column, record in enumerate(thumbnails[start:start + THUMBNAILS_PER_ROW]):
            x = pdf.l_margin + column * (side + 2)
            pdf.image(io.BytesIO(record.thumbnail), x=x, y=top, w=side, h=side, keep_aspect_ratio=True)
            pdf.set_xy(x, top + side + 0.5)
            pdf.set_font(FONT, "", 6)
            label = record.result.label if record.result.class_index >= 0 else "abstain"
            pdf.cell(side, 3, f"{record.position + 1}: {label}", align="C")
        pdf.set_xy(pdf.l_margin, top + side + 5)
    pdf.set_font(FONT, "", 9.5)


def _check_section(pdf: _Report, check: CheckSummary, frames: Sequence[FrameRecord],
                   zone: tzinfo | None) -> None:
    by = f" by {check.recorded_by}" if check.recorded_by else ""
    pdf.heading(f"Check of {format_time(check.created_at, zone)} ({zone_name(zone)}){by}", 11)
    if check.notes:
        pdf.paragraph(f"Notes: {check.notes}", style="I")
    pdf.paragraph(
        f"Verdict: {verdict_words(check)}. Mean confidence {_number(check.mean_confidence)} over the "
        f"answered frames; {check.certified} of {check.frames} frame(s) robust to small pixel changes "
        "(robust is not the same as correct). Model "
        f"{check.model.architecture} {check.model.weights_sha256[:16]}, gate {gate_summary(check)}.")
    for problem in check.problems:
        pdf.paragraph(f"Not analysed: {problem.get('file')}: {problem.get('problem')}", size=8)
    _frames(pdf, check, frames)


def _radius_note(pdf: _Report) -> None:
    pdf.paragraph(
        "The certified radius is the L2 size of pixel noise (pixels from 0 to 1, at the model's input size) "
        "that provably cannot change the answer of the classifier the certificate is about; the grey-level "
        "column spreads it evenly over all pixels (of 255). A sampled certificate is wrong with probability "
        "at most alpha. A radius of 0 means no guarantee; refused frames got no answer.", size=8)


def check_report_pdf(
    check: CheckSummary,
    frames: Sequence[FrameRecord],
    *,
    zone: tzinfo | None = None,
    generated_at: datetime | None = None,
) -> bytes:
    """A PDF of one check: limits of use, verdict, the model and its gate verdicts, every frame's answer.

    Times are shown in ``zone`` (UTC when None).
    """
    stamp = generated_at or datetime.now(UTC)
    pdf = _Report(f"painwatch: pain check of {check.animal}, {format_time(check.created_at, zone)}")
    pdf.heading(pdf.report_title, 15)
    pdf.paragraph(f"Animal {check.animal}. Printed {format_time(stamp, zone)} ({zone_name(zone)}) by "
                  f"painwatch {__version__}; check #{check.check_id} ({check.uid}).", size=8.5)
    pdf.ln(2)
    pdf.limits_box(limits_of_use([check]))
    _check_section(pdf, check, frames, zone)
    _radius_note(pdf)
    _models(pdf, [check])
    return bytes(pdf.output())


def animal_report_pdf(
    animal: str,
    checks: Sequence[CheckSummary],
    frames: Mapping[int, Sequence[FrameRecord]],
    *,
    zone: tzinfo | None = None,
    generated_at: datetime | None = None,
) -> bytes:
    """A PDF of an animal's record: limits of use, the latest verdict, the time course, the checks, the
    models and their gate verdicts, and every check's frames (``frames[check_id]``), oldest first.

    Raises ``ValueError`` when ``checks`` is empty: an animal without checks has nothing to print.
    """
    if not checks:
        raise ValueError(f"the animal {animal!r} has no checks: there is nothing to print")
    stamp = generated_at or datetime.now(UTC)
    pdf = _Report(f"painwatch: pain checks of {animal}")
    pdf.heading(pdf.report_title, 15)
    first, latest = checks[0], checks[-1]
    pdf.paragraph(
        f"{len(checks)} check(s) from {format_time(first.created_at, zone)} to "
        f"{format_time(latest.created_at, zone)} ({zone_name(zone)}). Printed {format_time(stamp, zone)} by "
        f"painwatch {__version__}.", size=8.5)
    pdf.ln(2)
    pdf.limits_box(limits_of_use(checks))
    pdf.heading("Latest verdict", 11)
    pdf.paragraph(f"{format_time(latest.created_at, zone)}: {verdict_words(latest)}; mean confidence "
                  f"{_number(latest.mean_confidence)}." + (f" Notes: {latest.notes}" if latest.notes else ""))
    pdf.heading("Time course", 11)
    pdf.image(io.BytesIO(time_course_png(checks, zone)), w=pdf.epw)
    pdf.heading("Checks", 11)
    rows = [[format_time(c.created_at, zone), c.recorded_by or "-", str(c.frames), _percent(c.pain_share),
             _number(c.mean_confidence), str(c.abstained), str(c.certified), gate_summary(c), c.notes or ""]
            for c in checks]
    pdf.rows(["time", "by", "frames", "pain", "mean conf.", "refused", "robust", "gate", "notes"], rows,
             (26, 18, 14, 12, 16, 15, 14, 14, 51))
    _radius_note(pdf)
    _models(pdf, checks)
    for check in checks:
        _check_section(pdf, check, frames.get(check.check_id, ()), zone)
    return bytes(pdf.output())


__all__ = ["animal_report_pdf", "check_report_pdf", "time_course_png"]
