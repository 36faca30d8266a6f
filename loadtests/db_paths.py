"""Time GetMe's database work in-process, one call at a time, along several query paths.

    DATABASE_URL=sqlite+aiosqlite:///<file> python loadtests/db_paths.py [--calls 2000]

The database must be migrated and hold the profile of uid "bench", like the bench.db that
loadtests/bench.py leaves in its work directory. Each path runs 200 unmeasured calls, then
--calls measured ones, on uvloop as uvicorn does. Each path after the first changes one thing
about the current one, so the differences show where GetMe's database time goes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop
from sqlalchemy import select, text
from sqlalchemy.orm import joinedload

# Run as `python loadtests/db_paths.py`, Python puts loadtests/ on the path, not the repository root.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.platform.context import Principal  # noqa: E402
from app.platform.db import Database  # noqa: E402
from app.settings import Settings  # noqa: E402
from app.users import logic  # noqa: E402
from app.users.model import UserPreferenceRow, UserRow, profile_from_row  # noqa: E402

BENCH_UID = "bench"
WARMUP_CALLS = 200


async def time_path(name: str, call: Callable[[], Awaitable[None]], calls: int) -> None:
    for _ in range(WARMUP_CALLS):
        await call()
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(calls):
        await call()
    wall_us = (time.perf_counter() - wall_start) / calls * 1e6
    cpu_us = (time.process_time() - cpu_start) / calls * 1e6
    print(f"{name:<62} {wall_us:7.0f} us wall {cpu_us:7.0f} us CPU per call")


async def compare_paths(calls: int) -> None:
    database = Database.from_settings(Settings())
    principal = Principal(uid=BENCH_UID)
    users = UserRow.__table__
    preferences = UserPreferenceRow.__table__

    async def current() -> None:
        async with database.unit_of_work() as session:
            await logic.get_or_create_profile(session, principal)

    async def orm_without_preferences() -> None:
        async with database.unit_of_work() as session:
            statement = select(UserRow).where(UserRow.uid == BENCH_UID).execution_options(populate_existing=True)
            (await session.execute(statement)).scalar_one()

    async def orm_joinedload() -> None:
        async with database.unit_of_work() as session:
            statement = (
                select(UserRow)
                .where(UserRow.uid == BENCH_UID)
                .options(joinedload(UserRow.preferences))
                .execution_options(populate_existing=True)
            )
            profile_from_row((await session.execute(statement)).unique().scalar_one())

    async def core_outer_join() -> None:
        async with database.unit_of_work() as session:
            statement = (
                select(users, preferences.c.key, preferences.c.value)
                .outerjoin(preferences, preferences.c.uid == users.c.uid)
                .where(users.c.uid == BENCH_UID)
            )
            (await session.execute(statement)).all()

    async def select_one() -> None:
        async with database.unit_of_work() as session:
            await session.execute(text("SELECT 1"))

    async def empty_unit_of_work() -> None:
        async with database.unit_of_work():
            pass

    paths = [
        ("current: get_or_create_profile (ORM, selectinload)", current),
        ("ORM select of the users row only (no preferences)", orm_without_preferences),
        ("ORM select with joinedload (one query)", orm_joinedload),
        ("Core select with LEFT OUTER JOIN (one query)", core_outer_join),
        ("unit_of_work with SELECT 1", select_one),
        ("unit_of_work without a statement", empty_unit_of_work),
    ]
    try:
        for name, call in paths:
            await time_path(name, call, calls)
    finally:
        await database.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="measured calls per path (default: 2000)")
    options = parser.parse_args()
    uvloop.run(compare_paths(options.calls))


if __name__ == "__main__":
    main()
