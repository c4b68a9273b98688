"""Hashes that identify frames and data sets: SHA-256 of file contents, never of paths.

Both digests are stored by runs (a bundle's ``data_hash``, a LOIO run's ``config.json``) and compared
on resume, so their text must never change for the same data.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from painwatch.io import sha256_file

if TYPE_CHECKING:  # hashing stays light: LOIO's command module imports it when ``painwatch --help`` runs
    from painwatch.data.records import FrameRecord

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Lower-case hex SHA-256 of a file's bytes (:func:`painwatch.io.sha256_file`).

    Cached per resolved path, size and modification time (ns), so validation, the data hash and the
    LOIO digest read each file once; a rewritten file is hashed again.

    Raises:
        OSError: (``FileNotFoundError``, ...) when the file cannot be read.
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    digest = _HASH_CACHE.get(key)
    if digest is None:
        digest = sha256_file(resolved)
        _HASH_CACHE[key] = digest
    return digest


def dataset_hash(records: Iterable[FrameRecord]) -> str:
    """SHA-256 identifying a data set: over each frame's file content, label, individual, face box
    and video time.

    The hash does not depend on the order of the records nor on file names or folders (renaming or
    moving files keeps it), and changes when any pixel file, label, individual assignment or box
    changes.

    Raises:
        FileNotFoundError: when a record's file is missing.
    """
    entries = []
    for record in records:
        content = file_sha256(record.path)
        time_text = "" if record.time_s is None or not record.from_video else repr(float(record.time_s))
        box_text = "" if record.box is None else ",".join(map(str, record.box))
        entries.append("\t".join((content, time_text, record.individual, str(record.label), box_text)))
    hasher = hashlib.sha256(b"painwatch-dataset-v1\n")
    for entry in sorted(entries):
        hasher.update(entry.encode("utf-8") + b"\n")
    return hasher.hexdigest()


def records_digest(records: Sequence[FrameRecord]) -> str:
    """SHA-256 over the **ordered** ``(file content, individual, label, time_s)`` entries of ``records``.

    Unlike :func:`dataset_hash` it depends on the order: it fixes which index is which frame (LOIO
    folds are index sets), wherever the data folder lives (file contents, not paths, identify frames).

    Raises:
        FileNotFoundError: when a record's file is missing.
    """
    hasher = hashlib.sha256(b"painwatch-loio-records-v2\n")
    for record in records:
        hasher.update(
            f"{file_sha256(record.path)}\t{record.individual}\t{record.label}\t{record.time_s}\n".encode()
        )
    return hasher.hexdigest()
