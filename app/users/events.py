"""Consumers of the user domain: disabling the Firebase account of a deleted user until it works.

DeleteMe disables the Firebase user right after the deletion commits. When Firebase is down
then, this consumer of the UserDeleted event retries through the event relay, with backoff,
until the account is disabled or the event reaches the dead letters.
"""

from __future__ import annotations

from typing import cast

from functions.events.v1 import events_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from app.platform.events import Consumer, Event
from app.platform.firebase import FirebaseAdmin
from app.users import logic

DISABLE_SIGN_IN_CONSUMER_NAME = "users.disable_sign_in"


def disable_sign_in_consumer(firebase: FirebaseAdmin) -> Consumer:
    """Build the consumer that disables the Firebase user of every deleted account.

    Disabling an account twice changes nothing, so this consumer and DeleteMe's own attempt do
    not conflict. A user unknown to Firebase counts as done.
    """

    async def disable(event: Event, session: AsyncSession) -> None:
        # The relay hands this consumer UserDeleted events only.
        deleted = cast(events_pb2.UserDeleted, event.message)
        await logic.disable_sign_in(firebase, deleted.uid)

    return Consumer(name=DISABLE_SIGN_IN_CONSUMER_NAME, event_types=(events_pb2.UserDeleted,), handler=disable)
