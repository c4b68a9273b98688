"""Every frame's in-distribution score and the threshold it was judged against (docs/design.md, "The
in-distribution check"): a frame refused as unlike the training frames keeps why, in numbers. Checks
saved before have none (NULL), as do frames of a bundle without the check.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

COLUMNS = ("in_distribution_score", "in_distribution_threshold")


def upgrade() -> None:
    with op.batch_alter_table("check_frames") as table:
        for name in COLUMNS:
            table.add_column(sa.Column(name, sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("check_frames") as table:
        for name in reversed(COLUMNS):
            table.drop_column(name)
