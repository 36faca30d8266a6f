"""Command line: `python -m app serve | worker | migrate | sweep-uploads | dev-token | events`."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys

from pydantic import ValidationError

from app.settings import Settings


def serve(settings: Settings, args: argparse.Namespace) -> None:
    """Serve HTTP/1.1 and h2c on one port with the configured server."""
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    server = args.server or settings.server
    # The local storage adapter builds its signed URLs from HOST and PORT, so they follow the flags.
    settings = settings.model_copy(update={"host": host, "port": port})
    os.environ.update(HOST=host, PORT=str(port))

    if server == "pyvoy":
        pyvoy = shutil.which("pyvoy", path=os.path.dirname(sys.executable)) or shutil.which("pyvoy")
        if pyvoy is None:
            raise SystemExit("pyvoy is not installed: pip install pyvoy, or use --server uvicorn")
        os.execv(pyvoy, [pyvoy, "app.asgi:app", "--address", host, "--port", str(port), "--log-level", "warning"])

    import uvicorn

    from app.main import create_app
    from app.platform.shutdown import DrainingServer, install_exit_handlers

    grace_seconds = args.grace_seconds if args.grace_seconds is not None else settings.shutdown_grace_seconds
    # Built here rather than by uvicorn's factory, so the server can reach the health service's
    # event that ends server streams when shutdown starts.
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        # zttp speaks HTTP/1.1 and, with http2, h2c with ASGI trailers, which native gRPC needs.
        http="zttp",
        http2=True,
        lifespan="on",
        log_config=None,
        timeout_graceful_shutdown=grace_seconds,
    )
    install_exit_handlers()
    DrainingServer(config, draining=app.state.health.shutting_down).run()


def worker(settings: Settings, args: argparse.Namespace) -> None:
    """Relay committed events to the consumers until SIGTERM or SIGINT, then flush and exit."""
    import signal

    from app.main import build_consumers
    from app.platform.db import Database
    from app.platform.logs import configure_logging
    from app.platform.pgmq_engine import check_events_engine, create_relay

    try:
        check_events_engine(settings)
    except ValueError as error:
        raise SystemExit(f"invalid settings: {error}") from None
    configure_logging(settings)

    async def run() -> None:
        database = Database.from_settings(settings)
        storage = _files_storage(settings)
        relay = create_relay(settings, database, build_consumers(settings, storage=storage))
        upload_sweeper = _upload_sweeper(settings, database, storage)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signal_number, stopping.set)
        relay.start()
        if upload_sweeper is not None:
            upload_sweeper.start()
        try:
            await stopping.wait()
        finally:
            if upload_sweeper is not None:
                await upload_sweeper.stop()
            await relay.stop()
            if storage is not None:
                await storage.aclose()
            await database.dispose()

    asyncio.run(run())


def _files_storage(settings: Settings):
    """Create the storage adapter when the files service is enabled, else return None."""
    if "files" not in settings.enabled_services:
        return None
    from app.platform.storage import create_storage

    return create_storage(settings)


def _upload_sweeper(settings: Settings, database, storage):
    """Build the sweeper of abandoned uploads when the files service is enabled, else return None."""
    if storage is None:
        return None
    from app.files.events import UploadSweeper
    from app.files.logic import FileLimits, Files

    return UploadSweeper(Files(database, storage, FileLimits.from_settings(settings)))


def sweep_uploads(settings: Settings, args: argparse.Namespace) -> None:
    """Remove the pending uploads whose upload URL expired, with their stored objects, once."""
    from app.files.logic import FileLimits, Files
    from app.platform.db import Database
    from app.platform.storage import create_storage

    async def run() -> int:
        database = Database.from_settings(settings)
        storage = create_storage(settings)
        try:
            return await Files(database, storage, FileLimits.from_settings(settings)).sweep_abandoned_uploads()
        finally:
            await storage.aclose()
            await database.dispose()

    print(f"removed {asyncio.run(run())} abandoned uploads")


def migrate(settings: Settings, args: argparse.Namespace) -> None:
    """Apply every pending database migration."""
    from app.platform.db import migrate as run_migrations

    asyncio.run(run_migrations(settings))
    print(f"database at {settings.database_url.split('@')[-1]} is up to date")


def dev_token(settings: Settings, args: argparse.Namespace) -> None:
    """Print an ID token signed by the local development key pair."""
    from app.platform.auth import ensure_dev_keys, mint_token

    if not settings.uses_dev_keys:
        raise SystemExit("dev-token needs the development key pair: unset FIREBASE_CERTS_URL")
    keys = ensure_dev_keys(settings.dev_keys_dir)
    token = mint_token(
        keys,
        project_id=settings.firebase_project_id,
        uid=args.uid,
        email=args.email,
        roles=args.role or [],
        lifetime_seconds=args.lifetime,
    )
    print(token)


def event_consumers(settings: Settings) -> list:
    """Build the consumers that the server's relay runs, so a replay runs the same handlers."""
    from app.main import build_consumers

    return build_consumers(settings)


def _describe_setting_error(error: dict) -> str:
    """Name the environment variable of a settings error, when it concerns one."""
    message = error["msg"].removeprefix("Value error, ")
    names = [str(part).upper() for part in error.get("loc", ()) if part != "__root__"]
    return f"{'.'.join(names)}: {message}" if names else message


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="serve every enabled service")
    serve_parser.add_argument("--host", help="address to listen on (default: HOST or 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, help="port to listen on (default: PORT or 8080)")
    serve_parser.add_argument("--server", choices=["uvicorn", "pyvoy"], help="ASGI server (default: SERVER or uvicorn)")
    serve_parser.add_argument(
        "--grace-seconds", type=float, default=None,
        help="seconds in-flight calls get to finish after SIGTERM (default: SHUTDOWN_GRACE_SECONDS or 20)",
    )
    serve_parser.set_defaults(run=serve)

    worker_parser = commands.add_parser("worker", help="relay committed events to their consumers")
    worker_parser.set_defaults(run=worker)

    migrate_parser = commands.add_parser("migrate", help="apply pending database migrations")
    migrate_parser.set_defaults(run=migrate)

    sweep_parser = commands.add_parser(
        "sweep-uploads", help="remove pending file uploads whose upload URL expired, once (the worker does it every minute)"
    )
    sweep_parser.set_defaults(run=sweep_uploads)

    token_parser = commands.add_parser("dev-token", help="print a development ID token the dev server accepts")
    token_parser.add_argument("--uid", required=True, help="Firebase uid of the token's subject")
    token_parser.add_argument("--email", help="email claim")
    token_parser.add_argument("--role", action="append", help="role for the roles custom claim; repeatable")
    token_parser.add_argument("--lifetime", type=int, default=3600, help="seconds until the token expires (default: 3600)")
    token_parser.set_defaults(run=dev_token)

    from app.platform.events_cli import add_events_command

    add_events_command(commands, event_consumers)

    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        messages = "; ".join(_describe_setting_error(e) for e in error.errors())
        raise SystemExit(f"invalid settings: {messages}") from None
    args.run(settings, args)


if __name__ == "__main__":
    main()
