"""What computed every frame's answer and certificate (runtime and precision), its first answer from
the clean pass, and the share of random noise that keeps the answer (docs/design.md, "The answer at
once and a certificate that grows"). Checks saved before have none (NULL).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMNS = (
    ("runtime", sa.String(32)),
    ("precision", sa.String(16)),
    ("noise_survival", sa.Double()),
    ("answer_label", sa.String(64)),
    ("answer_confidence", sa.Double()),
)


def upgrade() -> None:
    with op.batch_alter_table("check_frames") as table:
        for name, kind in COLUMNS:
            table.add_column(sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("check_frames") as table:
        for name, _ in reversed(COLUMNS):
            table.drop_column(name)
