"""Add users.delete_time, set when DeleteMe turns a profile into a tombstone.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable without a default, so the column is added without rewriting the table on Postgres.
    op.add_column("users", sa.Column("delete_time", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # SQLite drops columns since 3.35.
    op.drop_column("users", "delete_time")
