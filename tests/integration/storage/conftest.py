"""Fixtures for the storage adapters: a local store served on a socket, and the Supabase stand-in.

`storage` runs each contract test twice: on LocalStorage, whose signed-URL routes a small Starlette
app serves on 127.0.0.1, and on SupabaseStorage against the Supabase Storage stand-in.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from starlette.applications import Starlette

from app.platform.storage.local import LocalStorage
from app.platform.storage.supabase import SupabaseStorage
from tests.servers import serve_in_thread
from tests.support.supabase_storage import SupabaseStorageStandIn, run_supabase_storage

# Short, so that tests of hangs finish quickly; real calls to the stand-in take milliseconds.
SUPABASE_TEST_TIMEOUT_SECONDS = 1.0


@dataclass
class LocalServer:
    """A Starlette app on a real socket, whose routes a test fills in."""

    app: Starlette
    base_url: str


@pytest.fixture(scope="session")
def local_server() -> Iterator[LocalServer]:
    """Serve an empty Starlette app on 127.0.0.1; tests mount LocalStorage routes into it."""
    app = Starlette()
    with serve_in_thread(app) as address:
        yield LocalServer(app, f"http://{address}")


@pytest.fixture
def local_storage(tmp_path: Path, local_server: LocalServer) -> LocalStorage:
    """A LocalStorage in a fresh directory, its signed URLs served by `local_server`."""
    storage = LocalStorage(tmp_path / "files", public_base_url=local_server.base_url)
    # Each test's store replaces the previous one's routes, so a URL reaches this test's store.
    local_server.app.router.routes[:] = storage.routes()
    return storage


@pytest.fixture(scope="session")
def standin() -> Iterator[SupabaseStorageStandIn]:
    """The Supabase Storage stand-in, shared by the session; `supabase_standin` resets it per test."""
    with run_supabase_storage() as running:
        yield running


@pytest.fixture
def supabase_standin(standin: SupabaseStorageStandIn) -> SupabaseStorageStandIn:
    """The stand-in with no objects, rules, pending failures or recorded requests."""
    standin.reset()
    return standin


@pytest.fixture
async def supabase_storage(supabase_standin: SupabaseStorageStandIn) -> AsyncIterator[SupabaseStorage]:
    """A SupabaseStorage on the stand-in's bucket."""
    storage = SupabaseStorage(
        url=supabase_standin.url,
        service_key=supabase_standin.service_key,
        bucket=supabase_standin.bucket,
        timeout_seconds=SUPABASE_TEST_TIMEOUT_SECONDS,
    )
    yield storage
    await storage.aclose()


@pytest.fixture(params=["local", "supabase"])
def storage(request: pytest.FixtureRequest):
    """Each adapter in turn."""
    return request.getfixturevalue(f"{request.param}_storage")
