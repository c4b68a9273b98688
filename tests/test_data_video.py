"""Video sampling on small clips written with cv2.VideoWriter, and manifest rows that point into clips."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from painwatch.data import (
    ImageReadError,
    load_frame,
    read_video_frame,
    records_from_video,
    sample_video,
    validate_source,
    video_info,
)

FPS = 10.0
FRAMES = 25


def _frame_colour(index: int) -> tuple[int, int, int]:
    """RGB colour of frame ``index`` in the test clip (red rises, blue falls)."""
    return (index * 10, 40, 250 - index * 10)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2.5 s, 10 fps MJPG clip in .avi whose frame i is flat colour _frame_colour(i)."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (64, 48))
    assert writer.isOpened()
    for index in range(FRAMES):
        red, green, blue = _frame_colour(index)
        writer.write(np.full((48, 64, 3), (blue, green, red), np.uint8))
    writer.release()
    return path


def _index_of(frame: np.ndarray) -> int:
    return round(float(frame[..., 0].mean()) / 10)


def test_sample_video_times_and_frames(clip: Path) -> None:
    samples = sample_video(clip, fps=4)
    times = [t for t, _ in samples]
    # Target times 0, 0.25, 0.5, ... each take the first frame at or after them (frames every 0.1 s).
    np.testing.assert_allclose(times, [0.0, 0.3, 0.5, 0.8, 1.0, 1.3, 1.5, 1.8, 2.0, 2.3], atol=1e-9)
    for time_s, frame in samples:
        assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
        assert _index_of(frame) == round(time_s * FPS)  # RGB order and the right frame
        np.testing.assert_allclose(frame[0, 0], _frame_colour(round(time_s * FPS)), atol=6)


def test_sampling_faster_than_the_clip_gives_every_frame_once(clip: Path) -> None:
    samples = sample_video(clip, fps=100)
    assert len(samples) == FRAMES
    assert [_index_of(frame) for _, frame in samples] == list(range(FRAMES))


def test_max_frames_stops_with_a_warning(clip: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = sample_video(clip, fps=10, max_frames=5)
    assert len(samples) == 5
    assert any("max_frames" in str(w.message) and "clip.avi" in str(w.message) for w in caught)


def test_source_fps_overrides_the_header(clip: Path) -> None:
    samples = sample_video(clip, fps=1, source_fps=5.0)  # pretend 5 fps: the 25 frames last 5 s
    assert [t for t, _ in samples] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [_index_of(f) for _, f in samples] == [0, 5, 10, 15, 20]


def test_clip_bytes_are_accepted(clip: Path) -> None:
    samples = sample_video(clip.read_bytes(), fps=2, name="upload.avi")
    assert len(samples) == 5


def test_read_video_frame_and_info(clip: Path) -> None:
    assert _index_of(read_video_frame(clip, 1.25)) == 12
    assert _index_of(read_video_frame(clip, 0)) == 0
    info = video_info(clip)
    assert info.frame_count == FRAMES and (info.height, info.width) == (48, 64)
    assert info.duration_s == pytest.approx(2.5)
    assert info.covers(2.45) and not info.covers(2.5)
    with pytest.raises(ImageReadError, match=r"clip\.avi: time_s = 3.0 s is past the end"):
        read_video_frame(clip, 3.0)
    with pytest.raises(ValueError, match="time_s"):
        read_video_frame(clip, -1)


def test_unreadable_clips_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"missing\.mp4: video file does not exist"):
        sample_video(tmp_path / "missing.mp4", fps=1)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.mp4: video file is empty"):
        sample_video(empty, fps=1)
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"this is not a video at all" * 10)
    with pytest.raises(ImageReadError, match=r"junk\.avi"):
        sample_video(junk, fps=1)
    with pytest.raises(ValueError, match="fps"):
        sample_video(junk, fps=0)
    with pytest.raises(ValueError, match="max_frames"):
        sample_video(junk, fps=1, max_frames=0)


def test_records_from_video_and_manifest_rows(clip: Path, tmp_path: Path) -> None:
    records = records_from_video(clip, "m01", "pain", fps=2)
    assert [r.time_s for r in records] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert all(r.from_video and r.label == 1 for r in records)
    assert _index_of(load_frame(records[2])) == 10

    still = tmp_path / "still.png"
    cv2.imwrite(str(still), np.full((48, 64, 3), 128, np.uint8))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "path,individual,label,x0,y0,x1,y1,video,time_s\n"
        f",m01,pain,,,,,{clip},0.5\n"  # row 2: frame from the clip
        f",m01,no_pain,0,0,32,24,{clip},1.0\n"  # row 3: with a face box
        f"still.png,m01,pain,,,,,{clip},2.0\n"  # row 4: still image with its provenance
        f",m01,pain,,,,,{clip},9.0\n"  # row 5: past the end of the clip
        f",m01,pain,,,,,{clip},\n"  # row 6: video without time_s
        f",m01,pain,,,,,{clip},-1\n"  # row 7: negative time
        f",m01,pain,,,,,{clip},0.5\n"  # row 8: same frame as row 2
        ",m01,pain,,,,,nowhere.avi,1\n"  # row 9: missing clip
    )
    report = validate_source(manifest)
    found = {(p.row, p.kind) for p in report.problems}
    assert found == {
        (5, "unreadable_video"),
        (6, "bad_time"),
        (7, "bad_time"),
        (8, "duplicate_frame"),
        (9, "missing_file"),
    }, report.format()
    assert [r.row for r in report.records] == [2, 3, 4]
    first, boxed, still_record = report.records
    assert first.from_video and _index_of(load_frame(first)) == 5
    assert load_frame(boxed, margin=0).shape == (24, 32, 3)
    assert not still_record.from_video and still_record.time_s == 2.0
    assert load_frame(still_record)[0, 0].tolist() == [128, 128, 128]


class _HeaderlessCapture:
    """Stands in for cv2.VideoCapture on a clip whose header has no frame rate (CAP_PROP_FPS = 0):
    the decoder's per-frame timestamps (CAP_PROP_POS_MSEC) are then the only clock."""

    def __init__(self, msec: list[float]) -> None:
        self.msec = msec
        self.index = -1

    def grab(self) -> bool:
        self.index += 1
        return self.index < len(self.msec)

    def retrieve(self) -> tuple[bool, np.ndarray]:
        return True, np.full((4, 4, 3), self.index, np.uint8)

    def get(self, prop: int) -> float:
        if prop == cv2.CAP_PROP_FPS:
            return 0.0
        if prop == cv2.CAP_PROP_POS_MSEC:
            return self.msec[self.index]
        return 0.0


def test_clips_without_a_frame_rate_use_decoder_timestamps() -> None:
    from painwatch.data.video import _decoded_frames

    frames = list(_decoded_frames(_HeaderlessCapture([0.0, 40.0, 80.0, 120.0]), "clip.mkv", None))
    assert [t for t, _ in frames] == pytest.approx([0.0, 0.04, 0.08, 0.12])
    assert [int(f[0, 0, 0]) for _, f in frames] == [0, 1, 2, 3]
    # No frame rate and no usable timestamps: a clear error that says how to go on.
    with pytest.raises(ImageReadError, match=r"clip\.mkv: .*source_fps"):
        list(_decoded_frames(_HeaderlessCapture([0.0, 0.0, 0.0]), "clip.mkv", None))
    # source_fps supplies the clock.
    frames = list(_decoded_frames(_HeaderlessCapture([0.0, 0.0, 0.0]), "clip.mkv", 2.0))
    assert [t for t, _ in frames] == [0.0, 0.5, 1.0]
