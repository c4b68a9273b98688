"""Folder and manifest loading: every problem reported at once, with file and row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from painwatch.data import (
    PROBLEM_KINDS,
    DataValidationError,
    FrameRecord,
    dataset_hash,
    load_frame,
    load_records,
    parse_label,
    read_image,
    validate_source,
)


def _write_image(path: Path, seed: int, size: tuple[int, int] = (40, 50)) -> Path:
    """A small RGB PNG with unique content per seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _good_folder(root: Path) -> Path:
    seed = 0
    for individual in ("m01", "m02"):
        for label in ("pain", "no_pain"):
            for k in range(2):
                seed += 1
                _write_image(root / individual / label / f"f{k}.png", seed)
    return root


def test_parse_label() -> None:
    assert [parse_label(v) for v in ("pain", " PAIN ", "1", 1, "no_pain", "No-Pain", "0", 0)] == [
        1,
        1,
        1,
        1,
        0,
        0,
        0,
        0,
    ]
    for bad in ("happy", "2", 2, "", True):
        with pytest.raises(ValueError, match="unknown label"):
            parse_label(bad)


def test_good_folder_loads_every_frame(tmp_path: Path) -> None:
    root = _good_folder(tmp_path / "data")
    (root / "README.md").write_text("notes")  # top-level notes are allowed and reported as ignored
    (root / "m01" / "pain" / ".DS_Store").write_bytes(b"\0")
    (root / "m09" / "pain").mkdir(parents=True)  # an individual without frames yet
    report = validate_source(root)
    assert report.ok, report.format()
    assert report.layout == "folder"
    assert report.usable_frames == report.total_frames == 8
    assert report.counts() == {"m01": {"no_pain": 2, "pain": 2}, "m02": {"no_pain": 2, "pain": 2}}
    assert any("hidden" in note for note in report.notes)
    assert any("README.md" in note for note in report.notes)
    assert any("no frames" in note and "m09" in note for note in report.notes)
    records = load_records(root)
    assert len(records) == 8 and all(isinstance(r, FrameRecord) for r in records)
    assert {r.label for r in records} == {0, 1}
    assert records[0].row is None and records[0].box is None
    assert "8 of 8 frames usable from 2 individual(s)" in report.format()
    assert report.to_dict()["counts"]["m02"]["pain"] == 2


def test_bad_folder_reports_every_problem_at_once(tmp_path: Path) -> None:
    root = _good_folder(tmp_path / "data")
    (root / "m01" / "pain" / "empty.png").write_bytes(b"")
    (root / "m01" / "pain" / "text.jpg").write_text("not an image")
    good = (root / "m01" / "pain" / "f0.png").read_bytes()
    (root / "m01" / "no_pain" / "truncated.png").write_bytes(
        _write_image(tmp_path / "big.png", 99, (80, 80)).read_bytes()[:300]
    )
    (root / "m02" / "no_pain" / "copy.png").write_bytes(good)  # duplicate of m01/pain/f0.png
    _write_image(root / "m02" / "happy" / "x.png", 50)  # unknown label folder
    _write_image(root / "m03" / "pain" / "only.png", 51)  # one class only
    (root / "m02" / "pain" / "clip.mp4").write_bytes(b"\0" * 10)  # unsupported in the folder layout
    _write_image(root / "m02" / "stray.png", 52)  # misplaced
    _write_image(root / "loose.png", 53)  # misplaced at top level

    report = validate_source(root)
    assert not report.ok
    kinds = sorted(p.kind for p in report.problems)
    assert kinds == sorted(
        [
            "unreadable_image",
            "unreadable_image",
            "unreadable_image",
            "duplicate_frame",
            "unknown_label",
            "single_class_individual",
            "unsupported_file",
            "misplaced_file",
            "misplaced_file",
        ]
    )
    assert set(kinds) <= set(PROBLEM_KINDS)
    by_file = {Path(p.file).name: p for p in report.problems if p.file}
    assert "empty" in by_file["empty.png"].message
    assert "not an image" in by_file["text.jpg"].message
    assert "truncated" in by_file["truncated.png"].message or "corrupt" in by_file["truncated.png"].message
    assert "f0.png" in by_file["copy.png"].message
    assert "happy" in by_file["happy"].message
    assert "m03" in by_file["m03"].message
    assert "video" in by_file["clip.mp4"].message
    # Nothing dropped silently: every listed image is either usable or has a problem.
    assert report.usable_frames == 8 + 1  # the good ones plus m03's single frame
    assert (
        report.total_frames == 8 + 3 + 1 + 1 + 1 + 1 + 1
    )  # good, 3 unreadable, copy, happy, m03, 2 misplaced
    with pytest.raises(DataValidationError) as caught:
        load_records(root)
    message = str(caught.value)
    for name in (
        "empty.png",
        "text.jpg",
        "truncated.png",
        "copy.png",
        "happy",
        "m03",
        "clip.mp4",
        "stray.png",
        "loose.png",
    ):
        assert name in message
    assert caught.value.report is not None and len(caught.value.problems) == len(report.problems)
    # The single-class check can be switched off; the other problems remain.
    relaxed = validate_source(root, require_both_classes=False)
    assert "single_class_individual" not in {p.kind for p in relaxed.problems}


def _manifest(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "frames.csv"
    path.write_text(text)
    return path


def test_manifest_with_boxes_and_relative_paths(tmp_path: Path) -> None:
    for k in range(4):
        _write_image(tmp_path / "img" / f"{k}.png", k, (40, 50))
    absolute = (tmp_path / "img" / "3.png").resolve()
    path = _manifest(
        tmp_path,
        "Path,Individual,Label,x0,y0,x1,y1,comment\n"
        "img/0.png,a,pain,5,5,25,30,first\n"
        "img/1.png,a,No_Pain,,,,,\n"
        "img/2.png,b,1,0,0,50,40,\n"
        f"{absolute},b,0,10,10,20,20,\n",
    )
    report = validate_source(path)
    assert report.ok, report.format()
    assert report.layout == "manifest"
    records = report.records
    assert [r.row for r in records] == [2, 3, 4, 5]
    assert records[0].box == (5, 5, 25, 30) and records[1].box is None
    assert records[0].path == tmp_path / "img" / "0.png"
    assert any("comment" in note for note in report.notes)
    crop = load_frame(records[0], margin=0)
    assert crop.shape == (25, 20, 3)
    np.testing.assert_array_equal(crop, read_image(records[0].path)[5:30, 5:25])
    # A folder holding manifest.csv is read through it.
    (tmp_path / "manifest.csv").write_text(path.read_text())
    through_folder = validate_source(tmp_path)
    assert through_folder.layout == "manifest" and through_folder.ok
    assert not any("not listed" in note for note in through_folder.notes)
    # Images the manifest does not list are not used, and the report says so.
    _write_image(tmp_path / "img" / "extra.png", 77)
    notes = validate_source(tmp_path).notes
    assert any("1 image file(s)" in note and "extra.png" in note for note in notes)


def test_bad_manifest_reports_each_row(tmp_path: Path) -> None:
    _write_image(tmp_path / "ok_a_pain.png", 1)
    _write_image(tmp_path / "ok_a_none.png", 2)
    _write_image(tmp_path / "ok_b.png", 3)
    (tmp_path / "broken.png").write_text("nope")
    path = _manifest(
        tmp_path,
        "path,individual,label,x0,y0,x1,y1\n"
        "ok_a_pain.png,a,pain,,,,\n"  # row 2 fine
        "ok_a_none.png,a,no_pain,0,0,60,10\n"  # row 3: box outside the 50x40 image
        "missing.png,a,pain,,,,\n"  # row 4: missing file
        "ok_b.png,b,sad,,,,\n"  # row 5: unknown label
        "broken.png,b,pain,,,,\n"  # row 6: not an image
        "ok_a_pain.png,c,pain,,,,\n"  # row 7: duplicate of row 2
        "ok_b.png,,pain,,,,\n"  # row 8: empty individual
        "ok_b.png,b,pain,1,2,,\n"  # row 9: partial box
        ",b,pain,,,,\n"  # row 10: no path
        "ok_b.png,b,pain\n",  # row 11: wrong field count
    )
    report = validate_source(path)
    found = {(p.row, p.kind) for p in report.problems}
    expected = {
        (3, "bad_box"),
        (4, "missing_file"),
        (5, "unknown_label"),
        (6, "unreadable_image"),
        (7, "duplicate_frame"),
        (8, "bad_row"),
        (9, "bad_box"),
        (10, "bad_row"),
        (11, "bad_row"),
    }
    assert expected <= found, report.format()
    assert report.usable_frames == 1
    assert report.total_frames == 10
    duplicate = next(p for p in report.problems if p.kind == "duplicate_frame")
    assert "row 2" in duplicate.message
    # Rows come out in order so a person can work down the list.
    rows = [p.row for p in report.problems if p.row is not None]
    assert rows == sorted(rows)
    text = report.format()
    assert "frames.csv, row 5" in text and "1 of 10 frames usable" in text


def test_manifest_missing_columns(tmp_path: Path) -> None:
    report = validate_source(_manifest(tmp_path, "file,individual\nx.png,a\n"))
    assert [p.kind for p in report.problems] == ["missing_columns"]
    assert "path" in report.problems[0].message and "label" in report.problems[0].message
    partial_box = validate_source(_manifest(tmp_path, "path,individual,label,x0,y0\n"))
    assert partial_box.problems[0].kind == "missing_columns"
    empty = validate_source(_manifest(tmp_path, ""))
    assert empty.problems[0].kind == "empty"
    assert validate_source(tmp_path / "nowhere").problems[0].kind == "missing_source"


def test_dataset_hash_tracks_content_labels_and_boxes(tmp_path: Path) -> None:
    records = load_records(_good_folder(tmp_path / "data"))
    reference = dataset_hash(records)
    assert len(reference) == 64
    assert dataset_hash(list(reversed(records))) == reference  # order does not matter
    moved = tmp_path / "elsewhere.png"
    moved.write_bytes(records[0].path.read_bytes())
    renamed = [FrameRecord(moved, records[0].individual, records[0].label), *records[1:]]
    assert dataset_hash(renamed) == reference  # file names do not matter, content does
    relabelled = [FrameRecord(records[0].path, records[0].individual, 1 - records[0].label), *records[1:]]
    assert dataset_hash(relabelled) != reference
    boxed = [
        FrameRecord(records[0].path, records[0].individual, records[0].label, box=(0, 0, 5, 5)),
        *records[1:],
    ]
    assert dataset_hash(boxed) != reference
    _write_image(records[1].path, 1234)  # new pixels in the same file
    assert dataset_hash(records) != reference


def test_frame_record_checks_its_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="label"):
        FrameRecord(tmp_path / "x.png", "a", 2)
    with pytest.raises(ValueError, match="individual"):
        FrameRecord(tmp_path / "x.png", " ", 1)
    with pytest.raises(ValueError, match="empty"):
        FrameRecord(tmp_path / "x.png", "a", 1, box=(5, 5, 2, 9))
    record = FrameRecord(str(tmp_path / "x.png"), "a", 1, row=7)
    assert isinstance(record.path, Path) and record.label_name == "pain" and "row 7" in record.where


def test_load_frame_uses_detector_and_checks_its_box(tmp_path: Path) -> None:
    path = _write_image(tmp_path / "frame.png", 3, (40, 50))
    record = FrameRecord(path, "a", 1)
    full = load_frame(record)
    assert full.shape == (40, 50, 3)
    calls = []

    def detector(image: np.ndarray):
        calls.append(image.shape)
        return (10, 10, 30, 20)

    crop = load_frame(record, detector=detector, margin=0)
    assert calls == [(40, 50, 3)]
    np.testing.assert_array_equal(crop, full[10:20, 10:30])
    np.testing.assert_array_equal(load_frame(record, detector=lambda image: None), full)
    with pytest.raises(ValueError, match=r"frame\.png.*outside"):
        load_frame(record, detector=lambda image: (0, 0, 500, 20))
    # A box given in the record wins over the detector.
    boxed = FrameRecord(path, "a", 1, box=(0, 0, 10, 10))
    assert load_frame(boxed, detector=detector, margin=0).shape == (10, 10, 3)
