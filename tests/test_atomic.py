"""painwatch.atomic: complete files or none, with the permissions a plain write gives."""

from __future__ import annotations

import os
import stat

import pytest

from painwatch.atomic import atomic_write_bytes, atomic_write_text


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
