"""Uploaded files to frames, with one clear message per file that cannot be used, and frames to answers.

Decoding is :mod:`painwatch.data`'s job (:func:`~painwatch.data.read_image`,
:func:`~painwatch.data.sample_video`) and classification :class:`painwatch.inference.Predictor`'s; this
module applies the page's limits and turns every failure into a :class:`FileProblem` naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from painwatch.data import ImageReadError, read_image, sample_video

IMAGE_SUFFIXES: tuple[str, ...] = ("jpg", "jpeg", "png", "bmp", "tif", "tiff")
"""Frame formats the page accepts (lower case, without the dot)."""
CLIP_SUFFIXES: tuple[str, ...] = ("mp4", "avi", "mov")
"""Clip formats the page accepts; clips are sampled at a chosen rate."""

MEGABYTE = 1024 * 1024
MAX_IMAGE_BYTES = 30 * MEGABYTE
"""Largest frame file the page decodes, in bytes."""
MAX_CLIP_BYTES = 100 * MEGABYTE
"""Largest clip file the page decodes, in bytes (equal to server.maxUploadSize in .streamlit/config.toml)."""
MAX_IMAGE_PIXELS = 50_000_000
"""Largest frame the page decodes, in pixels (width x height); guards against decompression bombs."""
MAX_ASPECT_RATIO = 20.0
"""Frames whose longer side is more than this many times the shorter one are refused: they cannot
hold a face, and scaling their short side to the model's input would need enormous memory."""
UPLOAD_HELP = (
    f"Frames up to {MAX_IMAGE_BYTES // MEGABYTE} MB and {MAX_IMAGE_PIXELS // 1_000_000} megapixels, clips "
    f"up to {MAX_CLIP_BYTES // MEGABYTE} MB; files that are larger or of another type are listed with the "
    "reason. "
    "The model was trained on faces cropped from frames: frames cropped to the face give the answers its "
    "accuracy figures are about."
)
"""The uploader's help: the limits the page really applies."""

MAX_FRAMES_PER_CLIP = 300
"""At most this many frames are taken from one clip; the page says so when a clip is cut."""


@dataclass(frozen=True)
class Upload:
    """One uploaded file as the page received it: its name and its bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Frame:
    """One frame to classify.

    ``name`` is unique within a batch ("clip.mp4 @ 1.50 s" for clip frames), ``source`` the
    uploaded file's name, ``time_s`` the frame time in seconds for clip frames (``None`` for still
    frames), ``image`` an HxWx3 uint8 RGB array.
    """

    name: str
    source: str
    time_s: float | None
    image: np.ndarray


@dataclass(frozen=True)
class FileProblem:
    """A file (or part of one) that could not be used, with the reason in plain words."""

    file: str
    problem: str
    severity: str = "error"  # "error": file skipped; "warning": file used only in part

    @property
    def message(self) -> str:
        return f"{self.file}: {self.problem}"


def suffix_of(name: str) -> str:
    """Lower-case extension of ``name`` without the dot ("" when there is none)."""
    return Path(name).suffix.lower().lstrip(".")


def _human_size(num_bytes: int) -> str:
    if num_bytes >= MEGABYTE:
        return f"{num_bytes / MEGABYTE:.1f} MB"
    if num_bytes >= 1024:
        return f"{num_bytes / 1024:.1f} kB"
    return f"{num_bytes} bytes"


def _unique_name(name: str, taken: set[str]) -> str:
    candidate, copy = name, 2
    while candidate in taken:
        candidate = f"{name} ({copy})"
        copy += 1
    taken.add(candidate)
    return candidate


def decode_uploads(
    uploads: Iterable[Upload],
    fps: float,
    *,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    max_clip_bytes: int = MAX_CLIP_BYTES,
    max_frames_per_clip: int = MAX_FRAMES_PER_CLIP,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[list[Frame], list[FileProblem]]:
    """Turn uploaded files into frames; every file that cannot be used becomes a :class:`FileProblem`.

    Still frames are decoded with :func:`painwatch.data.read_image`, clips are sampled at ``fps``
    frames per second with :func:`painwatch.data.sample_video`. A bad file (unknown type, empty,
    larger than ``max_image_bytes`` / ``max_clip_bytes``, more than ``max_image_pixels`` pixels, not
    decodable, truncated, a colour mode the reader rejects) never stops the others. A clip with more
    than ``max_frames_per_clip`` sampled frames keeps its first ``max_frames_per_clip`` frames and gets
    a warning saying so: nothing is dropped silently.

    Raises ``ValueError`` only for bad arguments (``fps`` not positive, limits not positive).
    """

    if not (isinstance(fps, int | float) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number of frames per second, got {fps!r}")
    for label, value in (
        ("max_image_bytes", max_image_bytes),
        ("max_clip_bytes", max_clip_bytes),
        ("max_frames_per_clip", max_frames_per_clip),
        ("max_image_pixels", max_image_pixels),
    ):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")

    frames: list[Frame] = []
    problems: list[FileProblem] = []
    taken: set[str] = set()
    for upload in uploads:
        name, data = upload.name, upload.data
        suffix = suffix_of(name)
        if suffix not in IMAGE_SUFFIXES + CLIP_SUFFIXES:
            accepted = ", ".join(IMAGE_SUFFIXES + CLIP_SUFFIXES)
            problems.append(FileProblem(name, f"unsupported file type '.{suffix}' (accepted: {accepted})"))
            continue
        if len(data) == 0:
            problems.append(FileProblem(name, "the file is empty (0 bytes)"))
            continue
        is_clip = suffix in CLIP_SUFFIXES
        limit = max_clip_bytes if is_clip else max_image_bytes
        if len(data) > limit:
            kind = "clip" if is_clip else "frame"
            problems.append(
                FileProblem(name, f"{_human_size(len(data))} is larger than the {_human_size(limit)} "
                            f"allowed for one {kind}")
            )
            continue
        try:
            if is_clip:
                # One frame more than the cap tells whether the clip was cut; the reader's own
                # "stopped after" warning is replaced by the page's message below.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    sampled = sample_video(data, fps, max_frames=max_frames_per_clip + 1, name=name)
            else:
                image = read_image(data, name=name, max_pixels=max_image_pixels)
        except ImageReadError as error:
            problems.append(FileProblem(name, error.reason))
            continue
        except Exception as error:  # one broken file must never stop the batch
            problems.append(FileProblem(name, f"could not be read ({type(error).__name__}: {error})"))
            continue

        if not is_clip:
            height, width = image.shape[:2]
            if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
                problems.append(FileProblem(
                    name, f"the frame is {width} x {height} pixels: too elongated to hold a face (the longer "
                    f"side is more than {MAX_ASPECT_RATIO:g} times the shorter)"))
                continue
            frames.append(Frame(_unique_name(name, taken), name, None, image))
            continue
        if not sampled:
            problems.append(FileProblem(name, "the clip has no frames that could be decoded"))
            continue
        if len(sampled) > max_frames_per_clip:
            problems.append(
                FileProblem(
                    name,
                    f"{len(sampled)} frames at {fps:g} per second is more than the {max_frames_per_clip} "
                    f"analysed per clip: only the first {max_frames_per_clip} frames (up to "
                    f"{sampled[max_frames_per_clip - 1][0]:.2f} s) are in the results; lower the rate "
                    "or cut the clip to see the rest",
                    severity="warning",
                )
            )
            sampled = sampled[:max_frames_per_clip]
        for time_s, image in sampled:
            frame_name = _unique_name(f"{name} @ {time_s:.2f} s", taken)
            frames.append(Frame(frame_name, name, float(time_s), image))
    return frames, problems


def classify_frames(
    predictor: Any,
    frames: Sequence[Frame],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Frame], list[Any], list[FileProblem]]:
    """Classify and certify ``frames`` with ``predictor``, one frame at a time.

    Returns ``(kept_frames, results, problems)``: ``results[i]`` is the Predictor's answer for
    ``kept_frames[i]`` with ``time_s`` set from the frame; a frame the Predictor refuses
    (``ValueError``) becomes a :class:`FileProblem` naming it, and the others still go through.
    Answers equal those of one ``predictor.predict`` call over all frames, since each frame's noise
    is seeded from its own pixels. ``progress(done, total)`` is called after every frame.
    """
    kept: list[Frame] = []
    results: list[Any] = []
    problems: list[FileProblem] = []
    for done, frame in enumerate(frames, start=1):
        try:
            (result,) = predictor.predict([frame.image], names=[frame.name])
        except ValueError as error:
            problems.append(FileProblem(frame.source, f"{frame.name} could not be classified: {error}"))
        else:
            kept.append(frame)
            results.append(dataclasses.replace(result, time_s=frame.time_s))
        if progress is not None:
            progress(done, len(frames))
    return kept, results, problems


def uploads_digest(uploads: Iterable[Upload], settings: Mapping[str, Any]) -> str:
    """sha256 over the uploaded names, bytes and the settings: same digest, same results."""
    digest = hashlib.sha256()
    for upload in uploads:
        digest.update(upload.name.encode("utf-8", "surrogateescape") + b"\0")
        digest.update(hashlib.sha256(upload.data).digest())
    digest.update(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def check_aligned(frames: Sequence[Frame], results: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless there is exactly one result per frame."""
    if len(frames) != len(results):
        raise ValueError(f"got {len(frames)} frames but {len(results)} results; they must match one to one")
