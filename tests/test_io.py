"""painwatch.io: complete files or none, with the permissions a plain write gives; one JSON policy."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from painwatch.io import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file, to_json_text


def test_new_file_gets_the_umask_mode_and_no_temporary_is_left(tmp_path):
    umask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "sub" / "result.json", "{}\n")
    finally:
        os.umask(umask)
    assert path.read_text() == "{}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


def test_replacing_keeps_the_existing_mode(tmp_path):
    path = tmp_path / "model.json"
    path.write_text("old")
    path.chmod(0o600)
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.csv"]


def test_json_writes_non_finite_floats_as_null_at_any_depth(tmp_path):
    data = {
        "nan": float("nan"),
        "inf": float("inf"),
        "nested": [{"low": -math.inf}, (np.float32("nan"), np.float64(0.25))],
        "array": np.array([1.0, np.nan]),
        "int": np.int64(3),
        "flag": np.bool_(True),
        "path": Path("a") / "b.png",
    }
    path = atomic_write_json(tmp_path / "metrics.json", data)
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n") and "NaN" not in text and "Infinity" not in text

    def refuse(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant}")

    assert json.loads(text, parse_constant=refuse) == {
        "nan": None,
        "inf": None,
        "nested": [{"low": None}, [None, 0.25]],
        "array": [1.0, None],
        "int": 3,
        "flag": True,
        "path": str(Path("a") / "b.png"),
    }
    assert to_json_text({"b": 1, "a": [1, 2]}) == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'


def test_json_that_cannot_be_written_leaves_the_old_file(tmp_path):
    path = atomic_write_json(tmp_path / "config.json", {"run": 1})
    with pytest.raises(TypeError, match="cannot write a object to JSON"):
        atomic_write_json(path, {"run": 2, "bad": object()})
    assert json.loads(path.read_text()) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_crash_mid_write_never_leaves_a_partial_file(tmp_path, monkeypatch, failing):
    path = atomic_write_json(tmp_path / "result.json", {"fold": 0, "accuracy": 0.5})
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError(f"simulated crash in os.{failing}")

    monkeypatch.setattr(os, failing, crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_json(path, {"fold": 0, "accuracy": float("nan"), "rows": list(range(10_000))})
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_json(tmp_path / "new.json", {"x": 1})
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no new file, no temporary


def test_sha256_file_reads_in_chunks(tmp_path):
    path = tmp_path / "weights.safetensors"
    data = bytes(range(256)) * 41  # not a multiple of the chunk size
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == expected and sha256_file(path, chunk_size=1000) == expected
    with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
        sha256_file(tmp_path / "missing.bin")
