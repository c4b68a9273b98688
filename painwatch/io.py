"""Files painwatch writes and hashes: atomic writes (bytes, text, JSON) and the SHA-256 of a file.

Atomic: a reader sees the old file or the complete new one, never a partial one. Every result
painwatch writes (reports, metrics, model bundles' ``model.json``, the demo set's manifest, experiment
results) goes through these, so a crash mid-write loses nothing that was there before.

JSON has one policy (:func:`to_json_text`): strict JSON (RFC 8259) that any reader can parse, so
NaN and infinities - not JSON - are written as ``null``; NumPy scalars and arrays become Python
numbers and lists, ``Path`` objects strings; indent 2, keys in insertion order, a final newline.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "sha256_file",
    "to_json_text",
]


def _default_file_mode(target: Path) -> int:
    """The mode of the file being replaced, else 0666 less the process's umask (as ``open`` gives)."""
    try:
        return target.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``).

    Creates missing parent folders. The file gets the mode of the file it replaces, or the mode a plain
    ``open`` would give. On any failure the old file (if any) is untouched and no temporary file is
    left. Returns the path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp makes the file private (0600); give it the permissions a plain write would have.
        os.chmod(temporary, _default_file_mode(target))
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write a {type(value).__name__} to JSON: {value!r}")


def _replace_non_finite(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _replace_non_finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_non_finite(item) for item in value]
    if isinstance(value, np.ndarray):
        return _replace_non_finite(value.tolist())
    return value


def to_json_text(data: Any) -> str:
    """``data`` as strict JSON text: indent 2, keys in insertion order, a final newline.

    NaN and +-infinity (Python or NumPy floats, at any depth) are written as ``null``; NumPy scalars
    and arrays become numbers and lists, ``Path`` objects strings.

    Raises:
        TypeError: naming the value, for anything else JSON cannot hold.
    """
    return json.dumps(_replace_non_finite(data), indent=2, default=_json_default, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as JSON (:func:`to_json_text`: NaN and infinities become ``null``) atomically.

    The text is built before the file is touched, so data JSON cannot hold leave the old file as it
    was. Returns the path.
    """
    return atomic_write_text(path, to_json_text(data))


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Lower-case hex SHA-256 of a file's bytes, read in chunks of ``chunk_size`` bytes.

    Raises:
        OSError: (``FileNotFoundError``, ...) naming the file when it cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
