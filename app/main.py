"""Build the ASGI application: every enabled domain service behind the shared middleware."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route

from app.platform.auth import CertificateSource, FirebaseTokenVerifier, ensure_dev_keys
from app.platform.codecs import server_codecs
from app.platform.context import Principal
from app.platform.db import Database, head_revision, is_known_revision
from app.platform.events import Consumer
from app.platform.firebase import FirebaseAdmin
from app.platform.health import (
    HealthASGIApplication,
    HealthService,
    healthz,
    readyz_endpoint,
)
from app.platform.interceptors import service_interceptors
from app.platform.logs import configure_logging
from app.platform.middleware import (
    AuthMiddleware,
    BareRpcErrorMiddleware,
    CORSMiddleware,
    GrpcWebTextMiddleware,
    NotFoundApp,
    RequestBodyTimeoutMiddleware,
    RequestContextMiddleware,
)
from app.platform.observability import (
    ObservabilityMiddleware,
    configure_observability,
    metrics_routes,
)
from app.platform.overload import OverloadGuardMiddleware
from app.platform.pgmq_engine import create_relay
from app.platform.ratelimit import RateLimitMiddleware
from app.platform.reflection import reflection_apps
from app.platform.storage import ObjectStorage, create_storage
from app.settings import Settings
from app.users.access import deleted_account_checker, start_deletion_listener

log = logging.getLogger(__name__)

READINESS_TIMEOUT_SECONDS = 2.0


def build_verifier(
    settings: Settings,
    firebase: FirebaseAdmin | None = None,
    account_checker: Callable[[Principal], Awaitable[None]] | None = None,
) -> tuple[FirebaseTokenVerifier, CertificateSource | None]:
    """Create the ID token verifier for the configured certificate source or emulator.

    With AUTH_CHECK_REVOKED, tokens are checked against Firebase through `firebase`, and
    sessions revoked through it leave the verifier's cache at once. `account_checker` rejects
    tokens of deleted accounts; like the Firebase check, it runs for each new token and again
    for a cached one every minute.
    """
    emulator = bool(settings.firebase_auth_emulator_host)
    certificates = None
    if not emulator:
        if settings.uses_dev_keys:
            ensure_dev_keys(settings.dev_keys_dir)
        certificates = CertificateSource(
            settings.effective_certs_url, timeout_seconds=settings.auth_certs_timeout_seconds
        )

    checkers = []
    if settings.auth_check_revoked and firebase is not None:
        checkers.append(firebase.check_revoked)
    if account_checker is not None:
        checkers.append(account_checker)

    async def check_all(principal: Principal) -> None:
        for check in checkers:
            await check(principal)

    verifier = FirebaseTokenVerifier(
        project_id=settings.firebase_project_id,
        certificates=certificates,
        clock_skew_seconds=settings.auth_clock_skew_seconds,
        emulator=emulator,
        revocation_checker=check_all if checkers else None,
    )
    if firebase is not None:
        firebase.revocation_listeners.append(verifier.forget_user)
    return verifier, certificates


def build_consumers(
    settings: Settings, firebase: FirebaseAdmin | None = None, storage: ObjectStorage | None = None
) -> list[Consumer]:
    """Return the event consumers of every enabled domain.

    The files consumers use `storage`, or a new adapter from the settings when it is None.
    """
    consumers = []
    if "users" in settings.enabled_services and settings.has_firebase_accounts:
        from app.users.events import disable_sign_in_consumer

        consumers.append(disable_sign_in_consumer(firebase or FirebaseAdmin.from_settings(settings)))
    if "notifications" in settings.enabled_services:
        from app.notifications.events import (
            process_hub,
            user_deleted_consumer,
            welcome_consumer,
        )

        consumers.append(welcome_consumer(process_hub))
        consumers.append(user_deleted_consumer())
    if "files" in settings.enabled_services:
        from app.files.events import file_consumers

        consumers.extend(file_consumers(storage or create_storage(settings)))
    return consumers


def build_services(
    settings: Settings,
    database: Database,
    firebase: FirebaseAdmin,
    shutting_down: asyncio.Event,
    on_account_deleted: Callable[[str], None] | None = None,
    storage: ObjectStorage | None = None,
) -> list:
    """Create the connectrpc application of every enabled domain.

    Server streams end with `unavailable` once `shutting_down` is set. `on_account_deleted` is
    called with the uid of each account that DeleteMe deletes.
    """
    options = {
        "interceptors": service_interceptors(settings.default_deadline_seconds, settings.max_deadline_seconds),
        "read_max_bytes": settings.max_request_bytes,
        "codecs": server_codecs(),
    }
    services = []
    if "auth" in settings.enabled_services:
        from functions.auth.v1.auth_connect import AuthServiceASGIApplication

        from app.auth.handler import AuthHandler

        services.append(AuthServiceASGIApplication(AuthHandler(settings, firebase), **options))
    if "users" in settings.enabled_services:
        from functions.user.v1.user_connect import UserServiceASGIApplication

        from app.users.handler import UserHandler

        handler = UserHandler(
            database,
            firebase,
            on_account_deleted=on_account_deleted,
            disable_retried=settings.has_firebase_accounts,
            firebase_accounts=settings.has_firebase_accounts,
        )
        services.append(UserServiceASGIApplication(handler, **options))
    if "notifications" in settings.enabled_services:
        from functions.notification.v1.notification_connect import (
            NotificationServiceASGIApplication,
        )

        from app.notifications.events import process_hub
        from app.notifications.handler import NotificationHandler

        handler = NotificationHandler(database, process_hub, shutting_down)
        services.append(NotificationServiceASGIApplication(handler, **options))
    if "files" in settings.enabled_services and storage is not None:
        from functions.file.v1.file_connect import FileServiceASGIApplication

        from app.files.handler import FileHandler
        from app.files.logic import FileLimits, Files
        from app.platform.storage.local import LocalStorage

        files = Files(database, storage, FileLimits.from_settings(settings))
        if isinstance(storage, LocalStorage):
            # PUTs to signed upload URLs of deleted, completed or expired files get 410.
            storage.upload_gate = files.accepts_upload
        services.append(FileServiceASGIApplication(FileHandler(files), **options))
    return services


class RawBenchmarkMiddleware:
    """Reply to /bench/raw before any other layer, as the baseline that loadtests/bench.py compares RPCs with."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/bench/raw":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        await self.app(scope, receive, send)


def platform_middleware(settings: Settings, verifier: FirebaseTokenVerifier) -> list[Middleware]:
    """Return the ASGI middleware in front of every service, outermost first."""
    middleware = [
        Middleware(RequestContextMiddleware),
        Middleware(ObservabilityMiddleware, settings=settings),
        # CORS replies to preflights before the overload guard, auth and rate limits see them.
        Middleware(CORSMiddleware, allowed_origins=settings.cors_allowed_origins),
        Middleware(OverloadGuardMiddleware, settings=settings),
        # Inside the guard, so that a call whose body stalls gives its slot back.
        Middleware(RequestBodyTimeoutMiddleware, timeout_seconds=settings.request_body_timeout_seconds),
        Middleware(GrpcWebTextMiddleware),
        Middleware(AuthMiddleware, verifier=verifier),
        # After auth, so that signed-in callers are limited by uid rather than by IP.
        Middleware(RateLimitMiddleware, settings=settings),
        Middleware(BareRpcErrorMiddleware),
    ]
    if settings.benchmark_endpoints:
        middleware.insert(0, Middleware(RawBenchmarkMiddleware))
    return middleware


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the Starlette application serving every enabled service on every protocol."""
    settings = settings or Settings()
    configure_logging(settings)
    database = Database.from_settings(settings)
    configure_observability(settings, database)
    # EVENTS_ENGINE picks the relay: in-process by default, or pgmq queues shared by many processes.
    firebase = FirebaseAdmin.from_settings(settings)
    # One storage adapter serves the files service, its consumers and the upload sweeper.
    storage = create_storage(settings) if "files" in settings.enabled_services else None
    relay = create_relay(settings, database, build_consumers(settings, firebase, storage))
    # Every domain refuses the tokens of deleted accounts, wherever the users service runs.
    verifier, certificates = build_verifier(settings, firebase, deleted_account_checker(database))

    async def readiness_problem() -> str | None:
        """Return why this process cannot serve yet, or None when it can."""
        try:
            revision = await asyncio.wait_for(database.schema_revision(), READINESS_TIMEOUT_SECONDS)
        except Exception as error:  # noqa: BLE001 - any failure means not ready
            log.warning("readiness check failed: %s", type(error).__name__)
            return "database unreachable"
        # A revision this build does not know comes from a newer release that migrated first, as
        # in a rolling deploy. Its migrations keep older code working, so this build still serves.
        if revision is None or is_known_revision(revision) and revision != head_revision():
            log.warning(
                "not ready: the database schema is at revision %s and this build expects %s: run `python -m app migrate`",
                revision, head_revision(),
            )
            return f"database schema at revision {revision}, expected {head_revision()}"
        return None

    async def is_ready() -> bool:
        return await readiness_problem() is None

    # Set when shutdown starts (see DrainingServer); every server stream ends on it.
    shutting_down = asyncio.Event()
    services = build_services(
        settings, database, firebase, shutting_down, on_account_deleted=verifier.forget_user, storage=storage
    )
    service_names = [app.path.strip("/") for app in services]
    health = HealthService(service_names, is_ready)
    health.shutting_down = shutting_down
    interceptors = service_interceptors(settings.default_deadline_seconds, settings.max_deadline_seconds)
    platform_options = {"interceptors": interceptors, "codecs": server_codecs()}
    rpc_apps = [
        *services,
        HealthASGIApplication(health, **platform_options),
        # Reflection's own messages are protobuf-py ones, so it keeps connectrpc's default codecs.
        *reflection_apps([*service_names, "grpc.health.v1.Health"], interceptors=interceptors),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if settings.events_relay_in_web:
            relay.start()
        notification_fanout = None
        if "notifications" in settings.enabled_services:
            from app.notifications.events import process_hub
            from app.notifications.fanout import start_fanout

            notification_fanout = await start_fanout(database, process_hub, listen_url=settings.database_listen_url)
        # Deletions through other processes drop cached tokens here at once (Postgres only).
        deletion_listener = await start_deletion_listener(
            database, verifier.forget_user, verifier.forget_all, listen_url=settings.database_listen_url
        )
        upload_sweeper = None
        if storage is not None and settings.events_relay_in_web:
            from app.files.events import UploadSweeper
            from app.files.logic import FileLimits, Files

            upload_sweeper = UploadSweeper(Files(database, storage, FileLimits.from_settings(settings)))
            upload_sweeper.start()
        log.info("serving %s", ", ".join(service_names), extra={"services": service_names})
        yield
        health.shutting_down.set()
        if notification_fanout is not None:
            await notification_fanout.stop()
        if deletion_listener is not None:
            await deletion_listener.stop()
        if upload_sweeper is not None:
            await upload_sweeper.stop()
        if settings.events_relay_in_web:
            await relay.stop()
        if storage is not None:
            await storage.aclose()
        if certificates is not None:
            await certificates.aclose()
        await database.dispose()
        firebase.close()
        log.info("stopped")

    routes = [
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz_endpoint(readiness_problem), methods=["GET", "HEAD"]),
        *metrics_routes(settings),
        # The local adapter serves its own signed download and upload URLs.
        *(storage.routes() if storage is not None and settings.storage_backend == "local" else []),
        *(Mount(app.path, app) for app in rpc_apps),
    ]
    app = Starlette(routes=routes, middleware=platform_middleware(settings, verifier), lifespan=lifespan)
    app.router.default = NotFoundApp()
    # Starlette would redirect `/Service` to `/Service/` using the request's Host header.
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.database = database
    app.state.health = health
    app.state.relay = relay
    return app
