"""The check service: animals, and the pain checks saved for them, written whole or not at all.

A check is what the page analysed once for one animal: when it was saved and analysed, who saved it
(when signed in), the veterinarian's notes, the model that answered (:class:`ModelUsed`) and every
frame's answer (a :class:`painwatch.inference.FrameResult`, kept field by field), with a small JPEG
thumbnail of the frame unless the clinic keeps none (:class:`~painwatch.records.settings.RecordsSettings`
``frames``). :func:`save_check` writes the check, its frames and, only when asked to, a new animal, in one
transaction (docs/design.md, "Records and sign-in").

Reading gives plain frozen dataclasses (:class:`CheckSummary`, :class:`FrameRecord`), detached from the
database, for the page and the reports.
"""

from __future__ import annotations

import io
import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
from PIL import Image
from sqlalchemy import func, select

from painwatch import CLASS_NAMES, __version__
from painwatch.inference.predict import FrameResult
from painwatch.io import to_json_text
from painwatch.records.database import Database, RecordsError
from painwatch.records.settings import FRAMES_NONE, FRAMES_THUMBNAILS, RecordsSettings
from painwatch.records.tables import ANIMAL_CODE_LENGTH, USER_NAME_LENGTH, Animal, Check, CheckFrame

PAIN_LABEL = CLASS_NAMES[1]
ANIMAL_CODE_CHARACTERS = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._/#()-]*")
"""An animal ID: letters, digits, and inside it spaces and . _ / # ( ) -, at most 64 characters."""
NOTES_LENGTH = 4000
THUMBNAIL_QUALITY = 80
RESULT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(FrameResult))


class UnknownAnimalError(RecordsError):
    """The animal ID is not in the records; it is created only when the caller confirms it."""

    def __init__(self, code: str) -> None:
        super().__init__(f"{code!r} is not a known animal: confirm to create it")
        self.code = code


class FrameLike(Protocol):
    """A frame as the page holds it: its unique name, its file, its time in a clip, an RGB image."""

    name: str
    source: str
    time_s: float | None
    image: np.ndarray


@dataclass(frozen=True)
class ModelUsed:
    """The model that answered a check: the bundle's identity, the certification settings in force,
    the fixed noise seed (None in deployment), whether every gate verdict passed (None: never gated),
    and the model card (intended use, training data, gate verdicts, limits) as it was then."""

    bundle_path: str
    weights_sha256: str
    architecture: str
    classes: tuple[str, ...]
    certification: Mapping[str, Any]
    seed: int | None
    gate_passed: bool | None
    model_card: Mapping[str, Any]


@dataclass(frozen=True)
class SavedCheck:
    check_id: int
    uid: str
    animal: str
    created_at: datetime
    frames: int
    animal_created: bool


@dataclass(frozen=True)
class AnimalSummary:
    code: str
    created_at: datetime
    checks: int
    last_check: datetime | None


@dataclass(frozen=True)
class CheckSummary:
    """One saved check without its frames. ``pain_share`` is over the frames with an answer; the mean
    confidence is over the same frames (a refused frame has no answer to be confident in)."""

    check_id: int
    uid: str
    animal: str
    created_at: datetime
    analysed_at: datetime
    recorded_by: str | None
    notes: str
    frames: int
    pain: int
    no_pain: int
    abstained: int
    certified: int
    mean_confidence: float | None
    model: ModelUsed
    problems: tuple[Mapping[str, Any], ...]
    frames_kept: str
    painwatch_version: str

    @property
    def pain_share(self) -> float | None:
        decided = self.frames - self.abstained
        return self.pain / decided if decided else None


@dataclass(frozen=True)
class FrameRecord:
    """One saved frame: its position in the check, its file, its answer, its thumbnail (JPEG or None)."""

    position: int
    source: str
    result: FrameResult
    thumbnail: bytes | None


# --------------------------------------------------------------------------- animal IDs


def normalize_animal_code(text: str) -> str:
    """An animal ID as stored: surrounding spaces dropped, inner runs of spaces made one.

    Raises ``RecordsError`` naming the value when it is empty, longer than 64 characters, or holds other
    characters than letters, digits and `` ._/#()-``.
    """
    code = " ".join(str(text).split())
    if not code:
        raise RecordsError("the animal ID is empty: type the animal's ID or pick a known one")
    if len(code) > ANIMAL_CODE_LENGTH:
        raise RecordsError(f"the animal ID {code!r} is {len(code)} characters long; at most "
                           f"{ANIMAL_CODE_LENGTH} are allowed")
    if not ANIMAL_CODE_CHARACTERS.fullmatch(code):
        raise RecordsError(f"the animal ID {code!r} may hold only letters, digits and, after the first "
                           "character, spaces and . _ / # ( ) -")
    return code


def animal_key(code: str) -> str:
    """The key under which an animal ID is unique: "M01" and "m01" are the same animal."""
    return normalize_animal_code(code).casefold()


def find_animal(session: Any, code: str) -> Animal | None:
    """The animal row of ``code`` in an open session (matched without regard to case), or None."""
    return session.scalars(select(Animal).where(Animal.code_key == animal_key(code))).one_or_none()


def known_animal(database: Database, code: str) -> str | None:
    """The stored spelling of the animal ID ``code`` (matched without regard to case), or None."""
    with database.read() as session:
        animal = find_animal(session, code)
        return None if animal is None else animal.code


def list_animals(database: Database) -> list[AnimalSummary]:
    """Every animal with its number of checks and the time of its last one, by ID."""
    with database.read() as session:
        rows = session.execute(
            select(Animal, func.count(Check.id), func.max(Check.created_at))
            .outerjoin(Check, Check.animal_id == Animal.id)
            .group_by(Animal.id)
            .order_by(Animal.code_key)
        ).all()
        return [AnimalSummary(animal.code, animal.created_at, int(count),
                              None if last is None else _as_utc(last)) for animal, count, last in rows]


def _as_utc(value: datetime) -> datetime:
    # Aggregates (max) bypass the column type: SQLite hands back the stored text or a naive datetime.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- writing a check


def thumbnail_jpeg(image: np.ndarray, max_side: int) -> bytes:
    """A JPEG of an RGB uint8 frame with its longest side at most ``max_side`` pixels."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"a thumbnail needs an HxWx3 uint8 RGB image, got shape {image.shape} {image.dtype}")
    picture = Image.fromarray(np.ascontiguousarray(image))
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()


def _json_ready(value: Any) -> Any:
    # One NaN policy for every JSON column: the project's (NaN and infinities become null).
    return json.loads(to_json_text(value))


def _frame_row(position: int, frame: FrameLike, result: FrameResult, thumbnail: bytes | None) -> CheckFrame:
    if frame.time_s is not None and result.time_s is None:
        result = replace(result, time_s=float(frame.time_s))
    return frame_row(result, position=position, source=frame.source, thumbnail=thumbnail)


def save_check(
    database: Database,
    frames: Sequence[FrameLike],
    results: Sequence[FrameResult],
    *,
    model: ModelUsed,
    animal: str,
    create_animal: bool = False,
    notes: str = "",
    recorded_by: str | None = None,
    problems: Sequence[Mapping[str, Any]] = (),
    analysed_at: datetime | None = None,
    settings: RecordsSettings | None = None,
) -> SavedCheck:
    """Save one check of ``animal``: ``results[i]`` is the answer for ``frames[i]``.

    All of it (a new animal when ``create_animal``, the check, its frames and their thumbnails) is one
    transaction: after a crash the database holds the whole check or none of it. ``settings.frames``
    says whether thumbnails are kept (``settings.thumbnail_side`` pixels at most).

    Raises:
        UnknownAnimalError: ``animal`` is not known and ``create_animal`` is False (nothing written).
        RecordsError: the ID or the notes cannot be used, or there are no frames.
        ValueError: frames and results do not match one to one.
    """
    settings = settings or RecordsSettings()
    code = normalize_animal_code(animal)
    if len(frames) != len(results):
        raise ValueError(f"got {len(frames)} frames but {len(results)} results; they must match one to one")
    if not results:
        raise RecordsError("a check needs at least one analysed frame")
    notes = str(notes or "").strip()
    if len(notes) > NOTES_LENGTH:
        raise RecordsError(f"the notes are {len(notes)} characters long; at most {NOTES_LENGTH} are kept")
    if recorded_by is not None and len(recorded_by) > USER_NAME_LENGTH:
        raise RecordsError(f"the user name {recorded_by[:20]!r}... is longer than {USER_NAME_LENGTH} "
                           "characters")
    # Thumbnails are made before the transaction: it should hold the lock only while it writes.
    thumbnails = [thumbnail_jpeg(frame.image, settings.thumbnail_side) if settings.keep_thumbnails else None
                  for frame in frames]
    rows = [_frame_row(i, frame, result, thumbnail)
            for i, (frame, result, thumbnail) in enumerate(zip(frames, results, thumbnails, strict=True))]
    now = datetime.now(UTC)
    with database.write() as session:
        row = find_animal(session, code)
        created = row is None
        if created:
            if not create_animal:
                raise UnknownAnimalError(code)
            row = Animal(code=code, code_key=animal_key(code), created_at=now, created_by=recorded_by)
            session.add(row)
        kept = FRAMES_THUMBNAILS if settings.keep_thumbnails else FRAMES_NONE
        check = new_check(row, model, rows, uid=uuid.uuid4().hex, created_at=now,
                          analysed_at=analysed_at or now, recorded_by=recorded_by, notes=notes,
                          problems=problems, frames_kept=kept)
        session.add(check)
        session.flush()
        return SavedCheck(check.id, check.uid, row.code, now, len(results), created)


def new_check(
    animal: Animal,
    model: ModelUsed,
    frames: Sequence[CheckFrame],
    *,
    uid: str,
    created_at: datetime,
    analysed_at: datetime,
    recorded_by: str | None,
    notes: str,
    problems: Sequence[Mapping[str, Any]],
    frames_kept: str,
    painwatch_version: str = __version__,
) -> Check:
    """A check row of ``animal`` holding ``frames``, with its counts computed from their answers (pain
    share and mean confidence over the answered frames)."""
    answered = [f for f in frames if int(f.class_index) >= 0]
    return Check(
        uid=uid,
        animal=animal,
        created_at=created_at,
        analysed_at=analysed_at,
        recorded_by=recorded_by,
        notes=notes,
        bundle_path=str(model.bundle_path),
        weights_sha256=str(model.weights_sha256),
        architecture=str(model.architecture),
        classes=list(model.classes),
        certification=_json_ready(dict(model.certification)),
        seed=model.seed,
        gate_passed=model.gate_passed,
        model_card=_json_ready(dict(model.model_card)),
        problems=_json_ready([dict(p) for p in problems]),
        frames_kept=frames_kept,
        painwatch_version=painwatch_version,
        frame_count=len(frames),
        pain_count=sum(1 for f in answered if f.label == PAIN_LABEL),
        no_pain_count=sum(1 for f in answered if f.label != PAIN_LABEL),
        abstained_count=len(frames) - len(answered),
        certified_count=sum(1 for f in answered if float(f.radius) > 0),
        mean_confidence=float(np.mean([f.confidence for f in answered])) if answered else None,
        frames=list(frames),
    )


def frame_row(result: FrameResult, *, position: int, source: str, thumbnail: bytes | None) -> CheckFrame:
    """The stored row of one frame's answer (every FrameResult field under its own name)."""
    values = {name: getattr(result, name) for name in RESULT_FIELDS}
    values["probabilities"] = {str(k): float(v) for k, v in result.probabilities.items()}
    bound = values["bound"]
    values["bound"] = None if bound is None or not math.isfinite(float(bound)) else float(bound)
    return CheckFrame(position=position, source=str(source), thumbnail=thumbnail, **values)


# --------------------------------------------------------------------------- reading


def model_used(check: Check) -> ModelUsed:
    """The :class:`ModelUsed` of a stored check."""
    return ModelUsed(check.bundle_path, check.weights_sha256, check.architecture, tuple(check.classes),
                     dict(check.certification), check.seed, check.gate_passed, dict(check.model_card))


def summary_of(check: Check) -> CheckSummary:
    """A stored check as a :class:`CheckSummary` (its animal must be loaded)."""
    return CheckSummary(
        check.id, check.uid, check.animal.code, check.created_at, check.analysed_at, check.recorded_by,
        check.notes, check.frame_count, check.pain_count, check.no_pain_count, check.abstained_count,
        check.certified_count, check.mean_confidence, model_used(check),
        tuple(dict(p) for p in check.problems), check.frames_kept, check.painwatch_version,
    )


def frame_record(row: CheckFrame) -> FrameRecord:
    """A stored frame as a :class:`FrameRecord`: its answer is the FrameResult that was saved."""
    values = {name: getattr(row, name) for name in RESULT_FIELDS}
    values["probabilities"] = dict(row.probabilities)
    values["bound"] = math.nan if row.bound is None else row.bound
    return FrameRecord(row.position, row.source, FrameResult(**values), row.thumbnail)


def animal_checks(database: Database, animal: str) -> list[CheckSummary]:
    """The checks of ``animal``, oldest first. Raises ``UnknownAnimalError`` when it is not known."""
    with database.read() as session:
        row = find_animal(session, animal)
        if row is None:
            raise UnknownAnimalError(normalize_animal_code(animal))
        return [summary_of(check) for check in row.checks]


def check_frames(database: Database, check_id: int) -> list[FrameRecord]:
    """The frames of one check, in the order they were analysed."""
    with database.read() as session:
        check = session.get(Check, int(check_id))
        if check is None:
            raise RecordsError(f"there is no check {check_id} in the records")
        return [frame_record(row) for row in check.frames]


def get_check(database: Database, check_id: int) -> CheckSummary:
    """One check's summary; ``RecordsError`` when there is no such check."""
    with database.read() as session:
        check = session.get(Check, int(check_id))
        if check is None:
            raise RecordsError(f"there is no check {check_id} in the records")
        return summary_of(check)


__all__ = [
    "PAIN_LABEL",
    "AnimalSummary",
    "CheckSummary",
    "FrameLike",
    "FrameRecord",
    "ModelUsed",
    "SavedCheck",
    "UnknownAnimalError",
    "animal_checks",
    "animal_key",
    "check_frames",
    "find_animal",
    "frame_record",
    "frame_row",
    "get_check",
    "known_animal",
    "list_animals",
    "model_used",
    "new_check",
    "normalize_animal_code",
    "save_check",
    "summary_of",
    "thumbnail_jpeg",
]
