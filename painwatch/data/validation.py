"""Validation of a data folder or manifest CSV (layouts in :mod:`painwatch.data.records`).

:func:`validate_source` scans the folder or the manifest, checks every frame's pixels (or its clip's
time range) and face box, finds frames with the same content, notes images a manifest does not list,
and reports every problem at once with file and row: it never drops a frame silently.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from painwatch import CLASS_NAMES
from painwatch.data.errors import ImageReadError, Problem
from painwatch.data.hashing import file_sha256
from painwatch.data.images import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Box, check_box, probe_image
from painwatch.data.records import (
    BOX_COLUMNS,
    KNOWN_COLUMNS,
    MANIFEST_NAME,
    REQUIRED_COLUMNS,
    FrameRecord,
    parse_label,
)
from painwatch.data.video import VideoInfo, video_info


@dataclass
class ValidationReport:
    """The outcome of :func:`validate_source`.

    ``records`` are the usable frames (no problem of their own), in source order; ``problems`` every
    problem found; ``total_frames`` how many frames the source lists (usable or not); ``notes`` things
    ignored on purpose (hidden files, extra columns), so that nothing is dropped silently.
    ``ok`` is true only when there is no problem at all.
    """

    source: Path
    layout: str
    records: list[FrameRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    total_frames: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def usable_frames(self) -> int:
        return len(self.records)

    def counts(self) -> dict[str, dict[str, int]]:
        """Usable frames per individual and class name, individuals sorted."""
        table: dict[str, dict[str, int]] = {}
        for record in self.records:
            row = table.setdefault(record.individual, dict.fromkeys(CLASS_NAMES, 0))
            row[record.label_name] += 1
        return dict(sorted(table.items()))

    def summary_table(self) -> str:
        """A fixed-width table: usable frames per individual and class, with totals."""
        counts = self.counts()
        name_width = max([len("individual"), len("total"), *(len(name) for name in counts)])
        header = (
            f"{'individual':<{name_width}}  " + "  ".join(f"{c:>8}" for c in CLASS_NAMES) + f"  {'total':>8}"
        )
        lines = [header, "-" * len(header)]
        totals = dict.fromkeys(CLASS_NAMES, 0)
        for individual, row in counts.items():
            cells = "  ".join(f"{row[c]:>8}" for c in CLASS_NAMES)
            lines.append(f"{individual:<{name_width}}  {cells}  {sum(row.values()):>8}")
            for c in CLASS_NAMES:
                totals[c] += row[c]
        lines.append("-" * len(header))
        cells = "  ".join(f"{totals[c]:>8}" for c in CLASS_NAMES)
        lines.append(f"{'total':<{name_width}}  {cells}  {sum(totals.values()):>8}")
        return "\n".join(lines)

    def format(self) -> str:
        """The full human report: problems, notes, summary table and the usable-frames line."""
        lines = [f"{self.source} ({self.layout} layout)"]
        if self.problems:
            kinds = Counter(problem.kind for problem in self.problems)
            kind_text = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
            lines.append(f"{len(self.problems)} problem(s): {kind_text}")
            lines += [f"  {problem}" for problem in self.problems]
        else:
            lines.append("no problems found")
        lines += [f"note: {note}" for note in self.notes]
        lines += ["", self.summary_table(), ""]
        lines.append(
            f"{self.usable_frames} of {self.total_frames} frames usable from "
            f"{len(self.counts())} individual(s)"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready form (paths as strings)."""
        return {
            "source": str(self.source),
            "layout": self.layout,
            "ok": self.ok,
            "total_frames": self.total_frames,
            "usable_frames": self.usable_frames,
            "counts": self.counts(),
            "problems": [
                {"kind": p.kind, "message": p.message, "file": p.file, "row": p.row} for p in self.problems
            ],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class _Candidate:
    """A frame as listed by the source, before the checks that need its pixels."""

    path: Path
    individual: str
    label: int
    box: Box | None
    video: str | None
    time_s: float | None
    row: int | None
    display: str

    @property
    def from_video(self) -> bool:
        """Whether the frame is read from a clip (as :attr:`FrameRecord.from_video`)."""
        return self.video is not None and self.time_s is not None and Path(self.video) == self.path

    def record(self) -> FrameRecord:
        return FrameRecord(
            self.path, self.individual, self.label, self.box, self.video, self.time_s, self.row
        )


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name in ("Thumbs.db", "desktop.ini", "__MACOSX")


def _scan_folder(root: Path, report: ValidationReport) -> list[_Candidate]:
    candidates: list[_Candidate] = []
    hidden: list[str] = []
    ignored_top: list[str] = []

    def image_like(path: Path) -> bool:
        return path.suffix.lower() in IMAGE_EXTENSIONS

    for individual_dir in sorted(root.iterdir()):
        if _is_hidden(individual_dir):
            hidden.append(individual_dir.name)
            continue
        if individual_dir.is_file():
            if image_like(individual_dir):
                report.total_frames += 1
                report.problems.append(
                    Problem(
                        "misplaced_file",
                        "image is not inside DATA/<individual>/<label>/",
                        str(individual_dir),
                    )
                )
            else:
                ignored_top.append(individual_dir.name)
            continue
        for label_dir in sorted(individual_dir.iterdir()):
            if _is_hidden(label_dir):
                hidden.append(str(label_dir.relative_to(root)))
                continue
            if label_dir.is_file():
                report.total_frames += image_like(label_dir)
                report.problems.append(
                    Problem(
                        "misplaced_file",
                        f"file sits directly in the individual's folder; move it into "
                        f"{individual_dir.name}/pain/ "
                        f"or {individual_dir.name}/no_pain/",
                        str(label_dir),
                    )
                )
                continue
            files = [f for f in sorted(label_dir.rglob("*")) if f.is_file()]
            try:
                label = parse_label(label_dir.name)
            except ValueError as error:
                frames = sum(image_like(f) for f in files)
                report.total_frames += frames
                report.problems.append(
                    Problem(
                        "unknown_label",
                        f"{error} (folder name; {frames} image(s) inside not used)",
                        str(label_dir),
                    )
                )
                continue
            for file in files:
                relative = file.relative_to(label_dir)
                if any(_is_hidden(Path(part)) for part in relative.parts):
                    hidden.append(str(file.relative_to(root)))
                    continue
                if len(relative.parts) > 1:
                    report.total_frames += image_like(file)
                    report.problems.append(
                        Problem(
                            "misplaced_file",
                            f"file is in a sub-folder of {label_dir.relative_to(root)}/; "
                            "frames must sit directly in DATA/<individual>/<label>/",
                            str(file),
                        )
                    )
                    continue
                if not image_like(file):
                    hint = (
                        "videos go in a manifest (columns video, time_s) or through "
                        "painwatch.data.records_from_video"
                        if file.suffix.lower() in VIDEO_EXTENSIONS
                        else f"supported: {', '.join(sorted(IMAGE_EXTENSIONS))}"
                    )
                    report.problems.append(
                        Problem("unsupported_file", f"not a supported image file ({hint})", str(file))
                    )
                    continue
                report.total_frames += 1
                candidates.append(
                    _Candidate(
                        path=file,
                        individual=individual_dir.name,
                        label=label,
                        box=None,
                        video=None,
                        time_s=None,
                        row=None,
                        display=str(file),
                    )
                )
    listed_individuals = {c.individual for c in candidates}
    empty = [
        d.name
        for d in sorted(root.iterdir())
        if d.is_dir()
        and not _is_hidden(d)
        and d.name not in listed_individuals
        and not any(p.file and Path(p.file).is_relative_to(d) for p in report.problems)
    ]
    if empty:
        report.notes.append(f"folder(s) with no frames in them: {', '.join(empty)}")
    if hidden:
        report.notes.append(
            f"ignored {len(hidden)} hidden file(s)/folder(s): {', '.join(hidden[:5])}"
            + (" ..." if len(hidden) > 5 else "")
        )
    if ignored_top:
        report.notes.append(f"ignored non-image file(s) at the top level: {', '.join(ignored_top)}")
    return candidates


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def _header_problem(columns: list[str]) -> str | None:
    """What is wrong with a manifest's (lower-cased) header, or ``None`` when it can be read."""
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if "path" in missing and "video" in columns and "time_s" in columns:
        missing.remove("path")
    if missing:
        return f"manifest lacks column(s) {', '.join(missing)}; it has: {', '.join(columns) or '(none)'}"
    duplicated = sorted(c for c, n in Counter(columns).items() if n > 1 and c)
    if duplicated:
        return f"column(s) {', '.join(duplicated)} appear more than once"
    present_box = [c for c in BOX_COLUMNS if c in columns]
    if present_box and len(present_box) != 4:
        return f"a face box needs all of x0, y0, x1, y1; the manifest has only {', '.join(present_box)}"
    return None


def _scan_manifest(manifest: Path, report: ValidationReport, listed: set[Path]) -> list[_Candidate]:
    candidates: list[_Candidate] = []
    base = manifest.parent
    name = str(manifest)
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            try:
                header = next(reader)
            except StopIteration:
                report.problems.append(Problem("empty", "manifest is empty (no header row)", name, 1))
                return candidates
            columns = [column.strip().lower() for column in header]
            header_problem = _header_problem(columns)
            if header_problem is not None:
                report.problems.append(Problem("missing_columns", header_problem, name, 1))
                return candidates
            extra = [c for c in columns if c not in KNOWN_COLUMNS]
            if extra:
                report.notes.append(f"ignored extra manifest column(s): {', '.join(extra)}")
            index = {c: i for i, c in enumerate(columns)}
            for fields in reader:
                row = reader.line_num
                if not fields or all(not f.strip() for f in fields):
                    if fields:
                        report.problems.append(Problem("bad_row", "row is empty", name, row))
                    continue
                report.total_frames += 1
                candidate = _parse_row(fields, index, len(columns), base, name, row, report, listed)
                if candidate is not None:
                    candidates.append(candidate)
    except UnicodeDecodeError as error:
        report.problems.append(Problem("bad_row", f"manifest is not UTF-8 text ({error})", name))
    except csv.Error as error:
        report.problems.append(Problem("bad_row", f"manifest is not valid CSV ({error})", name))
    return candidates


def _resolve(base: Path, text: str) -> Path:
    """A manifest path: absolute as given, relative to the manifest's folder ``base``."""
    return Path(text) if Path(text).is_absolute() else base / text


def _parse_row(
    fields: list[str],
    index: dict[str, int],
    width: int,
    base: Path,
    name: str,
    row: int,
    report: ValidationReport,
    listed: set[Path],
) -> _Candidate | None:
    problems: list[Problem] = []

    def add(kind: str, message: str, file: str | None = None) -> None:
        problems.append(Problem(kind, message, file or name, row))

    if len(fields) != width:
        add("bad_row", f"row has {len(fields)} field(s), the header has {width}")
        report.problems.extend(problems)
        return None

    def get(column: str) -> str:
        return fields[index[column]].strip() if column in index else ""

    individual = get("individual")
    if not individual:
        add("bad_row", "individual is empty")
    label = None
    try:
        label = parse_label(get("label"))
    except ValueError as error:
        add("unknown_label", str(error))

    box = None
    if "x0" in index:
        texts = [get(c) for c in BOX_COLUMNS]
        if any(texts):
            if not all(texts):
                add(
                    "bad_box",
                    f"face box is partly empty: x0, y0, x1, y1 = {', '.join(t or '?' for t in texts)}",
                )
            else:
                try:
                    box = check_box(texts, name="face box")
                except ValueError as error:
                    add("bad_box", str(error))

    video_text, time_text = get("video"), get("time_s")
    time_s = None
    if bool(video_text) != bool(time_text):
        add(
            "bad_time",
            "video and time_s must be given together "
            f"(video={video_text or '(empty)'}, time_s={time_text or '(empty)'})",
        )
    elif time_text:
        try:
            time_s = _parse_float(time_text)
            if time_s < 0:
                raise ValueError("negative")
        except ValueError:
            add("bad_time", f"time_s={time_text!r} is not a finite number of seconds >= 0")
            time_s = None

    path_text = get("path")
    path: Path | None = None
    video: str | None = None
    if path_text:
        path = _resolve(base, path_text)
        if video_text:
            video = str(_resolve(base, video_text))
    elif video_text:
        path = _resolve(base, video_text)
        video = str(path)
    else:
        add("bad_row", "path is empty (give path, or video and time_s)")
    if path is not None and not path.is_file():
        what = "image" if path_text else "video"
        reason = f"{what} file does not exist" if not path.exists() else "is not a file"
        add("missing_file", reason, str(path))

    if path is not None:
        listed.add(path.resolve())
    if problems:
        report.problems.extend(problems)
        return None
    assert path is not None and label is not None
    display = f"{path}" + (f" at t={time_s:g}s" if not path_text and time_s is not None else "")
    return _Candidate(
        path=path,
        individual=individual,
        label=label,
        box=box,
        video=video,
        time_s=time_s,
        row=row,
        display=display,
    )


def _check_pixels(
    candidates: list[_Candidate],
    report: ValidationReport,
    check_images: bool,
) -> list[_Candidate]:
    """Read each frame (or its clip) to check it decodes and its box fits; returns the good ones."""
    good: list[_Candidate] = []
    videos: dict[str, VideoInfo | ImageReadError] = {}
    for candidate in candidates:
        from_video = candidate.from_video
        shape: tuple[int, int] | None = None
        try:
            if from_video:
                key = str(candidate.path)
                if key not in videos:
                    try:
                        videos[key] = video_info(candidate.path)
                    except ImageReadError as error:
                        videos[key] = error
                info = videos[key]
                if isinstance(info, ImageReadError):
                    raise info
                if not info.covers(float(candidate.time_s)):
                    raise ImageReadError(
                        candidate.path,
                        f"time_s = {candidate.time_s:g} s is outside the clip (0 to {info.duration_s:.3f} s)",
                    )
                shape = (info.height, info.width)
            elif check_images or candidate.box is not None:
                shape = probe_image(candidate.path)
        except ImageReadError as error:
            kind = "unreadable_video" if from_video else "unreadable_image"
            report.problems.append(Problem(kind, error.reason, candidate.display, candidate.row))
            continue
        if candidate.box is not None and shape is not None:
            try:
                check_box(candidate.box, shape, name="face box")
            except ValueError as error:
                report.problems.append(Problem("bad_box", str(error), candidate.display, candidate.row))
                continue
        good.append(candidate)
    return good


def _drop_duplicates(candidates: list[_Candidate], report: ValidationReport) -> list[_Candidate]:
    first_seen: dict[tuple[str, float | None], _Candidate] = {}
    kept: list[_Candidate] = []
    for candidate in candidates:
        try:
            content = file_sha256(candidate.path)
        except OSError as error:
            report.problems.append(
                Problem("missing_file", f"cannot be read ({error})", candidate.display, candidate.row)
            )
            continue
        key = (content, candidate.time_s if candidate.from_video else None)
        original = first_seen.get(key)
        if original is not None:
            where = original.display + (f" (row {original.row})" if original.row is not None else "")
            report.problems.append(
                Problem("duplicate_frame", f"same content as {where}", candidate.display, candidate.row)
            )
            continue
        first_seen[key] = candidate
        kept.append(candidate)
    return kept


def _note_unlisted_images(root: Path, listed: set[Path], report: ValidationReport) -> None:
    """Say (as a note) when the data folder holds images its manifest does not list."""
    unlisted = [
        path
        for path in sorted(root.rglob("*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and not any(_is_hidden(Path(part)) for part in path.relative_to(root).parts)
        and path.is_file()
        and path.resolve() not in listed
    ]
    if unlisted:
        examples = ", ".join(str(p.relative_to(root)) for p in unlisted[:3]) + (
            " ..." if len(unlisted) > 3 else ""
        )
        report.notes.append(
            f"{len(unlisted)} image file(s) under {root} are not listed in {MANIFEST_NAME} and are not used: "
            f"{examples}"
        )


def validate_source(
    source: str | os.PathLike,
    *,
    check_images: bool = True,
    require_both_classes: bool = True,
) -> ValidationReport:
    """Check a data folder or manifest CSV and report every problem at once.

    Checks: the source exists; the manifest has the required columns; each row has an individual, a
    known label, an existing file, a well-formed face box inside the image, and a valid ``time_s``
    inside its clip; each image decodes to the end (so truncated files are caught; JPEGs at reduced
    scale, see :func:`~painwatch.data.images.probe_image`; ``check_images=False`` skips decoding images
    without a box); no two frames share their content (SHA-256 of the file bytes, so re-encoded copies
    are not caught; or the same clip and time); and, with ``require_both_classes``, every individual
    has frames of both classes (leave-one-individual-out evaluation needs them).

    Never raises for bad data: everything is in the returned report. Raises ``TypeError`` only for a
    ``source`` that is not a path.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a folder or manifest path, got {type(source).__name__}")
    root = Path(source)
    if root.is_dir() and (root / MANIFEST_NAME).is_file():
        manifest: Path | None = root / MANIFEST_NAME
    elif root.is_file():
        manifest = root
    else:
        manifest = None
    report = ValidationReport(source=root, layout="manifest" if manifest is not None else "folder")
    if manifest is None and not root.is_dir():
        report.problems.append(Problem("missing_source", "no such folder or manifest file", str(root)))
        return report
    if manifest is not None:
        if manifest.suffix.lower() != ".csv":
            report.problems.append(
                Problem(
                    "missing_source",
                    "a manifest must be a .csv file (or give the data folder)",
                    str(manifest),
                )
            )
            return report
        report.source = manifest
        listed: set[Path] = set()
        candidates = _scan_manifest(manifest, report, listed)
        if root.is_dir():
            _note_unlisted_images(root, listed, report)
    else:
        candidates = _scan_folder(root, report)
    candidates = _check_pixels(candidates, report, check_images)
    candidates = _drop_duplicates(candidates, report)
    report.records = [c.record() for c in candidates]
    if report.total_frames == 0 and not any(
        p.kind in ("missing_columns", "bad_row") for p in report.problems
    ):
        report.problems.append(Problem("empty", "the source lists no frames", str(report.source)))
    # Row order (manifest) or file order (folder), so a person can work down the list.
    report.problems.sort(key=lambda p: (p.row if p.row is not None else 0, p.file or ""))
    if require_both_classes:
        classes: dict[str, set[int]] = defaultdict(set)
        for record in report.records:
            classes[record.individual].add(record.label)
        for individual, labels in sorted(classes.items()):
            if len(labels) == 1:
                only = CLASS_NAMES[next(iter(labels))]
                missing = CLASS_NAMES[1 - next(iter(labels))]
                count = sum(r.individual == individual for r in report.records)
                where = str(root / individual) if report.layout == "folder" else str(report.source)
                report.problems.append(
                    Problem(
                        "single_class_individual",
                        f"individual {individual!r} has {count} usable {only} frame(s) "
                        f"and no usable {missing} frame",
                        where,
                    )
                )
    return report
