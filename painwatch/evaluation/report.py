"""Reports: markdown + self-contained HTML with PNG figures beside them, all written atomically.

Reusable pieces (the LOIO report here, the certification report in ``painwatch.certify``); files are
written with :mod:`painwatch.io` (a reader sees the old file or the complete new one, never a partial
one, even if the process dies mid-write):

- :func:`new_figure` / :func:`save_figure`: matplotlib figures built with the object-oriented API
  (``matplotlib.figure.Figure``, rendered by Agg): no pyplot global state, no display, safe in threads
  (Streamlit), and importing this module does not import matplotlib (``painwatch --help`` stays fast).
- :class:`Report`: headings, paragraphs, tables and images rendered to markdown and to HTML (inline
  CSS, every text and cell HTML-escaped, images referenced by file name so the folder is portable).
- Plots: confusion matrix, ROC curve, reliability diagram,
  per-individual bar chart.
- :func:`write_loio_report`: the leave-one-individual-out report from :func:`painwatch.metrics.evaluate`.
"""

from __future__ import annotations

import html
import io
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from painwatch.io import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The published study's leave-one-individual-out figures (fine-tuned ResNet50, 21 Japanese macaques,
#: contour-cropped faces). Shown beside ours in every LOIO report.
PUBLISHED_REFERENCE: dict[str, Any] = {
    "accuracy": 0.64,
    "precision_pain": 0.61,
    "recall_pain": 0.69,
    "individuals": 21,
    "description": "fine-tuned ResNet50, leave-one-individual-out, 21 Japanese macaques",
}

#: The note every report on synthetic frames (:func:`painwatch.data.is_synthetic`) carries first.
SYNTHETIC_NOTE = (
    "These frames are SYNTHETIC (painwatch demo data): the numbers show that the pipeline works, "
    "not how well pain is detected in real macaques."
)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (4.5, 4.0), **kwargs: Any):
    """A ``(Figure, axes)`` pair like ``pyplot.subplots`` but without pyplot (no global figure registry,
    no backend switch); ``kwargs`` go to ``Figure.subplots``."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    return figure, figure.subplots(nrows, ncols, **kwargs)


def save_figure(figure: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Save ``figure`` as PNG at ``path`` atomically (Agg renderer) and release it. Returns the path.

    Accepts figures from :func:`new_figure` or from ``pyplot`` (those are closed in pyplot too).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    try:
        if type(figure.canvas).__name__ == "FigureCanvasBase":  # a pyplot-free figure: render with Agg
            FigureCanvasAgg(figure)
        figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------
# Tables and documents
# ----------------------------------------------------------------------------------------------
def format_value(value: Any, digits: int = 3) -> str:
    """Human format of a table cell: ``None``/NaN -> an em dash, floats with ``digits`` decimals."""
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "—" if not math.isfinite(value) else f"{float(value):.{digits}f}"
    return str(value)


def format_percent(value: float | None, digits: int = 1) -> str:
    """``0.6412`` -> ``"64.1%"``; ``None`` -> an em dash."""
    if value is None or not math.isfinite(value):
        return "—"
    return f"{100.0 * value:.{digits}f}%"


def _table_columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def _cell(row: Mapping[str, Any], column: str, digits: int) -> str:
    return format_value(row.get(column), digits)


def table_to_markdown(
    rows: Sequence[Mapping[str, Any]],
    *,
    columns: Sequence[str] | None = None,
    headers: Sequence[str] | None = None,
    digits: int = 3,
) -> str:
    """A GitHub-flavoured markdown table; ``|`` and newlines inside cells are escaped."""
    columns = _table_columns(rows, columns)
    headers = list(headers) if headers is not None else columns
    if len(headers) != len(columns):
        raise ValueError(f"headers has {len(headers)} entries but there are {len(columns)} columns")

    def escape(text: str) -> str:
        # Cells are data, not markup: keep pipes, raw HTML and newlines from changing the table.
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(escape(h) for h in headers) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(escape(_cell(row, c, digits)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def table_to_html(
    rows: Sequence[Mapping[str, Any]],
    *,
    columns: Sequence[str] | None = None,
    headers: Sequence[str] | None = None,
    digits: int = 3,
    caption: str | None = None,
) -> str:
    """An HTML ``<table>``; every header, cell and the caption are HTML-escaped."""
    columns = _table_columns(rows, columns)
    headers = list(headers) if headers is not None else columns
    if len(headers) != len(columns):
        raise ValueError(f"headers has {len(headers)} entries but there are {len(columns)} columns")
    parts = ["<table>"]
    if caption:
        parts.append(f"<caption>{html.escape(caption)}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr></thead>")
    parts.append("<tbody>")
    for row in rows:
        parts.append(
            "<tr>" + "".join(f"<td>{html.escape(_cell(row, c, digits))}</td>" for c in columns) + "</tr>"
        )
    parts.append("</tbody></table>")
    return "\n".join(parts)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 60em;
       color: #1d1d1f; line-height: 1.45; padding: 0 1em; }
h1 { border-bottom: 2px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3em; }
figure { margin: 1em 0; }
figcaption { font-size: .9em; color: #555; }
img { max-width: 100%; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .5em 1em; }
"""


@dataclass
class Report:
    """A document built from blocks, rendered to markdown and to self-contained HTML.

    Images are referenced by file name relative to the report, so keep the PNGs beside it.
    """

    title: str
    blocks: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> Report:
        if level not in (2, 3, 4):
            raise ValueError(f"heading level must be 2, 3 or 4 (1 is the title); got {level}")
        self.blocks.append(("heading", {"text": text, "level": level}))
        return self

    def paragraph(self, text: str, note: bool = False) -> Report:
        self.blocks.append(("paragraph", {"text": text, "note": note}))
        return self

    def bullets(self, items: Sequence[str]) -> Report:
        self.blocks.append(("bullets", {"items": list(items)}))
        return self

    def table(
        self,
        rows: Sequence[Mapping[str, Any]],
        *,
        columns: Sequence[str] | None = None,
        headers: Sequence[str] | None = None,
        caption: str | None = None,
        digits: int = 3,
    ) -> Report:
        self.blocks.append(
            (
                "table",
                {
                    "rows": list(rows),
                    "columns": columns,
                    "headers": headers,
                    "caption": caption,
                    "digits": digits,
                },
            )
        )
        return self

    def image(self, filename: str, caption: str) -> Report:
        if Path(filename).name != filename:
            raise ValueError(f"image must be a file name beside the report, not a path; got {filename!r}")
        self.blocks.append(("image", {"filename": filename, "caption": caption}))
        return self

    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, block in self.blocks:
            if kind == "heading":
                out += ["#" * block["level"] + " " + block["text"], ""]
            elif kind == "paragraph":
                out += [("> " if block["note"] else "") + block["text"], ""]
            elif kind == "bullets":
                out += [f"- {item}" for item in block["items"]] + [""]
            elif kind == "table":
                if block["caption"]:
                    out += [f"**{block['caption']}**", ""]
                out += [
                    table_to_markdown(block["rows"], columns=block["columns"], headers=block["headers"],
                                      digits=block["digits"]),
                    "",
                ]
            elif kind == "image":
                out += [f"![{block['caption']}]({block['filename']})", "", f"*{block['caption']}*", ""]
        return "\n".join(out).rstrip() + "\n"

    def to_html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, block in self.blocks:
            if kind == "heading":
                level = block["level"]
                body.append(f"<h{level}>{html.escape(block['text'])}</h{level}>")
            elif kind == "paragraph":
                css = ' class="note"' if block["note"] else ""
                body.append(f"<p{css}>{html.escape(block['text'])}</p>")
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in block["items"]) + "</ul>")
            elif kind == "table":
                body.append(
                    table_to_html(block["rows"], columns=block["columns"], headers=block["headers"],
                                  digits=block["digits"], caption=block["caption"])
                )
            elif kind == "image":
                source = html.escape(block["filename"], quote=True)
                caption = html.escape(block["caption"])
                body.append(
                    f'<figure><img src="{source}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'
                )
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body)
            + "\n</body>\n</html>\n"
        )

    def write(self, directory: str | os.PathLike[str], stem: str = "report") -> dict[str, Path]:
        """Write ``<stem>.md`` and ``<stem>.html`` into ``directory`` atomically; return both paths."""
        folder = Path(directory)
        return {
            "markdown": atomic_write_text(folder / f"{stem}.md", self.to_markdown()),
            "html": atomic_write_text(folder / f"{stem}.html", self.to_html()),
        }


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str = "",
) -> Path:
    """Counts with row-normalised shading (rows = true class, columns = predicted class)."""
    counts = np.asarray(matrix, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(class_names):
        raise ValueError(
            f"confusion matrix of shape {counts.shape} does not match {len(class_names)} classes"
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = np.nan_to_num(counts / counts.sum(axis=1, keepdims=True))
    size = 1.4 + 1.1 * len(class_names)
    figure, axis = new_figure(figsize=(size, size * 0.9))
    axis.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            colour = "white" if fractions[i, j] > 0.6 else "black"
            axis.text(
                j,
                i,
                f"{int(counts[i, j])}\n{100 * fractions[i, j]:.0f}%",
                ha="center",
                va="center",
                color=colour,
            )
    axis.set_xticks(range(len(class_names)), class_names)
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title or "Confusion matrix")
    return save_figure(figure, path)


def plot_roc(
    roc: Mapping[str, Sequence[float]],
    auc: float | None,
    path: str | os.PathLike[str],
    *,
    label: str = "pain",
) -> Path:
    """ROC curve of one class against the rest, with the chance diagonal."""
    figure, axis = new_figure(figsize=(4.2, 4.0))
    auc_text = f" (AUC {auc:.3f})" if auc is not None else ""
    axis.plot(roc["fpr"], roc["tpr"], lw=2, label=f"{label}{auc_text}")
    axis.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.01)
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_title("ROC curve")
    axis.legend(loc="lower right")
    return save_figure(figure, path)


def plot_reliability(reliability: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Reliability diagram (accuracy vs mean confidence per bin, bar width = bin) and bin counts."""
    edges = np.asarray(reliability["bin_edges"], dtype=np.float64)
    accuracy = np.array([np.nan if v is None else v for v in reliability["accuracy"]], dtype=np.float64)
    confidence = np.array(
        [np.nan if v is None else v for v in reliability["mean_confidence"]], dtype=np.float64
    )
    counts = np.asarray(reliability["counts"], dtype=np.float64)
    centres, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    figure, (top, bottom) = new_figure(
        2, 1, figsize=(4.4, 5.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    filled = counts > 0
    top.bar(
        centres[filled],
        accuracy[filled],
        width=widths[filled],
        edgecolor="black",
        alpha=0.8,
        label="accuracy",
    )
    top.bar(
        centres[filled],
        (confidence - accuracy)[filled],
        bottom=accuracy[filled],
        width=widths[filled],
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram (ECE {reliability['ece']:.3f})")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, counts, width=widths, color="tab:grey", edgecolor="black")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence of the predicted class")
    bottom.set_ylabel("frames")
    return save_figure(figure, path)


def plot_per_individual(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    metrics: Sequence[str] = ("accuracy", "recall_pain", "recall_no_pain"),
    reference: float | None = None,
) -> Path:
    """Grouped bars of ``metrics`` per individual; ``None`` values are left empty."""
    names = [str(row["individual"]) for row in rows]
    positions = np.arange(len(names))
    width = 0.8 / max(1, len(metrics))
    figure, axis = new_figure(figsize=(max(5.0, 1.5 + 0.22 * len(names) * max(1, len(metrics))), 3.8))
    for index, metric in enumerate(metrics):
        values = [np.nan if row.get(metric) is None else float(row[metric]) for row in rows]
        axis.bar(positions + (index - (len(metrics) - 1) / 2) * width, values, width=width, label=metric)
    if reference is not None:
        axis.axhline(reference, ls="--", color="black", lw=1, label=f"published accuracy {reference:.0%}")
    axis.set_xticks(positions, names, rotation=60, ha="right", fontsize=8)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("fraction")
    axis.set_title("Per individual (each evaluated by the fold that left it out)")
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(figure, path)


# ----------------------------------------------------------------------------------------------
# The LOIO report
# ----------------------------------------------------------------------------------------------
def _ci_text(entry: Mapping[str, Any] | None, percent: bool = True) -> str:
    if not entry or entry.get("low") is None:
        return "—"
    fmt = format_percent if percent else (lambda v: format_value(v))
    return f"{fmt(entry['low'])} – {fmt(entry['high'])}"


def loio_summary_rows(evaluation: Mapping[str, Any]) -> list[dict[str, str]]:
    """Rows ``metric | ours | 95% CI | published`` for the headline metrics of an evaluation."""
    names = evaluation["class_names"]
    pooled, intervals = evaluation["pooled"], evaluation["confidence_intervals"]["metrics"]
    positive, negative = names[-1], names[0]
    entries = [
        ("accuracy", "accuracy", pooled["accuracy"], PUBLISHED_REFERENCE["accuracy"]),
        ("balanced accuracy", "balanced_accuracy", pooled["balanced_accuracy"], None),
        (
            f"{positive} precision",
            f"precision_{positive}",
            pooled["per_class"][positive]["precision"],
            PUBLISHED_REFERENCE["precision_pain"],
        ),
        (
            f"{positive} recall (sensitivity)",
            f"recall_{positive}",
            pooled["per_class"][positive]["recall"],
            PUBLISHED_REFERENCE["recall_pain"],
        ),
        (f"{positive} F1", f"f1_{positive}", pooled["per_class"][positive]["f1"], None),
        (
            f"{negative} recall (specificity)",
            f"recall_{negative}",
            pooled["per_class"][negative]["recall"],
            None,
        ),
        (f"{negative} precision", f"precision_{negative}", pooled["per_class"][negative]["precision"], None),
        ("macro F1", "macro_f1", pooled["macro_f1"], None),
        ("ROC AUC", "roc_auc", pooled["roc_auc"], None),
        ("ECE (top-label)", "ece", pooled["ece"], None),
    ]
    rows = []
    for label, key, value, published in entries:
        rows.append(
            {
                "metric": label,
                "ours": format_percent(value) if key not in ("roc_auc", "ece") else format_value(value),
                "95% CI": _ci_text(intervals.get(key), percent=key not in ("roc_auc", "ece")),
                "published": format_percent(published, 0) if published is not None else "",
            }
        )
    return rows


def write_loio_report(
    run_dir: str | os.PathLike[str],
    evaluation: Mapping[str, Any],
    run_info: Mapping[str, Any],
    *,
    fold_rows: Sequence[Mapping[str, Any]] = (),
    stem: str = "report",
    notes: Sequence[str] = (),
    sections: Sequence[Callable[[Report], None]] = (),
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the PNGs of a LOIO run into ``run_dir``.

    ``evaluation`` is :func:`painwatch.metrics.evaluate`'s result; ``run_info`` holds the settings
    shown at the top (data, architecture, epochs, frames used, ...); ``fold_rows`` one row per fold;
    ``notes`` are caveats shown highlighted at the top; each of ``sections`` adds its blocks after the
    per-individual results (e.g. the in-distribution check's refusals).
    Returns the written paths by name.
    """
    folder = Path(run_dir)
    names = list(evaluation["class_names"])
    pooled = evaluation["pooled"]
    paths: dict[str, Path] = {}
    paths["confusion_png"] = plot_confusion_matrix(
        pooled["confusion_matrix"], names, folder / "confusion_matrix.png",
        title="Pooled confusion matrix (LOIO)",
    )
    if evaluation.get("roc"):
        paths["roc_png"] = plot_roc(evaluation["roc"], pooled["roc_auc"], folder / "roc.png", label=names[-1])
    paths["reliability_png"] = plot_reliability(evaluation["reliability"], folder / "reliability.png")
    per_individual = evaluation["per_individual"]
    paths["per_individual_png"] = plot_per_individual(
        per_individual,
        folder / "per_individual.png",
        metrics=("accuracy", f"recall_{names[-1]}", f"recall_{names[0]}"),
        reference=PUBLISHED_REFERENCE["accuracy"],
    )

    report = Report("painwatch: leave-one-individual-out evaluation")
    if run_info.get("synthetic"):
        report.paragraph(SYNTHETIC_NOTE, note=True)
    for note in notes:
        report.paragraph(note, note=True)
    report.paragraph(
        f"{evaluation['num_frames']} frames of {evaluation['num_individuals']} individuals were used; every "
        "frame was predicted by the one fold whose model never saw its individual (neither for training nor "
        "for early stopping or temperature scaling)."
    )
    report.heading("Run")
    report.table(
        [{"setting": key, "value": _plain(value)} for key, value in run_info.items()],
        columns=["setting", "value"],
    )
    report.heading("Pooled results beside the published study")
    intervals = evaluation["confidence_intervals"]
    report.table(loio_summary_rows(evaluation), columns=["metric", "ours", "95% CI", "published"])
    report.paragraph(
        f"95% intervals: {intervals['method']}, {intervals['reps']} replicates, seed {intervals['seed']}. "
        f"Published reference ({PUBLISHED_REFERENCE['description']}): "
        f"accuracy {format_percent(PUBLISHED_REFERENCE['accuracy'], 0)}, pain precision "
        f"{format_percent(PUBLISHED_REFERENCE['precision_pain'], 0)}, pain recall "
        f"{format_percent(PUBLISHED_REFERENCE['recall_pain'], 0)}."
    )
    report.image(paths["confusion_png"].name, "Pooled confusion matrix: counts and row percentages.")
    if "roc_png" in paths:
        report.image(paths["roc_png"].name, f"ROC curve of {names[-1]} against {names[0]}.")
    report.image(
        paths["reliability_png"].name,
        "Reliability diagram of the temperature-scaled probabilities, "
        f"{len(evaluation['reliability']['counts'])} equal-width bins of the predicted class's confidence.",
    )
    report.heading("Per individual")
    report.image(
        paths["per_individual_png"].name, "Accuracy and recall per class for each left-out individual."
    )
    report.table(per_individual)
    for section in sections:
        section(report)
    if fold_rows:
        report.heading("Folds")
        report.table(fold_rows)
    paths.update(report.write(folder, stem))
    return paths


def _plain(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(item) for item in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{key}={format_value(item)}" for key, item in value.items())
    return format_value(value, digits=4)
