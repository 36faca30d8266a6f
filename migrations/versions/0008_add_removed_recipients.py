"""Record deleted users as removed notification recipients.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notification_removed_recipients",
        sa.Column("uid", sa.String(128), nullable=False),
        sa.Column("remove_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("uid", name="pk_notification_removed_recipients"),
    )


def downgrade() -> None:
    op.drop_table("notification_removed_recipients")
