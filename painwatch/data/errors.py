"""Errors and problem records of :mod:`painwatch.data`.

Every error names the file (and, for a manifest, the CSV row) it is about, so that a person can go
and fix it without reading a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class ImageReadError(ValueError):
    """An image or video could not be read.

    The message always names the file (or the name given for in-memory bytes) and the reason.
    ``source`` holds that name and ``reason`` the reason alone.
    """

    def __init__(self, source: str | Path, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data source.

    ``kind`` is a short machine-readable tag (see :data:`PROBLEM_KINDS`), ``message`` the human
    explanation, ``file`` the file concerned (image, video or manifest) and ``row`` the 1-based line
    number in the manifest CSV (the header is line 1) when the source is a manifest.
    """

    kind: str
    message: str
    file: str | None = None
    row: int | None = None

    def __str__(self) -> str:
        where = []
        if self.file is not None:
            where.append(self.file)
        if self.row is not None:
            where.append(f"row {self.row}")
        prefix = ", ".join(where)
        return f"[{self.kind}] {prefix}: {self.message}" if prefix else f"[{self.kind}] {self.message}"


PROBLEM_KINDS: dict[str, str] = {
    "missing_source": "the data folder or manifest does not exist",
    "missing_columns": "the manifest lacks required columns",
    "bad_row": "a manifest row is malformed (empty path, empty individual, wrong number of fields)",
    "missing_file": "a listed image or video file does not exist",
    "unreadable_image": "the file is not a readable image (empty, truncated, not an image, too big)",
    "unreadable_video": "the video cannot be opened or the frame at time_s cannot be decoded",
    "unknown_label": "the label is not pain / no_pain (or 1 / 0)",
    "bad_box": "the face box is malformed, empty or outside the image",
    "bad_time": "time_s is not a finite number >= 0, or video and time_s are not given together",
    "unsupported_file": "a file in the folder layout is not a supported image",
    "misplaced_file": "an image is not inside DATA/<individual>/<label>/",
    "duplicate_frame": "two frames have identical content (same file bytes or same video time)",
    "single_class_individual": "an individual has frames of one class only",
    "empty": "the source holds no frames at all",
}
"""Every problem kind that validation can report, with what it means."""


class DataValidationError(ValueError):
    """A data source has problems; the message lists every one of them.

    ``problems`` holds the :class:`Problem` records and ``report`` the full
    :class:`~painwatch.data.records.ValidationReport` (usable records and summary table included).
    """

    def __init__(self, source: str | Path, problems: list[Problem], report: object | None = None) -> None:
        self.source = str(source)
        self.problems = list(problems)
        self.report = report
        lines = [f"{self.source}: {len(self.problems)} problem(s) found:"]
        lines += [f"  {problem}" for problem in self.problems]
        super().__init__("\n".join(lines))
