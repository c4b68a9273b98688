"""Records out and back in: a JSON document that moves or backs up animals and their checks between
machines (``painwatch records export|import``, the page's JSON download), and a CSV of an animal's
whole history, one row per frame.

The JSON document (``format: painwatch-records``, ``format_version`` 1) holds every animal with every
check: when, by whom, the notes, the model used (weights hash, certification settings, gate verdicts,
model card) and every frame's answer under the field names of :class:`painwatch.inference.FrameResult`,
with its thumbnail as base64 JPEG when one was kept. Importing it is one transaction: checks already
there (same ``uid``) are skipped, so importing the same file twice changes nothing; a file with one bad
entry is refused whole, with the entry named.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from painwatch import __version__
from painwatch.inference.predict import FrameResult
from painwatch.inference.rows import DETAIL_COLUMNS, csv_columns, csv_value, result_row
from painwatch.io import to_json_text
from painwatch.records.database import Database, RecordsError
from painwatch.records.service import (
    RESULT_FIELDS,
    CheckSummary,
    FrameRecord,
    ModelUsed,
    animal_key,
    find_animal,
    frame_record,
    frame_row,
    new_check,
    normalize_animal_code,
    summary_of,
)
from painwatch.records.settings import FRAME_POLICIES
from painwatch.records.tables import Animal, Check

FORMAT = "painwatch-records"
FORMAT_VERSION = 1
HISTORY_CSV_COLUMNS: tuple[str, ...] = (
    "animal", "check_uid", "check_saved_utc", "check_analysed_utc", "recorded_by", "notes",
)
"""The first columns of the history CSV; the rest are the page's download columns for each frame."""


@dataclass(frozen=True)
class ImportOutcome:
    animals_created: int
    checks_added: int
    checks_skipped: int


def _time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


# --------------------------------------------------------------------------- export


def _frame_document(record: FrameRecord) -> dict[str, Any]:
    document = {"position": record.position, "source": record.source, **record.result.to_dict()}
    document["thumbnail_jpeg_base64"] = (None if record.thumbnail is None
                                         else base64.b64encode(record.thumbnail).decode("ascii"))
    return document


def _check_document(summary: CheckSummary, frames: Sequence[FrameRecord], *,
                    thumbnails: bool) -> dict[str, Any]:
    model = summary.model
    return {
        "uid": summary.uid,
        "created_at": _time(summary.created_at),
        "analysed_at": _time(summary.analysed_at),
        "recorded_by": summary.recorded_by,
        "notes": summary.notes,
        "painwatch_version": summary.painwatch_version,
        "frames_kept": summary.frames_kept if thumbnails else "none",
        "model": {
            "bundle_path": model.bundle_path,
            "weights_sha256": model.weights_sha256,
            "architecture": model.architecture,
            "classes": list(model.classes),
            "certification": dict(model.certification),
            "seed": model.seed,
            "gate_passed": model.gate_passed,
            "model_card": dict(model.model_card),
        },
        "problems": [dict(p) for p in summary.problems],
        "frames": [_frame_document(f if thumbnails else FrameRecord(f.position, f.source, f.result, None))
                   for f in frames],
    }


def export_records(
    database: Database, *, animals: Sequence[str] = (), thumbnails: bool = True
) -> dict[str, Any]:
    """The export document of ``animals`` (every animal when empty), from one consistent snapshot.

    Raises ``RecordsError`` naming an animal that is not in the records.
    """
    with database.read() as session:
        if animals:
            rows = []
            for code in animals:
                row = find_animal(session, code)
                if row is None:
                    raise RecordsError(f"there is no animal {normalize_animal_code(code)!r} in the records "
                                       f"{database.url}")
                rows.append(row)
        else:
            rows = list(session.scalars(select(Animal).order_by(Animal.code_key)))
        documents = []
        for row in rows:
            checks = [_check_document(summary_of(c), [frame_record(f) for f in c.frames],
                                      thumbnails=thumbnails) for c in row.checks]
            documents.append({"code": row.code, "created_at": _time(row.created_at),
                              "created_by": row.created_by, "checks": checks})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "painwatch_version": __version__,
        "schema_revision": database.revision,
        "exported_at": _time(datetime.now(UTC)),
        "animals": documents,
    }


def export_json(database: Database, *, animals: Sequence[str] = (), thumbnails: bool = True) -> bytes:
    """:func:`export_records` as UTF-8 JSON text."""
    return to_json_text(export_records(database, animals=animals, thumbnails=thumbnails)).encode("utf-8")


def history_csv(checks: Sequence[CheckSummary], frames: Mapping[int, Sequence[FrameRecord]]) -> bytes:
    """UTF-8 CSV of an animal's history: one row per frame of every check (``frames[check_id]``), oldest
    check first, each row the check's columns (:data:`HISTORY_CSV_COLUMNS`) and then the page's download
    columns with the certificate's details."""
    classes: list[str] = []
    for check in checks:
        classes += [name for name in check.model.classes if name not in classes]
    columns = [*HISTORY_CSV_COLUMNS, *csv_columns(classes), *DETAIL_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", restval="")
    writer.writeheader()
    for check in checks:
        head = {"animal": check.animal, "check_uid": check.uid, "check_saved_utc": _time(check.created_at),
                "check_analysed_utc": _time(check.analysed_at), "recorded_by": check.recorded_by or "",
                "notes": check.notes}
        for record in frames[check.check_id]:
            row = result_row(record.result, frame=record.result.name, file=record.source,
                             time_s=record.result.time_s, classes=check.model.classes,
                             budget=check.model.certification.get("n"), seed=check.model.seed,
                             weights_sha256=check.model.weights_sha256)
            writer.writerow({**head, **{key: csv_value(value) for key, value in row.items()}})
    return buffer.getvalue().encode("utf-8")


# --------------------------------------------------------------------------- import


class _Reader:
    """Typed access to one entry of an import document; every error names the entry's path."""

    def __init__(self, value: Any, where: str, source: str) -> None:
        if not isinstance(value, Mapping):
            raise RecordsError(f"{source}: {where} must be an object, got {type(value).__name__}")
        self.value, self.where, self.source = value, where, source

    def fail(self, key: str, what: str) -> RecordsError:
        return RecordsError(f"{self.source}: {self.where}.{key} {what}, got {self.value.get(key)!r}")

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        value = self.value.get(key)
        if value is None and optional:
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(key, f"must be {'null or ' if optional else ''}{names}")
        return value

    def time(self, key: str) -> datetime:
        try:
            stamp = datetime.fromisoformat(self.get(key, str))
        except ValueError as error:
            raise self.fail(key, "must be an ISO time") from error
        if stamp.tzinfo is None:
            raise self.fail(key, "must say its time zone (UTC times end in +00:00)")
        return stamp

    def list(self, key: str) -> list[Any]:
        return self.get(key, list)


def _read_frame(value: Any, where: str, source: str) -> tuple[int, str, FrameResult, bytes | None]:
    entry = _Reader(value, where, source)
    floats = {"confidence", "radius", "radius_rms", "radius_grey_levels", "sigma", "alpha"}
    ints = {"class_index", "n", "forward_passes"}
    values: dict[str, Any] = {}
    for name in RESULT_FIELDS:
        if name in floats:
            values[name] = entry.get(name, float)
        elif name in ints:
            values[name] = entry.get(name, int)
        elif name in ("name", "label", "method"):
            values[name] = entry.get(name, str)
        elif name == "probabilities":
            probabilities = entry.get(name, dict)
            if not all(isinstance(v, int | float) and math.isfinite(v) for v in probabilities.values()):
                raise entry.fail(name, "must map class names to numbers")
            values[name] = {str(k): float(v) for k, v in probabilities.items()}
        elif name in ("time_s", "bound", "in_distribution_score", "in_distribution_threshold"):
            number = entry.get(name, float, optional=True)
            values[name] = math.nan if number is None and name == "bound" else number
        elif name == "noise_seed":
            values[name] = entry.get(name, int, optional=True)
        else:
            values[name] = entry.get(name, str, optional=True) or ("" if name == "classifier" else None)
    encoded = entry.get("thumbnail_jpeg_base64", str, optional=True)
    try:
        thumbnail = None if encoded is None else base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise entry.fail("thumbnail_jpeg_base64", "must be base64 text") from error
    return entry.get("position", int), entry.get("source", str), FrameResult(**values), thumbnail


def _read_check(value: Any, where: str, source: str) -> dict[str, Any]:
    entry = _Reader(value, where, source)
    model = _Reader(entry.get("model", dict), f"{where}.model", source)
    frames = [_read_frame(f, f"{where}.frames[{i}]", source) for i, f in enumerate(entry.list("frames"))]
    if not frames:
        raise entry.fail("frames", "must hold at least one frame")
    positions = [position for position, *_ in frames]
    if len(set(positions)) != len(positions):
        raise entry.fail("frames", "must give every frame its own position")
    kept = entry.get("frames_kept", str)
    if kept not in FRAME_POLICIES:
        raise entry.fail("frames_kept", f"must be one of {', '.join(FRAME_POLICIES)}")
    uid = entry.get("uid", str)
    if not (uid and len(uid) <= 32 and uid.isalnum()):
        raise entry.fail("uid", "must be the check's identifier (up to 32 letters and digits)")
    return {
        "uid": uid,
        "created_at": entry.time("created_at"),
        "analysed_at": entry.time("analysed_at"),
        "recorded_by": entry.get("recorded_by", str, optional=True),
        "notes": entry.get("notes", str),
        "painwatch_version": entry.get("painwatch_version", str),
        "frames_kept": kept,
        "problems": entry.list("problems"),
        "model": ModelUsed(
            model.get("bundle_path", str), model.get("weights_sha256", str), model.get("architecture", str),
            tuple(model.get("classes", list)), model.get("certification", dict),
            model.get("seed", int, optional=True), model.get("gate_passed", bool, optional=True),
            model.get("model_card", dict),
        ),
        "frames": frames,
    }


def read_export(document: Any, source: str = "the import file") -> list[dict[str, Any]]:
    """The animals of an export document, checked entry by entry (``RecordsError`` names the first bad
    one, with ``source`` as the file's name)."""
    top = _Reader(document, "the document", source)
    if document.get("format") != FORMAT:
        raise RecordsError(f"{source} is not a painwatch records export (format {document.get('format')!r}, "
                           f"expected {FORMAT!r})")
    version = top.get("format_version", int)
    if version > FORMAT_VERSION:
        raise RecordsError(f"{source} has records format version {version}, newer than this painwatch reads "
                           f"({FORMAT_VERSION}): import it with a newer painwatch")
    animals = []
    for i, value in enumerate(top.list("animals")):
        entry = _Reader(value, f"animals[{i}]", source)
        code = entry.get("code", str)
        try:
            code = normalize_animal_code(code)
        except RecordsError as error:
            raise RecordsError(f"{source}: animals[{i}].code: {error}") from error
        checks = [_read_check(c, f"animals[{i}].checks[{j}]", source)
                  for j, c in enumerate(entry.list("checks"))]
        animals.append({"code": code, "created_at": entry.time("created_at"),
                        "created_by": entry.get("created_by", str, optional=True), "checks": checks})
    return animals


def import_records(database: Database, document: Any, *, source: str = "the import file") -> ImportOutcome:
    """Add the animals and checks of an export document to the records, in one transaction.

    Animals are matched by ID (without regard to case) and created when missing; a check whose ``uid``
    is already there is skipped. Raises ``RecordsError`` (nothing written) when the document is not a
    painwatch export, an entry is malformed, or a check already there belongs to another animal.
    """
    animals = read_export(document, source)
    created = added = skipped = 0
    with database.write() as session:
        for animal in animals:
            row = find_animal(session, animal["code"])
            if row is None:
                row = Animal(code=animal["code"], code_key=animal_key(animal["code"]),
                             created_at=animal["created_at"], created_by=animal["created_by"])
                session.add(row)
                session.flush()
                created += 1
            for check in animal["checks"]:
                existing = session.scalars(select(Check).where(Check.uid == check["uid"])).one_or_none()
                if existing is not None:
                    if existing.animal_id != row.id:
                        raise RecordsError(f"{source}: check {check['uid']} of animal {animal['code']!r} is "
                                           f"already in the records as a check of {existing.animal.code!r}; "
                                           "nothing was imported")
                    skipped += 1
                    continue
                frames = [frame_row(result, position=position, source=file, thumbnail=thumbnail)
                          for position, file, result, thumbnail in check["frames"]]
                session.add(new_check(
                    row, check["model"], frames, uid=check["uid"], created_at=check["created_at"],
                    analysed_at=check["analysed_at"], recorded_by=check["recorded_by"], notes=check["notes"],
                    problems=check["problems"], frames_kept=check["frames_kept"],
                    painwatch_version=check["painwatch_version"],
                ))
                added += 1
    return ImportOutcome(created, added, skipped)


def import_file(database: Database, path: Path) -> ImportOutcome:
    """:func:`import_records` of the JSON file at ``path`` (``RecordsError`` when it is not JSON)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise RecordsError(f"cannot read {path}: {error.strerror or error}") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordsError(f"{path} is not a JSON file: {error}") from error
    return import_records(database, document, source=str(path))


__all__ = ["FORMAT", "FORMAT_VERSION", "HISTORY_CSV_COLUMNS", "ImportOutcome", "export_json",
           "export_records", "history_csv", "import_file", "import_records", "read_export"]
