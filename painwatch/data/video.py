"""Sampling frames from video clips with OpenCV.

Frames are decoded sequentially (never by seeking), which is exact for every container and codec
OpenCV can read, including clips whose header lacks a frame rate or frame count.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from painwatch.data.errors import ImageReadError

DEFAULT_MAX_FRAMES: int = 1000
"""Most frames :func:`sample_video` returns unless told otherwise (memory guard: 1000 full-HD frames
take about 6 GB)."""

_MAX_PLAUSIBLE_FPS = 1000.0


@contextlib.contextmanager
def _video_path(source: str | os.PathLike | bytes, name: str | None) -> Iterator[tuple[str, str]]:
    """Yield (path OpenCV can open, label for messages); bytes go through a temporary file."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<video bytes>"
        if len(source) == 0:
            raise ImageReadError(label, "video file is empty (0 bytes)")
        suffix = Path(name).suffix if name else ".mp4"
        handle, temp = tempfile.mkstemp(suffix=suffix or ".mp4", prefix="painwatch-video-")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(bytes(source))
            yield temp, label
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        return
    path = Path(source)
    label = name or str(path)
    if not path.exists():
        raise ImageReadError(label, "video file does not exist")
    if path.is_dir():
        raise ImageReadError(label, "is a folder, not a video file")
    if path.stat().st_size == 0:
        raise ImageReadError(label, "video file is empty (0 bytes)")
    yield str(path), label


def _open(path: str, label: str):
    import cv2

    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        capture.release()
        raise ImageReadError(
            label, "cannot be opened as a video (unknown container or codec, or not a video)"
        )
    return capture


def _decoded_frames(capture, label: str, source_fps: float | None) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (time in seconds, BGR frame) for every decodable frame, in order.

    Times come from the clip's frame rate (``source_fps`` overrides it); when the header has none,
    from the decoder's per-frame timestamps.
    """
    import cv2

    fps = source_fps if source_fps is not None else capture.get(cv2.CAP_PROP_FPS)
    fps_known = fps is not None and math.isfinite(fps) and 0 < fps <= _MAX_PLAUSIBLE_FPS
    index = 0
    last_time = -math.inf
    while True:
        if not capture.grab():
            return
        if fps_known:
            time_s = index / fps
        else:
            msec = capture.get(cv2.CAP_PROP_POS_MSEC)
            if not math.isfinite(msec) or (index > 0 and msec / 1000.0 <= last_time):
                raise ImageReadError(
                    label,
                    "the clip states no frame rate and its decoder gives no usable timestamps; "
                    "pass source_fps= to say how many frames per second it holds",
                )
            time_s = msec / 1000.0
        ok, frame = capture.retrieve()
        if not ok or frame is None:
            raise ImageReadError(label, f"frame {index} (t = {time_s:.3f} s) cannot be decoded")
        last_time = time_s
        index += 1
        yield time_s, frame


def _bgr_to_rgb(frame: np.ndarray) -> np.ndarray:
    import cv2

    if frame.ndim == 2:
        return np.ascontiguousarray(np.repeat(frame[:, :, None], 3, axis=2))
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def _check_rates(fps: float, source_fps: float | None, max_frames: int | None) -> None:
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number of frames per second, got {fps!r}")
    if source_fps is not None and not (math.isfinite(source_fps) and source_fps > 0):
        raise ValueError(f"source_fps must be a positive number of frames per second, got {source_fps!r}")
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames must be a positive int or None, got {max_frames!r}")


def _iter_samples(
    path: str | os.PathLike | bytes,
    fps: float,
    max_frames: int | None,
    source_fps: float | None,
    name: str | None,
) -> Iterator[tuple[float, np.ndarray]]:
    """Yield the sampled (time_s, BGR frame) pairs; see :func:`sample_video` for the rule."""
    _check_rates(fps, source_fps, max_frames)
    period = 1.0 / fps
    # Half a microsecond of slack so that t = k / fps computed two ways compares equal.
    tolerance = 5e-7
    count = 0
    last_time = 0.0
    with _video_path(path, name) as (video_file, label):
        capture = _open(video_file, label)
        try:
            next_target = 0.0
            for time_s, frame in _decoded_frames(capture, label, source_fps):
                if time_s + tolerance < next_target:
                    continue
                if max_frames is not None and count >= max_frames:
                    warnings.warn(
                        f"{label}: stopped after {max_frames} sampled frames (max_frames), at t = "
                        f"{last_time:.2f} s; the rest of the clip was not sampled",
                        stacklevel=3,
                    )
                    break
                count += 1
                last_time = time_s
                yield float(time_s), frame
                # Next target: the first multiple of the period strictly after this frame's time.
                next_target = (math.floor((time_s + tolerance) / period) + 1) * period
        finally:
            capture.release()
        if count == 0:
            raise ImageReadError(label, "no frame could be decoded from the video")


def sample_video(
    path: str | os.PathLike | bytes,
    fps: float,
    *,
    max_frames: int | None = DEFAULT_MAX_FRAMES,
    source_fps: float | None = None,
    name: str | None = None,
) -> list[tuple[float, np.ndarray]]:
    """Sample a clip at ``fps`` frames per second: a list of ``(time_s, frame)``.

    ``time_s`` is the time of the sampled frame from the start of the clip, in seconds; ``frame`` an
    ``(H, W, 3)`` uint8 RGB array. Sampling takes, for each target time ``k / fps`` (k = 0, 1, ...),
    the first decoded frame at or after it, so the returned times are strictly increasing, start with
    the first frame, and never repeat a frame (asking for more fps than the clip has gives every frame).

    The clip's frame rate comes from its header or, when the header has none, from the decoder's
    timestamps; ``source_fps`` overrides both. The frame count in the header is not used (it is often
    missing or wrong). ``path`` may also be the clip's bytes (an upload; ``name`` then names it in
    messages and gives the suffix of the temporary file OpenCV reads).

    At most ``max_frames`` frames are returned (``None``: no limit); when the limit cuts the clip
    short a ``UserWarning`` says up to which time it was sampled.

    Raises:
        ValueError: for ``fps`` / ``source_fps`` / ``max_frames`` that are not positive.
        ImageReadError: naming the file, when it is missing, empty, cannot be opened, or holds no
            decodable frame.
    """
    return [
        (time_s, _bgr_to_rgb(frame))
        for time_s, frame in _iter_samples(path, fps, max_frames, source_fps, name)
    ]


def sample_times(
    path: str | os.PathLike,
    fps: float,
    *,
    max_frames: int | None = DEFAULT_MAX_FRAMES,
    source_fps: float | None = None,
) -> list[float]:
    """The times (seconds) :func:`sample_video` would return, without keeping the frames in memory."""
    return [time_s for time_s, _ in _iter_samples(path, fps, max_frames, source_fps, None)]


@dataclass(frozen=True)
class VideoInfo:
    """What decoding a whole clip tells: ``frame_count`` decodable frames, the time of the last one
    (``last_time_s``, seconds), the time one frame lasts (``frame_period_s``; 0 for a one-frame clip),
    and the frame size in pixels."""

    frame_count: int
    last_time_s: float
    frame_period_s: float
    height: int
    width: int

    @property
    def duration_s(self) -> float:
        """Seconds from the first frame to the end of the last one."""
        return self.last_time_s + self.frame_period_s

    def covers(self, time_s: float) -> bool:
        """Whether a frame is showing at ``time_s`` seconds."""
        return 0 <= time_s < self.duration_s or (self.frame_count == 1 and time_s == 0)


def video_info(path: str | os.PathLike, *, source_fps: float | None = None) -> VideoInfo:
    """Decode the whole clip once and describe it (used by validation to check ``time_s`` values).

    Raises:
        ImageReadError: naming the file, when it cannot be opened or holds no decodable frame.
    """
    with _video_path(path, None) as (video_file, label):
        capture = _open(video_file, label)
        try:
            count, times, shape = 0, [], (0, 0)
            for time_s, frame in _decoded_frames(capture, label, source_fps):
                count += 1
                times = [*times[-1:], time_s]
                shape = frame.shape[:2]
        finally:
            capture.release()
    if count == 0:
        raise ImageReadError(label, "no frame could be decoded from the video")
    period = times[-1] - times[0] if len(times) == 2 else 0.0
    return VideoInfo(count, float(times[-1]), float(period), int(shape[0]), int(shape[1]))


def read_video_frame(
    path: str | os.PathLike,
    time_s: float,
    *,
    source_fps: float | None = None,
) -> np.ndarray:
    """The frame shown at ``time_s`` seconds: the last frame starting at or before that time.

    Returns an ``(H, W, 3)`` uint8 RGB array. Decodes sequentially from the start (exact but linear in
    ``time_s``; fine for the short clips of a manifest).

    Raises:
        ValueError: for a ``time_s`` that is negative or not finite.
        ImageReadError: naming the file, when it cannot be opened or ``time_s`` is past the clip's end
            (the message gives the clip's length).
    """
    if not (isinstance(time_s, (int, float)) and math.isfinite(time_s) and time_s >= 0):
        raise ValueError(f"time_s must be a finite number of seconds >= 0, got {time_s!r}")
    with _video_path(path, None) as (video_file, label):
        capture = _open(video_file, label)
        try:
            chosen: np.ndarray | None = None
            last_time = None
            frame_period = None
            for frame_time, frame in _decoded_frames(capture, label, source_fps):
                if last_time is not None:
                    frame_period = frame_time - last_time
                if frame_time > time_s + 5e-7:
                    break
                chosen, last_time = frame, frame_time
            else:
                # Ran off the end: time_s is valid only while the last frame is still showing.
                if chosen is not None and frame_period is not None and time_s >= last_time + frame_period:
                    raise ImageReadError(
                        label,
                        f"time_s = {time_s} s is past the end of the clip (last frame at {last_time:.3f} s)",
                    )
        finally:
            capture.release()
    if chosen is None:
        raise ImageReadError(label, f"no frame could be decoded at or before t = {time_s} s")
    return _bgr_to_rgb(chosen)


def read_video_frames(
    path: str | os.PathLike,
    times: Sequence[float],
    *,
    source_fps: float | None = None,
) -> dict[float, np.ndarray]:
    """The frames shown at each of ``times`` (seconds), decoded in one sequential pass.

    Each frame is what :func:`read_video_frame` gives for that time (the last frame starting at or
    before it), as an ``(H, W, 3)`` uint8 RGB array, keyed by the time as given. A time past the end of
    the clip has no entry, so a caller can name it; the pass stops after the last time asked for.

    Raises:
        ValueError: for a time that is negative or not finite.
        ImageReadError: naming the file, when it cannot be opened or holds no decodable frame.
    """
    wanted = sorted({float(t) for t in times})
    for time_s in wanted:
        if not (math.isfinite(time_s) and time_s >= 0):
            raise ValueError(f"time_s must be a finite number of seconds >= 0, got {time_s!r}")
    found: dict[float, np.ndarray] = {}
    with _video_path(path, None) as (video_file, label):
        capture = _open(video_file, label)
        try:
            chosen: np.ndarray | None = None
            chosen_rgb: np.ndarray | None = None
            last_time = frame_period = None
            position = 0
            for frame_time, frame in _decoded_frames(capture, label, source_fps):
                if last_time is not None:
                    frame_period = frame_time - last_time
                while position < len(wanted) and frame_time > wanted[position] + 5e-7:
                    if chosen is not None:
                        chosen_rgb = _bgr_to_rgb(chosen) if chosen_rgb is None else chosen_rgb
                        found[wanted[position]] = chosen_rgb
                    position += 1
                if position == len(wanted):
                    break
                chosen, chosen_rgb, last_time = frame, None, frame_time
            else:
                if chosen is None:
                    raise ImageReadError(label, "no frame could be decoded from the video")
                # Ran off the end: the last frame is shown until its period is over.
                for time_s in wanted[position:]:
                    if frame_period is None or time_s < last_time + frame_period:
                        chosen_rgb = _bgr_to_rgb(chosen) if chosen_rgb is None else chosen_rgb
                        found[time_s] = chosen_rgb
        finally:
            capture.release()
    return found
