"""Splits by individual and the hashes runs are resumed by: same seeds, same splits; same data, same text."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest

from painwatch.data import (
    FrameRecord,
    dataset_hash,
    file_sha256,
    held_out_individuals,
    loio_folds,
    records_digest,
    split_by_individual,
)
from painwatch.data.hashing import _HASH_CACHE

NAMES = [f"syn-m{i:02d}" for i in range(1, 22)]  # the demo set's 21 individuals


class _Frame:
    def __init__(self, individual: str) -> None:
        self.individual = individual


def test_splits_for_the_same_seeds_are_the_ones_saved_runs_were_made_with() -> None:
    # Values recorded before the splits moved into painwatch.data.splits: a change here changes the
    # README's worked example and breaks --resume of existing LOIO runs.
    frames = [_Frame(name) for name in NAMES for _ in range(2)]
    _, validation = split_by_individual(frames, 0.2, 0)
    assert sorted({f.individual for f in validation}) == ["syn-m02", "syn-m09", "syn-m14", "syn-m21"]
    groups = [f.individual for f in frames]
    folds = loio_folds(groups, inner_val_fraction=0.2, seed=0)
    assert [fold.individuals(groups, "validation") for fold in folds[:3]] == [
        ["syn-m03", "syn-m12", "syn-m13", "syn-m21"],
        ["syn-m11", "syn-m13", "syn-m15", "syn-m20"],
        ["syn-m01", "syn-m07", "syn-m10", "syn-m15"],
    ]
    assert held_out_individuals(NAMES, 5, 0) == ["syn-m06", "syn-m07", "syn-m10", "syn-m12", "syn-m15"]
    assert held_out_individuals(groups, 5, 0) == held_out_individuals(NAMES, 5, 0)  # repeats do not count


def test_loio_fold_settings_are_keyword_only() -> None:
    parameters = inspect.signature(loio_folds).parameters
    assert [p for p in parameters if parameters[p].kind is inspect.Parameter.KEYWORD_ONLY] == [
        "inner_val_individuals",
        "inner_val_fraction",
        "seed",
    ]
    with pytest.raises(TypeError):
        loio_folds(["a", "b", "c"], None, 0.2, 0)  # type: ignore[misc]


def _records(root: Path) -> list[FrameRecord]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.png").write_bytes(b"frame a")
    (root / "b.png").write_bytes(b"frame b")
    (root / "clip.mp4").write_bytes(b"clip")
    return [
        FrameRecord(root / "a.png", "m1", 1, box=(0, 0, 4, 4)),
        FrameRecord(root / "b.png", "m2", 0),
        FrameRecord(root / "clip.mp4", "m2", 1, video=str(root / "clip.mp4"), time_s=0.5),
    ]


def test_hashes_keep_the_text_saved_runs_and_bundles_hold(tmp_path: Path) -> None:
    # Recorded before hashing moved into painwatch.data.hashing: bundles store dataset_hash and LOIO runs
    # store records_digest in config.json; --resume compares them, so they must never change.
    records = _records(tmp_path / "here")
    assert dataset_hash(records) == "9644d6c0e335a683cb495e3133d3f33744fa3fea67439430422535702b4d0d01"
    assert records_digest(records) == "4000c8ab60d924f5bec0263d96e2fc4c39a9d6b37e111481107ecfaa0462d300"
    moved = _records(tmp_path / "elsewhere")  # same contents in another folder: same hashes
    assert dataset_hash(moved) == dataset_hash(records) and records_digest(moved) == records_digest(records)
    assert dataset_hash(records[::-1]) == dataset_hash(records)  # the data set hash ignores order
    assert records_digest(records[::-1]) != records_digest(records)  # the LOIO digest fixes it


def test_file_sha256_is_cached_until_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "frame.png"
    path.write_bytes(b"one")
    first = file_sha256(path)
    assert first == "7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed"
    assert any(key[0] == str(path.resolve()) for key in _HASH_CACHE)
    path.write_bytes(b"two")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a new mtime even on coarse clocks
    assert file_sha256(path) == "3fc4ccfe745870e2c0d99f71f30ff0656c8dedd41cc1d7d3d376b0dbe685e2f3"
    with pytest.raises(FileNotFoundError):
        file_sha256(tmp_path / "missing.png")
