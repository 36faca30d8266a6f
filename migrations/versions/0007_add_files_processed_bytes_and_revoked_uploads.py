"""Charge processed copies of files to the quota and keep revoked upload keys.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("processed_bytes", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_table(
        "revoked_uploads",
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("uid", sa.String(128), nullable=False),
        sa.Column("delete_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_revoked_uploads"),
    )
    op.create_index("ix_revoked_uploads_delete_time", "revoked_uploads", ["delete_time"])


def downgrade() -> None:
    op.drop_index("ix_revoked_uploads_delete_time", table_name="revoked_uploads")
    op.drop_table("revoked_uploads")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("processed_bytes")
