"""The first records schema: animals, their checks, every check's frames, sign-in attempts.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "animals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("code_key", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_animals")),
        sa.UniqueConstraint("code_key", name=op.f("uq_animals_code_key")),
    )
    op.create_table(
        "checks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uid", sa.String(length=32), nullable=False),
        sa.Column("animal_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("analysed_at", sa.DateTime(), nullable=False),
        sa.Column("recorded_by", sa.String(length=64), nullable=True),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.Column("bundle_path", sa.Text(), nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=False),
        sa.Column("architecture", sa.String(length=128), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("certification", sa.JSON(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("gate_passed", sa.Boolean(), nullable=True),
        sa.Column("model_card", sa.JSON(), nullable=False),
        sa.Column("problems", sa.JSON(), nullable=False),
        sa.Column("frames_kept", sa.String(length=16), nullable=False),
        sa.Column("painwatch_version", sa.String(length=32), nullable=False),
        sa.Column("frame_count", sa.Integer(), nullable=False),
        sa.Column("pain_count", sa.Integer(), nullable=False),
        sa.Column("no_pain_count", sa.Integer(), nullable=False),
        sa.Column("abstained_count", sa.Integer(), nullable=False),
        sa.Column("certified_count", sa.Integer(), nullable=False),
        sa.Column("mean_confidence", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(["animal_id"], ["animals.id"], name=op.f("fk_checks_animal_id_animals"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checks")),
        sa.UniqueConstraint("uid", name=op.f("uq_checks_uid")),
    )
    op.create_index(op.f("ix_checks_animal_id"), "checks", ["animal_id"], unique=False)
    op.create_index(op.f("ix_checks_created_at"), "checks", ["created_at"], unique=False)
    op.create_table(
        "check_frames",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("check_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("time_s", sa.Double(), nullable=True),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("class_index", sa.Integer(), nullable=False),
        sa.Column("confidence", sa.Double(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("radius", sa.Double(), nullable=False),
        sa.Column("radius_rms", sa.Double(), nullable=False),
        sa.Column("radius_grey_levels", sa.Double(), nullable=False),
        sa.Column("method", sa.String(length=64), nullable=False),
        sa.Column("sigma", sa.Double(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("alpha", sa.Double(), nullable=False),
        sa.Column("forward_passes", sa.Integer(), nullable=False),
        sa.Column("bound", sa.Double(), nullable=True),
        sa.Column("classifier", sa.Text(), nullable=False),
        sa.Column("stop_reason", sa.String(length=64), nullable=True),
        sa.Column("noise_seed", sa.BigInteger(), nullable=True),
        sa.Column("abstain_code", sa.String(length=64), nullable=True),
        sa.Column("abstain_reason", sa.Text(), nullable=True),
        sa.Column("thumbnail", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(["check_id"], ["checks.id"], name=op.f("fk_check_frames_check_id_checks"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_check_frames")),
        sa.UniqueConstraint("check_id", "position", name=op.f("uq_check_frames_check_id")),
    )
    op.create_index(op.f("ix_check_frames_check_id"), "check_frames", ["check_id"], unique=False)
    op.create_table(
        "sign_in_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("user_name", sa.String(length=64), nullable=False),
        sa.Column("session", sa.String(length=64), nullable=False),
        sa.Column("succeeded", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sign_in_attempts")),
    )
    op.create_index(op.f("ix_sign_in_attempts_at"), "sign_in_attempts", ["at"], unique=False)
    op.create_index(op.f("ix_sign_in_attempts_user_name"), "sign_in_attempts", ["user_name"], unique=False)
    op.create_index(op.f("ix_sign_in_attempts_session"), "sign_in_attempts", ["session"], unique=False)


def downgrade() -> None:
    op.drop_table("sign_in_attempts")
    op.drop_table("check_frames")
    op.drop_table("checks")
    op.drop_table("animals")
