"""The notifications table and the Notification domain type."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, PrimaryKeyConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from app.platform.db import Base, UtcDateTime

UID_MAX_LENGTH = 128
TITLE_MAX_LENGTH = 200
BODY_MAX_LENGTH = 2000
TOPIC_MAX_LENGTH = 64


class NotificationRow(Base):
    """One row of `notifications`: one notification of one user."""

    __tablename__ = "notifications"
    # Lists, counts and replays all read one user's rows in id order.
    __table_args__ = (Index("ix_notifications_uid_id", "uid", "id"),)

    # SQLite assigns rowids only to a column declared INTEGER PRIMARY KEY.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    uid: Mapped[str] = mapped_column(String(UID_MAX_LENGTH))
    title: Mapped[str] = mapped_column(String(TITLE_MAX_LENGTH))
    body: Mapped[str] = mapped_column(String(BODY_MAX_LENGTH))
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)
    read_time: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    topic: Mapped[str | None] = mapped_column(String(TOPIC_MAX_LENGTH), nullable=True)


class TopicFollowerRow(Base):
    """One row of `notification_topic_followers`: one user following one topic."""

    __tablename__ = "notification_topic_followers"
    # Sends read a topic's followers; ListFollowedTopics and deletions read a user's topics.
    __table_args__ = (
        PrimaryKeyConstraint("topic", "uid", name="pk_notification_topic_followers"),
        Index("ix_notification_topic_followers_uid", "uid"),
    )

    topic: Mapped[str] = mapped_column(String(TOPIC_MAX_LENGTH))
    uid: Mapped[str] = mapped_column(String(UID_MAX_LENGTH))
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)


class RemovedRecipientRow(Base):
    """One row of `notification_removed_recipients`: a deleted user, to whom nothing is sent again."""

    __tablename__ = "notification_removed_recipients"

    uid: Mapped[str] = mapped_column(String(UID_MAX_LENGTH), primary_key=True)
    remove_time: Mapped[datetime] = mapped_column(UtcDateTime)


@dataclass(frozen=True, slots=True)
class Notification:
    """A notification, independent of the table and of the proto messages."""

    id: int
    uid: str
    title: str
    body: str
    create_time: datetime
    read_time: datetime | None = None
    # The topic it was sent to; None when it was sent to the user alone.
    topic: str | None = None

    @property
    def is_read(self) -> bool:
        return self.read_time is not None


def notification_from_row(row: NotificationRow) -> Notification:
    """Build the domain notification of a table row."""
    return Notification(
        id=row.id, uid=row.uid, title=row.title, body=row.body, create_time=row.create_time, read_time=row.read_time,
        topic=row.topic,
    )
