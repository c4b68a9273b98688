"""Where data come from: whether a data source holds synthetic frames.

Training, LOIO and certification record the answer in what they write (bundle, metrics, report), so
that numbers measured on drawn frames are never mistaken for numbers about real macaques. They all
ask :func:`is_synthetic`, so they all give the same answer for the same source.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from painwatch.data.records import MANIFEST_NAME
from painwatch.data.synthetic import README_MARKER

__all__ = ["SYNTHETIC_COLUMN", "is_synthetic"]

SYNTHETIC_COLUMN = "synthetic"
"""Manifest column that marks a row's frame as synthetic (``true``, ``1`` or ``yes``, any case)."""

_TRUE_WORDS = frozenset({"true", "1", "yes"})


def is_synthetic(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` (a data folder or a manifest CSV) holds synthetic frames.

    True when the folder (the manifest's folder for a CSV) has a ``README.md`` carrying the demo
    generator's :data:`~painwatch.data.synthetic.README_MARKER`, or when the manifest (the CSV itself,
    or the folder's ``manifest.csv``) has a :data:`SYNTHETIC_COLUMN` column (header matched like the
    other manifest columns: spaces and case ignored) that is true in **any** row: one synthetic frame
    makes the data set synthetic. False otherwise, e.g. for a plain ``DATA/<individual>/<label>/``
    folder or a source that does not exist.

    Raises:
        OSError: naming the file, when the README or the manifest exists but cannot be read.
        csv.Error: when the manifest is not CSV (:func:`~painwatch.data.validation.validate_source`
            reports that with the row).
    """
    root = Path(source)
    manifest = root if root.is_file() else root / MANIFEST_NAME
    readme = manifest.parent / "README.md"
    if readme.is_file() and README_MARKER in readme.read_text(encoding="utf-8", errors="replace"):
        return True
    if not manifest.is_file() or manifest.suffix.lower() != ".csv":
        return False
    with open(manifest, newline="", encoding="utf-8-sig", errors="replace") as handle:
        reader = csv.reader(handle)
        header = [column.strip().lower() for column in next(reader, [])]
        if SYNTHETIC_COLUMN not in header:
            return False
        column = header.index(SYNTHETIC_COLUMN)
        return any(len(row) > column and row[column].strip().lower() in _TRUE_WORDS for row in reader)
