"""Two real server processes on one Postgres database: a notification sent through one reaches
Subscribe streams on the other through LISTEN/NOTIFY.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import pytest

from tests.databases import POSTGRES_MISSING, POSTGRES_URL_VARIABLE, postgres_database
from tests.e2e.conftest import Tokens, server_env
from tests.e2e.test_notifications import (
    new_uid,
    read_notification,
    read_replay,
    send,
    subscribe,
)
from tests.servers import RunningServer, run_migrations, run_server

pytestmark = pytest.mark.skipif(not os.environ.get(POSTGRES_URL_VARIABLE), reason=POSTGRES_MISSING)

DELIVERY_LIMIT_SECONDS = 1.0


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory, cert_server) -> Iterator[tuple[RunningServer, RunningServer]]:
    directory = tmp_path_factory.mktemp("fanout")
    with postgres_database() as url:
        env = server_env(cert_server, url, DEV_KEYS_DIR=str(directory / "dev-keys"), ENABLED_SERVICES="notifications")
        run_migrations(env)
        with run_server(env, directory / "a.log") as server_a, run_server(env, directory / "b.log") as server_b:
            yield server_a, server_b


@pytest.mark.parametrize("protocol", ["connect-json", "grpc"])
async def test_fanout_reaches_other_server(protocol: str, two_servers, tokens: Tokens) -> None:
    server_a, server_b = two_servers
    uid = new_uid()

    async with subscribe(protocol, server_b, tokens.mint(uid)) as stream:
        await read_replay(stream)
        started = time.monotonic()
        sent = await send(server_a, tokens, uid, "through A")
        received = await asyncio.wait_for(read_notification(stream), DELIVERY_LIMIT_SECONDS)
        elapsed = time.monotonic() - started

    assert received == sent
    assert elapsed < DELIVERY_LIMIT_SECONDS


async def test_fanout_delivers_once_on_both(two_servers, tokens: Tokens) -> None:
    server_a, server_b = two_servers
    uid = new_uid()
    token = tokens.mint(uid)

    async with subscribe("connect-json", server_a, token) as on_a, subscribe("grpc", server_b, token) as on_b:
        await read_replay(on_a)
        await read_replay(on_b)
        sent = [await send(server, tokens, uid, f"n{index}") for index, server in enumerate([server_a, server_b] * 3)]

        received_a = [await read_notification(on_a) for _ in sent]
        received_b = [await read_notification(on_b) for _ in sent]
        extra = await send(server_a, tokens, uid, "marker")
        next_a = await read_notification(on_a)
        next_b = await read_notification(on_b)

    # Each stream gets every notification once, in id order, and the marker right after them.
    assert [n.id for n in received_a] == [n.id for n in sent]
    assert [n.id for n in received_b] == [n.id for n in sent]
    assert next_a.id == extra.id
    assert next_b.id == extra.id


async def test_fanout_resume_loses_nothing(two_servers, tokens: Tokens) -> None:
    server_a, server_b = two_servers
    uid = new_uid()
    token = tokens.mint(uid)

    async with subscribe("grpc", server_b, token) as stream:
        await read_replay(stream)
        first = await send(server_a, tokens, uid, "live on B")
        received_first = await read_notification(stream)
    missed = [await send(server_a, tokens, uid, f"while disconnected {index}") for index in range(3)]
    async with subscribe("connect-json", server_b, token, after_id=received_first.id) as stream:
        replayed = await read_replay(stream)
        live = await send(server_a, tokens, uid, "live after resume")
        received_live = await read_notification(stream)
        marker = await send(server_b, tokens, uid, "marker")
        received_marker = await read_notification(stream)

    assert received_first.id == first.id
    assert [n.id for n in replayed] == [n.id for n in missed]
    assert received_live.id == live.id
    # Nothing repeated between the live notification and the marker.
    assert received_marker.id == marker.id
