"""Add notification topics: the followers table and the topic of each notification.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("notifications", sa.Column("topic", sa.String(64), nullable=True))
    op.create_table(
        "notification_topic_followers",
        sa.Column("topic", sa.String(64), nullable=False),
        sa.Column("uid", sa.String(128), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("topic", "uid", name="pk_notification_topic_followers"),
    )
    op.create_index("ix_notification_topic_followers_uid", "notification_topic_followers", ["uid"])


def downgrade() -> None:
    op.drop_index("ix_notification_topic_followers_uid", table_name="notification_topic_followers")
    op.drop_table("notification_topic_followers")
    with op.batch_alter_table("notifications") as batch:
        batch.drop_column("topic")
