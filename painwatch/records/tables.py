"""The tables of the records database (SQLAlchemy 2 declarative mapping).

- ``animals``: one row per animal, its ID as typed (``code``) and case-folded (``code_key``, unique, so
  that "m01" and "M01" are one animal);
- ``checks``: one pain check of one animal: when, by whom, notes, and the model that answered (weights
  hash, architecture, certification settings, gate verdicts, the model card in force), with counts;
- ``check_frames``: every frame's answer, with the fields of
  :class:`painwatch.inference.FrameResult` under the same names, and an optional JPEG thumbnail;
- ``sign_in_attempts``: every sign-in attempt on the page (who, when, which browser session, whether it
  succeeded), which is what slows down repeated failures.

Times are stored in UTC (:class:`UtcDateTime`). Radii are L2 norms in [0, 1] pixel units at the model's
input size (docs/design.md, "Units and conventions"). The schema is created and changed only by the
Alembic migrations beside this module (:mod:`painwatch.records.database`); a change here needs a new
migration, which ``tests/test_records_database.py`` checks.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Double,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Constraint names fixed by convention, so that migrations can name them on every database."""

ANIMAL_CODE_LENGTH = 64
USER_NAME_LENGTH = 64


class UtcDateTime(TypeDecorator):
    """A timezone-aware datetime stored as UTC without an offset (the same on SQLite and PostgreSQL).

    Writing a naive datetime raises ``ValueError``: a record's time must say which clock it is on.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"record times must be timezone-aware, got the naive {value.isoformat()}")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Animal(Base):
    __tablename__ = "animals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(ANIMAL_CODE_LENGTH), nullable=False)
    code_key: Mapped[str] = mapped_column(String(ANIMAL_CODE_LENGTH), nullable=False, unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    created_by: Mapped[str | None] = mapped_column(String(USER_NAME_LENGTH), nullable=True)

    checks: Mapped[list[Check]] = relationship(
        back_populates="animal", order_by="Check.created_at", cascade="all, delete-orphan"
    )


class Check(Base):
    __tablename__ = "checks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(String(32), nullable=False, unique=True)
    animal_id: Mapped[int] = mapped_column(
        ForeignKey("animals.id", ondelete="CASCADE"), nullable=False, index=True
    )
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False, index=True)
    analysed_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    recorded_by: Mapped[str | None] = mapped_column(String(USER_NAME_LENGTH), nullable=True)
    notes: Mapped[str] = mapped_column(Text, nullable=False, default="")
    bundle_path: Mapped[str] = mapped_column(Text, nullable=False)
    weights_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    architecture: Mapped[str] = mapped_column(String(128), nullable=False)
    classes: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    certification: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    seed: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    gate_passed: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    model_card: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    problems: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)
    frames_kept: Mapped[str] = mapped_column(String(16), nullable=False)
    painwatch_version: Mapped[str] = mapped_column(String(32), nullable=False)
    frame_count: Mapped[int] = mapped_column(Integer, nullable=False)
    pain_count: Mapped[int] = mapped_column(Integer, nullable=False)
    no_pain_count: Mapped[int] = mapped_column(Integer, nullable=False)
    abstained_count: Mapped[int] = mapped_column(Integer, nullable=False)
    certified_count: Mapped[int] = mapped_column(Integer, nullable=False)
    mean_confidence: Mapped[float | None] = mapped_column(Double, nullable=True)

    animal: Mapped[Animal] = relationship(back_populates="checks")
    frames: Mapped[list[CheckFrame]] = relationship(
        back_populates="check", order_by="CheckFrame.position", cascade="all, delete-orphan"
    )

    @property
    def pain_share(self) -> float | None:
        """Share of pain among the frames with an answer, in [0, 1]; None when every frame was refused."""
        decided = self.frame_count - self.abstained_count
        return self.pain_count / decided if decided else None


class CheckFrame(Base):
    __tablename__ = "check_frames"
    __table_args__ = (UniqueConstraint("check_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    check_id: Mapped[int] = mapped_column(ForeignKey("checks.id", ondelete="CASCADE"), nullable=False,
                                          index=True)
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    time_s: Mapped[float | None] = mapped_column(Double, nullable=True)
    label: Mapped[str] = mapped_column(String(64), nullable=False)
    class_index: Mapped[int] = mapped_column(Integer, nullable=False)
    confidence: Mapped[float] = mapped_column(Double, nullable=False)
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON, nullable=False)
    radius: Mapped[float] = mapped_column(Double, nullable=False)
    radius_rms: Mapped[float] = mapped_column(Double, nullable=False)
    radius_grey_levels: Mapped[float] = mapped_column(Double, nullable=False)
    method: Mapped[str] = mapped_column(String(64), nullable=False)
    sigma: Mapped[float] = mapped_column(Double, nullable=False)
    n: Mapped[int] = mapped_column(Integer, nullable=False)
    alpha: Mapped[float] = mapped_column(Double, nullable=False)
    forward_passes: Mapped[int] = mapped_column(Integer, nullable=False)
    bound: Mapped[float | None] = mapped_column(Double, nullable=True)
    classifier: Mapped[str] = mapped_column(Text, nullable=False)
    stop_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    noise_seed: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    abstain_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    abstain_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    in_distribution_score: Mapped[float | None] = mapped_column(Double, nullable=True)
    in_distribution_threshold: Mapped[float | None] = mapped_column(Double, nullable=True)
    thumbnail: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)

    check: Mapped[Check] = relationship(back_populates="frames")

    @property
    def abstained(self) -> bool:
        return self.class_index < 0


class SignInAttempt(Base):
    __tablename__ = "sign_in_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False, index=True)
    user_name: Mapped[str] = mapped_column(String(USER_NAME_LENGTH), nullable=False, index=True)
    session: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    succeeded: Mapped[bool] = mapped_column(Boolean, nullable=False)


__all__ = ["ANIMAL_CODE_LENGTH", "USER_NAME_LENGTH", "Animal", "Base", "Check", "CheckFrame", "SignInAttempt",
           "UtcDateTime"]
