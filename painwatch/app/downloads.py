"""The page's downloads: a CSV and a JSON file of a batch's answers, each row carrying its provenance."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from painwatch import __version__
from painwatch.app.uploads import FileProblem, Frame, check_aligned
from painwatch.inference.rows import CSV_COLUMNS_FIXED, CSV_COLUMNS_TAIL, csv_columns, csv_value, result_row
from painwatch.io import to_json_text

__all__ = ["CSV_COLUMNS_FIXED", "CSV_COLUMNS_TAIL", "Provenance", "csv_columns", "download_name",
           "results_csv", "results_json"]


@dataclass(frozen=True)
class Provenance:
    """What produced a batch of results; goes into every download.

    ``certification`` holds the settings in force (the Predictor's ``settings.to_dict()``: method,
    sigma, alpha, n = the per-frame budget of estimation draws, n0, sequential, ...).
    """

    bundle_path: str
    weights_sha256: str
    architecture: str
    classes: tuple[str, ...]
    certification: Mapping[str, Any]
    seed: int | None
    gate_passed: bool | None
    in_distribution: Mapping[str, Any] | None = None

    @classmethod
    def from_predictor(cls, predictor: Any) -> Provenance:
        """Provenance of a :class:`painwatch.inference.Predictor` (bundle identity, settings, seed, and
        whether every gate verdict it holds passed; None when it was never certified; the description
        of its in-distribution check, or None)."""
        metadata = predictor.metadata
        verdicts = list(predictor.gates.values())
        return cls(
            bundle_path=str(predictor.bundle_path),
            weights_sha256=str(metadata.weights_sha256),
            architecture=str(metadata.architecture),
            classes=tuple(predictor.classes),
            certification=dict(predictor.settings.to_dict()),
            seed=predictor.seed,
            gate_passed=all(v.passed for v in verdicts) if verdicts else None,
            in_distribution=(metadata.in_distribution.to_dict()
                             if getattr(predictor, "in_distribution", None) is not None else None),
        )

    @property
    def budget(self) -> int | None:
        value = self.certification.get("n")
        return None if value is None else int(value)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bundle": {
                "path": self.bundle_path,
                "weights_sha256": self.weights_sha256,
                "architecture": self.architecture,
                "classes": list(self.classes),
                "gate_passed": self.gate_passed,
                "in_distribution": dict(self.in_distribution) if self.in_distribution else None,
            },
            "certification": {**dict(self.certification), "seed": self.seed},
        }


def _row(frame: Frame, result: Any, provenance: Provenance) -> dict[str, Any]:
    return result_row(result, frame=frame.name, file=frame.source, time_s=frame.time_s,
                      classes=provenance.classes, budget=provenance.budget, seed=provenance.seed,
                      weights_sha256=provenance.weights_sha256)


def results_csv(frames: Sequence[Frame], results: Sequence[Any], provenance: Provenance) -> bytes:
    """UTF-8 CSV, one row per frame with the Predictor's values at full precision and provenance.

    Every row carries the bundle's weights hash and the certification settings, so a row copied
    elsewhere still says where it came from. Empty ``time_s`` for still frames.
    """
    check_aligned(frames, results)
    buffer = io.StringIO()
    columns = csv_columns(provenance.classes)
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for frame, result in zip(frames, results, strict=True):
        row = _row(frame, result, provenance)
        writer.writerow({key: csv_value(row[key]) for key in columns})
    return buffer.getvalue().encode("utf-8")


def results_json(
    frames: Sequence[Frame],
    results: Sequence[Any],
    provenance: Provenance,
    *,
    problems: Sequence[FileProblem] = (),
    created: datetime | None = None,
) -> bytes:
    """UTF-8 JSON: provenance, the per-frame results (the Predictor's fields) and the file problems."""
    check_aligned(frames, results)
    records = []
    for frame, result in zip(frames, results, strict=True):
        # FrameResult.to_dict turns NaN (e.g. an undefined bound) into null: JSON has no NaN.
        record = result.to_dict() if hasattr(result, "to_dict") else dataclasses.asdict(result)
        record.update({"frame": frame.name, "file": frame.source, "time_s": frame.time_s})
        records.append(record)
    document = {
        "painwatch_version": __version__,
        "created": (created or datetime.now(UTC)).isoformat(timespec="seconds"),
        **provenance.as_dict(),
        "frames": records,
        "problems": [dataclasses.asdict(problem) for problem in problems],
    }
    return to_json_text(document).encode("utf-8")


def download_name(stem: str, created: datetime | None = None) -> str:
    """A file name such as ``painwatch-results-20260101-120000``: sortable, no spaces."""
    stamp = (created or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return f"{stem}-{stamp}"
