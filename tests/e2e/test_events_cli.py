"""`python -m app events dead-letters | replay` as an operator runs it, against a migrated SQLite file."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from functions.events.v1 import events_pb2

from app.notifications.events import WELCOME_CONSUMER_NAME, WELCOME_TITLE
from app.platform.db import Database
from app.platform.events import _upsert_dead_letter, record_event
from app.settings import Settings
from tests.servers import ROOT, run_migrations


def run_app(env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *arguments], env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    values = {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'events.db'}", "DEV_KEYS_DIR": str(tmp_path / "keys")}
    run_migrations(values)
    return values


async def dead_lettered_welcome(env: dict[str, str], uid: str) -> str:
    """Record a UserCreated event whose welcome consumer gave up, as after five failed attempts."""
    database = Database.from_settings(Settings(database_url=env["DATABASE_URL"]))
    try:
        async with database.unit_of_work() as session:
            event_id = await record_event(session, events_pb2.UserCreated(uid=uid))
            await _upsert_dead_letter(session, WELCOME_CONSUMER_NAME, event_id, "RuntimeError: the database was down", 5)
        return event_id
    finally:
        await database.dispose()


async def notification_titles(env: dict[str, str], uid: str) -> list[str]:
    from app.notifications import logic

    database = Database.from_settings(Settings(database_url=env["DATABASE_URL"]))
    try:
        async with database.unit_of_work() as session:
            page = await logic.list_notifications(session, uid, 10, "", False)
        return [notification.title for notification in page.notifications]
    finally:
        await database.dispose()


def test_dead_letter_is_listed_and_replayed(env) -> None:
    event_id = asyncio.run(dead_lettered_welcome(env, "cli-user"))

    listed = run_app(env, "events", "dead-letters")
    replayed = run_app(env, "events", "replay", "--consumer", WELCOME_CONSUMER_NAME, "--event-id", event_id)
    after = run_app(env, "events", "dead-letters")

    assert listed.returncode == 0, listed.stderr
    assert f"{WELCOME_CONSUMER_NAME}\t{event_id}\tfunctions.events.v1.UserCreated\t5\tRuntimeError: the database was down" in listed.stdout
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.strip() == f"event {event_id} processed by consumer {WELCOME_CONSUMER_NAME}"
    assert after.stdout.strip() == "no dead letters"
    assert asyncio.run(notification_titles(env, "cli-user")) == [WELCOME_TITLE]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["dead-letters", "--limit", "0"], "argument --limit: must be 1 to 10000: got 0"),
        (["dead-letters", "--limit", "99999999999999999999"], "argument --limit: must be 1 to 10000"),
        (["replay", "--consumer", "notifications.welcome", "--event-id", " "], "argument --event-id: must not be empty"),
        (["replay", "--consumer", "nope", "--event-id", "e1"], "consumer 'nope' is not registered: registered are"),
        (["replay", "--consumer", "notifications.welcome", "--event-id", "e1"], "dead letter of event e1 for consumer"),
    ],
)
def test_bad_arguments_rejected(env, arguments: list[str], message: str) -> None:
    result = run_app(env, "events", *arguments)

    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
