"""Service settings, read from the environment with embedded defaults that are safe to run."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

GOOGLE_CERTS_URL = "https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com"
ALL_SERVICES = ("auth", "users", "notifications", "files")
DEV_PROJECT_ID = "functions-dev"


def _split_list(value: object) -> object:
    """Accept comma-separated lists in environment variables."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every setting of the service. Environment variables use the upper-case field name."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    app_env: Literal["development", "test", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # uvicorn serves HTTP/1.1 and h2c on one port; pyvoy is the alternative.
    server: Literal["uvicorn", "pyvoy"] = "uvicorn"
    enabled_services: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(ALL_SERVICES))

    # SQLite under ./var/ by default; postgresql+asyncpg://... for Postgres.
    database_url: str = "sqlite+aiosqlite:///./var/functions.db"
    database_pool_size: int = Field(default=10, ge=1)
    database_max_overflow: int = Field(default=10, ge=0)
    database_pool_timeout_seconds: float = Field(default=5.0, gt=0)
    # Set for URLs through a transaction-mode pooler (PgBouncer, Supabase port 6543)
    # when the port alone does not tell; prepared-statement caches are then off.
    database_pooler: bool = False
    # A direct or session-mode URL of the same Postgres database for the one LISTEN connection
    # of live notification delivery, needed when DATABASE_URL goes through a transaction-mode
    # pooler, where LISTEN does not work (Supabase: port 5432 instead of 6543). Empty means
    # DATABASE_URL.
    database_listen_url: str = ""

    firebase_project_id: str = DEV_PROJECT_ID
    # Empty means the local development key pair under dev_keys_dir.
    firebase_certs_url: str = ""
    firebase_auth_emulator_host: str = ""
    auth_clock_skew_seconds: int = Field(default=5, ge=0, le=60)
    auth_certs_timeout_seconds: float = Field(default=2.0, gt=0)
    # Ask Firebase whether the token was revoked or the user disabled on every new token.
    auth_check_revoked: bool = False
    dev_keys_dir: Path = Path("var/dev-keys")

    cors_allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)

    # Per caller, for RPCs whose policy names no rate_limit; notation of the `limits` package.
    rate_limit_default: str = "600/minute"
    # memory:// keeps counters per process; redis://host:6379/0 shares them between instances.
    rate_limit_storage_url: str = "memory://"
    # Take the client IP from Fly-Client-IP; only true behind Fly's proxy, which sets it.
    trust_fly_proxy: bool = False

    # Calls handled at once per process; more get `unavailable` at once instead of queueing.
    max_concurrent_requests: int = Field(default=256, ge=1)
    # Server streams (Subscribe, Health/Watch) open at once per process. They last as long as
    # their clients stay, so they have their own budget and do not take the slots of other calls.
    max_concurrent_streams: int = Field(default=1024, ge=1)
    # Calls and streams one caller (uid, else client IP) may have in progress at once per process.
    max_calls_per_caller: int = Field(default=32, ge=1)
    # Seconds a request body, or the next message of a client stream, may take to arrive. A call
    # whose body is later ends with deadline_exceeded and frees its slot.
    request_body_timeout_seconds: float = Field(default=15.0, gt=0)
    # Deadline for calls that carry none (connect-timeout-ms, grpc-timeout); it also bounds SQL.
    default_deadline_seconds: float = Field(default=30.0, gt=0)
    # Maximum deadline of a unary or client-streaming call. Longer client deadlines are cut to it.
    max_deadline_seconds: float = Field(default=300.0, gt=0)
    # Seconds in-flight unary calls get to finish after SIGTERM; below fly.toml's kill_timeout.
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)

    # Run the event relay inside each web process (the embedded default). Set false when a
    # separate `python -m app worker` process relays the events instead.
    events_relay_in_web: bool = True
    # How events reach consumers: "inprocess" relays from the outbox inside each process, and
    # "pgmq" sends them through one pgmq queue per consumer so several workers share them.
    # pgmq needs PostgreSQL with the pgmq extension or SQL installed.
    events_engine: Literal["inprocess", "pgmq"] = "inprocess"
    # With pgmq: how long a message read by a worker stays hidden from the others. A crashed
    # worker's messages come back after this long, so keep it above the slowest consumer's run.
    events_visibility_timeout_seconds: int = Field(default=30, ge=1, le=3600)

    # Where file bytes live: "local" keeps them under storage_local_dir and the app serves its own
    # signed URLs; "supabase" keeps them in a Supabase Storage bucket.
    storage_backend: Literal["local", "supabase"] = "local"
    storage_local_dir: Path = Path("var/files")
    # HMAC key of the local adapter's signed URLs. Empty means a random key kept in
    # storage_local_dir, which is fine for one instance; set it when several instances serve files.
    storage_signing_key: str = ""
    # Scheme, host and port that clients reach this service at, for the local adapter's signed
    # URLs. Empty means http://HOST:PORT.
    public_base_url: str = ""
    # Supabase project URL (https://<ref>.supabase.co), its service role key and the bucket.
    supabase_url: str = ""
    supabase_service_key: str = ""
    supabase_storage_bucket: str = "files"
    # Largest file accepted, and the bytes and number of files one user may keep.
    files_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    files_quota_bytes: int = Field(default=100 * 1024 * 1024, ge=1)
    files_quota_count: int = Field(default=1000, ge=1)
    # Content types accepted, as sniffed from the bytes; the declared type must agree.
    files_allowed_types: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf", "text/plain"]
    )
    # Upload and CompleteUpload calls that run at once per user and per process. Each keeps a
    # whole file in memory, so these bound the memory that uploads take.
    files_max_concurrent_uploads_per_user: int = Field(default=2, ge=1)
    files_max_concurrent_uploads: int = Field(default=8, ge=1)
    # How long signed upload and download URLs stay valid. Uploads not completed by then are removed.
    files_upload_url_ttl_seconds: int = Field(default=900, ge=10, le=7 * 24 * 3600)
    files_download_url_ttl_seconds: int = Field(default=300, ge=10, le=7 * 24 * 3600)

    # OTLP/HTTP endpoint for traces, e.g. http://collector:4318; empty exports nothing.
    otel_exporter_otlp_endpoint: str = ""
    otel_service_name: str = "functions"
    # 0 serves Prometheus metrics at /metrics on the main port; another port serves them there alone.
    metrics_port: int = Field(default=0, ge=0, le=65535)

    # Mounts /bench/raw, a bare ASGI endpoint that loadtests/bench.py compares the RPCs against.
    benchmark_endpoints: bool = False

    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "text"

    @model_validator(mode="before")
    @classmethod
    def _split_lists(cls, data: object) -> object:
        if isinstance(data, dict):
            for key in ("enabled_services", "cors_allowed_origins", "files_allowed_types"):
                for name in (key, key.upper()):
                    if name in data:
                        data[name] = _split_list(data[name])
        return data

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.database_url.startswith(("sqlite", "postgres")):
            raise ValueError(f"DATABASE_URL must be a sqlite or postgresql URL: got scheme {self.database_url.split(':')[0]!r}")
        if self.database_listen_url and not self.database_listen_url.startswith("postgres"):
            raise ValueError(
                f"DATABASE_LISTEN_URL must be a postgresql URL: got scheme {self.database_listen_url.split(':')[0]!r}"
            )
        unknown = sorted(set(self.enabled_services) - set(ALL_SERVICES))
        if unknown:
            raise ValueError(f"ENABLED_SERVICES has unknown services {unknown}: known are {list(ALL_SERVICES)}")
        if self.storage_backend == "supabase" and not (self.supabase_url and self.supabase_service_key):
            raise ValueError("SUPABASE_URL and SUPABASE_SERVICE_KEY must be set when STORAGE_BACKEND=supabase")
        if self.app_env == "production":
            if self.firebase_auth_emulator_host:
                raise ValueError("FIREBASE_AUTH_EMULATOR_HOST must be empty when APP_ENV=production: emulator tokens are unsigned")
            if self.firebase_project_id == DEV_PROJECT_ID:
                raise ValueError(
                    f"FIREBASE_PROJECT_ID must name your Firebase project when APP_ENV=production: got the development default {DEV_PROJECT_ID!r}"
                )
            if self.storage_backend == "local" and not self.storage_signing_key:
                raise ValueError("STORAGE_SIGNING_KEY must be set when APP_ENV=production and STORAGE_BACKEND=local: every instance must sign URLs with the same key")
            if self.firebase_certs_url != GOOGLE_CERTS_URL:
                raise ValueError(f"FIREBASE_CERTS_URL must be {GOOGLE_CERTS_URL} when APP_ENV=production: got {self.firebase_certs_url!r}")
        return self

    @cached_property
    def dev_certs_url(self) -> str:
        """Return the file:// URL of the development certificates."""
        return (self.dev_keys_dir.resolve() / "certs.json").as_uri()

    @property
    def effective_certs_url(self) -> str:
        """Return the certificate source in use: the setting, else the development key pair."""
        return self.firebase_certs_url or self.dev_certs_url

    @property
    def effective_public_base_url(self) -> str:
        """Return the base URL of the local adapter's signed URLs: the setting, else http://HOST:PORT."""
        return (self.public_base_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def has_firebase_accounts(self) -> bool:
        """Return whether users sign in with a Firebase project or its emulator, not with development keys."""
        return bool(self.firebase_auth_emulator_host) or not self.uses_dev_keys

    @property
    def uses_dev_keys(self) -> bool:
        """Return whether tokens are verified against the local development key pair."""
        return not self.firebase_certs_url
