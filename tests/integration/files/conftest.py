"""Object storages for the files tests: the local adapter on a temporary directory, and the
Supabase adapter against the Storage stand-in on a loopback socket."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from app.platform.storage.local import LocalStorage
from app.platform.storage.port import ObjectStorage
from app.platform.storage.supabase import SupabaseStorage
from tests.support.supabase_storage import SupabaseStorageStandIn, run_supabase_storage


@pytest.fixture(scope="session")
def supabase_standin() -> Iterator[SupabaseStorageStandIn]:
    with run_supabase_storage() as standin:
        yield standin


@pytest.fixture(scope="session")
async def local_storage(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStorage]:
    root: Path = tmp_path_factory.mktemp("files-local")
    storage = LocalStorage(root, public_base_url="http://127.0.0.1:9")
    yield storage
    await storage.aclose()


@pytest.fixture(scope="session")
async def supabase_storage(supabase_standin: SupabaseStorageStandIn) -> AsyncIterator[SupabaseStorage]:
    storage = SupabaseStorage(
        url=supabase_standin.url, service_key=supabase_standin.service_key, bucket=supabase_standin.bucket
    )
    yield storage
    await storage.aclose()


@pytest.fixture(params=["local", "supabase"])
def storage(request: pytest.FixtureRequest) -> ObjectStorage:
    """An object storage, once per adapter."""
    return request.getfixturevalue(f"{request.param}_storage")
