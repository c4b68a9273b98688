"""Frame records: what a frame of a data set is, and reading a data folder or manifest CSV into them.

Two layouts are accepted (``data/README.md``):

1. a folder ``DATA/<individual>/<label>/*.{jpg,jpeg,png,bmp,tif,tiff}``; a folder that holds a
   ``manifest.csv`` is read through that manifest instead;
2. a manifest CSV with columns ``path, individual, label``, optional face box ``x0, y0, x1, y1`` and
   optional ``video, time_s``. Relative paths are relative to the CSV's folder. A row may leave
   ``path`` empty and give ``video`` and ``time_s``: its frame is the clip's frame at that time. A row
   with both ``path`` and ``video, time_s`` reads the image; the video columns then only record where
   the frame came from. Face boxes are in pixels of the frame as displayed (after EXIF orientation,
   as :func:`~painwatch.data.images.read_image` returns it), ``x1`` and ``y1`` exclusive. Other
   columns are allowed and ignored (the report lists them).

:func:`painwatch.data.sources.load_records` refuses a source with any problem that
:func:`~painwatch.data.validation.validate_source` finds (every problem at once, never a frame dropped
silently); hashes of records are in :mod:`painwatch.data.hashing`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from painwatch import CLASS_NAMES
from painwatch.data.images import Box, Detector, check_box, crop_face, read_image
from painwatch.data.video import read_video_frame, sample_times

MANIFEST_NAME = "manifest.csv"
"""A data folder holding a file of this name is read through it."""

REQUIRED_COLUMNS: tuple[str, ...] = ("path", "individual", "label")
BOX_COLUMNS: tuple[str, ...] = ("x0", "y0", "x1", "y1")
VIDEO_COLUMNS: tuple[str, ...] = ("video", "time_s")
KNOWN_COLUMNS: frozenset[str] = frozenset(REQUIRED_COLUMNS + BOX_COLUMNS + VIDEO_COLUMNS)

_LABEL_WORDS: dict[str, int] = {
    "no_pain": 0,
    "no-pain": 0,
    "no pain": 0,
    "nopain": 0,
    "0": 0,
    "pain": 1,
    "1": 1,
}


def parse_label(value: object) -> int:
    """Map a label to its class index: ``no_pain`` / ``0`` -> 0, ``pain`` / ``1`` -> 1.

    Case and surrounding spaces are ignored; ``no-pain`` and ``no pain`` are accepted for ``no_pain``.

    Raises:
        ValueError: naming the value, for anything else.
    """
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"unknown label {value!r}: expected 'pain' or 'no_pain' (or 1 / 0)")
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return int(value)
    key = str(value).strip().lower()
    if key not in _LABEL_WORDS:
        raise ValueError(f"unknown label {value!r}: expected 'pain' or 'no_pain' (or 1 / 0)")
    return _LABEL_WORDS[key]


@dataclass(frozen=True)
class FrameRecord:
    """One labelled frame.

    ``path`` is the image file, or the video file for a frame taken from a clip (then ``video`` is
    that same path as a string and ``time_s`` the frame's time in seconds). ``label`` is the class
    index (``no_pain`` = 0, ``pain`` = 1). ``box`` is the face box ``(x0, y0, x1, y1)`` in pixels of the
    full frame as displayed (after EXIF orientation), or ``None`` for the whole frame. ``row`` is the
    manifest line (header = line 1) for messages, ``None`` for the folder layout.
    """

    path: Path
    individual: str
    label: int
    box: Box | None = None
    video: str | None = None
    time_s: float | None = None
    row: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.label not in (0, 1):
            raise ValueError(f"label must be 0 (no_pain) or 1 (pain), got {self.label!r}")
        if not str(self.individual).strip():
            raise ValueError(f"individual must be a non-empty name, got {self.individual!r}")
        if self.box is not None:
            object.__setattr__(self, "box", check_box(self.box, name=f"box of {self.where}"))
        if self.time_s is not None and not (math.isfinite(self.time_s) and self.time_s >= 0):
            raise ValueError(f"time_s must be a finite number of seconds >= 0, got {self.time_s!r}")

    @property
    def from_video(self) -> bool:
        """Whether the frame is read from a clip (``path`` is the video, ``time_s`` the time)."""
        return self.video is not None and self.time_s is not None and Path(self.video) == self.path

    @property
    def label_name(self) -> str:
        """``"no_pain"`` or ``"pain"``."""
        return CLASS_NAMES[self.label]

    @property
    def where(self) -> str:
        """The file (and row, and time) for messages."""
        text = str(self.path)
        if self.from_video:
            text += f" at t={self.time_s:g}s"
        if self.row is not None:
            text += f" (row {self.row})"
        return text


def load_frame(record: FrameRecord, detector: Detector | None = None, margin: float = 0.1) -> np.ndarray:
    """Read a record's frame and crop its face: ``(H, W, 3)`` uint8 RGB.

    The crop uses the record's box when it has one, else ``detector`` when given (a ``None`` answer
    keeps the whole frame), else the whole frame. ``margin`` is the fraction of the box added on each
    side (:func:`~painwatch.data.images.crop_face`).

    Raises:
        ImageReadError: naming the file when it cannot be read.
        ValueError: naming the file and row when the box (given or detected) lies outside the frame.
    """
    if record.from_video:
        image = read_video_frame(record.path, float(record.time_s))
    else:
        image = read_image(record.path)
    box = record.box
    if box is None and detector is not None:
        box = detector(image)
        if box is None:
            return image
        origin = "detector box"
    else:
        origin = "box"
    if box is None:
        return image
    try:
        check_box(box, image.shape, name=origin)
    except ValueError as error:
        raise ValueError(f"{record.where}: {error}") from None
    return crop_face(image, box, margin)


def records_from_video(
    path: str | os.PathLike,
    individual: str,
    label: str | int,
    *,
    fps: float,
    box: Box | None = None,
    max_frames: int | None = 1000,
    source_fps: float | None = None,
) -> list[FrameRecord]:
    """Records for a clip sampled at ``fps`` (same times as :func:`~painwatch.data.video.sample_video`).

    Each record has ``path`` = ``video`` = the clip and its ``time_s``; :func:`load_frame` reads it.
    """
    class_index = parse_label(label)
    video = Path(path)
    times = sample_times(video, fps, max_frames=max_frames, source_fps=source_fps)
    return [
        FrameRecord(
            path=video, individual=str(individual), label=class_index, box=box, video=str(video), time_s=t
        )
        for t in times
    ]
