"""Command line of the event backbone: `python -m app events dead-letters | replay`."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Sequence

from app.platform.db import Database
from app.platform.errors import ServiceError
from app.platform.events import Consumer, EventRelay, list_dead_letters
from app.settings import Settings

ConsumerFactory = Callable[[Settings], Sequence[Consumer]]
# Most dead letters one listing prints.
MAX_LIST_LIMIT = 10_000


def add_events_command(commands: argparse._SubParsersAction, consumers: ConsumerFactory) -> None:
    """Add the `events` command to the `python -m app` parser.

    `consumers` builds the consumers that the server's relay runs, because a replay runs the
    handler of the consumer named on the command line.
    """
    events_parser = commands.add_parser("events", help="inspect and replay dead-lettered events")
    actions = events_parser.add_subparsers(dest="events_command", required=True)

    list_parser = actions.add_parser("dead-letters", help="list dead-lettered events, oldest first")
    list_parser.add_argument(
        "--limit", type=_limit, default=100, help=f"maximum number of dead letters to list, 1 to {MAX_LIST_LIMIT} (default: 100)"
    )
    list_parser.set_defaults(run=print_dead_letters)

    replay_parser = actions.add_parser("replay", help="run a dead-lettered event through its consumer again")
    replay_parser.add_argument("--consumer", required=True, help="name of the consumer that dead-lettered the event")
    replay_parser.add_argument("--event-id", type=_non_empty, required=True, help="id of the dead-lettered event")
    replay_parser.set_defaults(run=replay, consumers=consumers)


def print_dead_letters(settings: Settings, args: argparse.Namespace) -> None:
    """Print one tab-separated line per dead letter: time, consumer, event id, type, attempts, error."""
    rows = asyncio.run(_load_dead_letters(settings, args.limit))
    if not rows:
        print("no dead letters")
        return
    for row in rows:
        first_error_line = row.error.splitlines()[0] if row.error else ""
        print("\t".join([row.created_at.isoformat(), row.consumer, row.event_id, row.event_type, str(row.attempts), first_error_line]))


def replay(settings: Settings, args: argparse.Namespace) -> None:
    """Replay one dead letter and exit with an error message when it fails again."""
    try:
        asyncio.run(_replay(settings, args.consumers(settings), args.consumer, args.event_id))
    except ServiceError as error:
        raise SystemExit(f"replay failed: {error}") from None
    print(f"event {args.event_id} processed by consumer {args.consumer}")


async def _load_dead_letters(settings: Settings, limit: int) -> list:
    database = Database.from_settings(settings)
    try:
        async with database.unit_of_work() as session:
            return await list_dead_letters(session, limit=limit)
    finally:
        await database.dispose()


async def _replay(settings: Settings, consumers: Sequence[Consumer], consumer_name: str, event_id: str) -> None:
    database = Database.from_settings(settings)
    try:
        await EventRelay(database, consumers).replay_dead_letter(consumer_name, event_id)
    finally:
        await database.dispose()


def _limit(value: str) -> int:
    try:
        limit = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number: got {value!r}") from None
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_LIST_LIMIT}: got {value}")
    return limit


def _non_empty(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value
