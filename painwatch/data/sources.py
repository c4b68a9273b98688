"""Loading a data source: a folder ``DATA/<individual>/<label>/*`` or a manifest CSV, validated, as
:class:`~painwatch.data.records.FrameRecord` objects (docs/design.md, "The clinical pipeline")."""

from __future__ import annotations

import os
from collections.abc import Sequence

from painwatch.data.errors import DataValidationError
from painwatch.data.records import FrameRecord
from painwatch.data.validation import validate_source


def load_records(
    source: str | os.PathLike | Sequence[FrameRecord],
    *,
    check_images: bool = True,
    require_both_classes: bool = True,
) -> list[FrameRecord]:
    """The records of a data folder or manifest CSV, after :func:`validate_source`.

    A list of :class:`FrameRecord` is returned as is (a copy), so callers may pass either.

    Raises:
        DataValidationError: when validation finds any problem; its message lists every problem with
            file and row, and ``error.report`` holds the full report.
    """
    if isinstance(source, (list, tuple)):
        if not all(isinstance(r, FrameRecord) for r in source):
            raise TypeError("a sequence source must hold FrameRecord objects only")
        return list(source)
    report = validate_source(source, check_images=check_images, require_both_classes=require_both_classes)
    if not report.ok:
        raise DataValidationError(report.source, report.problems, report)
    return report.records
