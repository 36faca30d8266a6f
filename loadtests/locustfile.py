"""Locust load test of UserService and AuthService over Connect JSON and native gRPC.

    .venv/bin/python -m locust -f loadtests/locustfile.py --host http://127.0.0.1:8080

Environment variables:

    LOCUST_TOKENS_FILE        ID tokens of ordinary users, one per line, for a deployment. Unset:
                              each user gets a development token for the uid load-<n>, minted
                              with the key pair in DEV_KEYS_DIR for FIREBASE_PROJECT_ID, which
                              must be the server's values of those two variables.
    LOCUST_ADMIN_TOKENS_FILE  ID tokens of users with the admin role, one per line; needs
                              LOCUST_TOKENS_FILE. Minted tokens are for the uids load-admin-<n>.
    LOCUST_ADMIN_USERS        admin users per protocol, which also call ListUsers. Default 1, or
                              0 when token files are used without LOCUST_ADMIN_TOKENS_FILE.

Both protocols send the same requests with the same weights: GetMe most, then UpdateMe, WhoAmI,
and ListUsers for admins only. Each user starts with GetMe, and each admin then with ListUsers,
so a short run calls both on each protocol. Connect JSON calls are POSTs of application/json to
/<service>/<method>. gRPC calls go over one grpcio channel per user to the host and port of
--host, with TLS when its scheme is https, and are reported with request type "grpc".
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import grpc.experimental.gevent

# Importing locust patches the standard library for gevent. grpcio must then be switched to
# gevent before the first channel exists, or each of its calls blocks every other user.
from locust import FastHttpUser, User, between, task

grpc.experimental.gevent.init_gevent()

from google.protobuf import field_mask_pb2, json_format  # noqa: E402
from google.protobuf.message import Message  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from functions.auth.v1 import auth_pb2  # noqa: E402
from functions.user.v1 import user_pb2  # noqa: E402

from loadtests.tokens import Credential, load_credentials  # noqa: E402

CALL_TIMEOUT_SECONDS = 10.0
LIST_PAGE_SIZE = 20
THEMES = ("light", "dark", "system")

CREDENTIALS = load_credentials()
ADMIN_USERS = int(os.environ.get("LOCUST_ADMIN_USERS", "1" if CREDENTIALS.has_admins else "0"))
if ADMIN_USERS < 0:
    raise ValueError(f"LOCUST_ADMIN_USERS must be 0 or more: got {ADMIN_USERS}")
if ADMIN_USERS > 0 and not CREDENTIALS.has_admins:
    raise ValueError(
        f"LOCUST_ADMIN_USERS={ADMIN_USERS} needs admin tokens: set LOCUST_ADMIN_TOKENS_FILE or LOCUST_ADMIN_USERS=0"
    )


@dataclass(frozen=True)
class Method:
    """One RPC: its service, its name and the type of its response."""

    service: str
    name: str
    response_type: type[Message]

    @property
    def path(self) -> str:
        """Return the HTTP path, shared by Connect and gRPC."""
        return f"/{self.service}/{self.name}"


GET_ME = Method("functions.user.v1.UserService", "GetMe", user_pb2.GetMeResponse)
UPDATE_ME = Method("functions.user.v1.UserService", "UpdateMe", user_pb2.UpdateMeResponse)
LIST_USERS = Method("functions.user.v1.UserService", "ListUsers", user_pb2.ListUsersResponse)
WHO_AM_I = Method("functions.auth.v1.AuthService", "WhoAmI", auth_pb2.WhoAmIResponse)
METHODS = (GET_ME, UPDATE_ME, LIST_USERS, WHO_AM_I)


class GrpcStatusError(Exception):
    """A gRPC call that ended with a status other than OK."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


def grpc_target(host: str) -> tuple[str, bool]:
    """Return the host:port of a locust --host URL and whether the channel uses TLS."""
    url = urlsplit(host)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"--host must be an http:// or https:// URL for gRPC users: got {host!r}")
    if url.path not in ("", "/"):
        raise ValueError(f"--host must have no path for gRPC users, because gRPC paths start at /: got {host!r}")

    use_tls = url.scheme == "https"
    port = url.port or (443 if use_tls else 80)
    hostname = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    return f"{hostname}:{port}", use_tls


def update_me_request(uid: str, sequence: int) -> user_pb2.UpdateMeRequest:
    """Build an UpdateMe that changes the display name, the preferences or both."""
    paths = random.choice((["display_name"], ["preferences"], ["display_name", "preferences"]))
    user = user_pb2.User()
    if "display_name" in paths:
        user.display_name = f"Load {uid} #{sequence}"[:64]
    if "preferences" in paths:
        user.preferences["theme"] = random.choice(THEMES)
        user.preferences["load_test_sequence"] = str(sequence)
    return user_pb2.UpdateMeRequest(user=user, update_mask=field_mask_pb2.FieldMask(paths=paths))


class ProfileUser(User):
    """A signed-in person using the app: reads their profile, edits it and checks who they are."""

    abstract = True
    # A person in an app pauses between calls. One user then makes at most 2 calls a second,
    # well below the server's default per-caller limit RATE_LIMIT_DEFAULT (600/minute).
    wait_time = between(0.5, 2.0)
    is_admin = False

    def on_start(self) -> None:
        self.credential: Credential = CREDENTIALS.issue(admin=self.is_admin)
        self.updates = 0
        self.open_app()

    def open_app(self) -> None:
        """Make the calls of an app that has just signed in: it loads the caller's profile."""
        self.get_me()

    def call(self, method: Method, request: Message) -> None:
        """Send one request and report it to locust."""
        raise NotImplementedError

    @task(10)
    def get_me(self) -> None:
        self.call(GET_ME, user_pb2.GetMeRequest())

    @task(3)
    def update_me(self) -> None:
        self.updates += 1
        self.call(UPDATE_ME, update_me_request(self.credential.uid, self.updates))

    @task(2)
    def who_am_i(self) -> None:
        self.call(WHO_AM_I, auth_pb2.WhoAmIRequest())


class ConnectJsonUser(ProfileUser, FastHttpUser):
    """Calls the services with Connect JSON, as a browser or curl does."""

    abstract = False

    def call(self, method: Method, request: Message) -> None:
        headers = {"content-type": "application/json", "authorization": self.credential.authorization()}
        body = json_format.MessageToJson(request, indent=None)
        with self.client.post(
            method.path, data=body, headers=headers, name=method.path, catch_response=True,
            context={"uid": self.credential.uid},
        ) as response:
            if response.status_code == 200:
                response.success()
            else:
                response.failure(connect_error_text(response))


def connect_error_text(response) -> str:
    """Return the Connect error code and message of a failed response, or its HTTP status."""
    # Locust's FastHttpUser reports status 0, with the socket or protocol error, when no
    # response arrived.
    if response.status_code == 0:
        return f"no response: {response.error!r}"
    try:
        error = response.json()
    except ValueError:
        error = None
    if isinstance(error, dict) and "code" in error:
        return f"{error['code']}: {error.get('message', '')}"
    return f"HTTP {response.status_code}"


class GrpcUser(ProfileUser):
    """Calls the services over native gRPC with grpcio, as a mobile or server client does."""

    abstract = False

    def on_start(self) -> None:
        # The channel must exist before ProfileUser.on_start makes the first call.
        target, use_tls = grpc_target(self.host or "")
        if use_tls:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials())
        else:
            self.channel = grpc.insecure_channel(target)
        self.stubs = {
            method.path: self.channel.unary_unary(
                method.path,
                request_serializer=lambda message: message.SerializeToString(),
                response_deserializer=method.response_type.FromString,
            )
            for method in METHODS
        }
        super().on_start()

    def on_stop(self) -> None:
        self.channel.close()

    def call(self, method: Method, request: Message) -> None:
        # The credential may mint a token, which must not count in the call's latency.
        metadata = (("authorization", self.credential.authorization()),)
        response = None
        error = None

        start = time.perf_counter()
        try:
            response = self.stubs[method.path](request, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as rpc_error:
            error = GrpcStatusError(rpc_error.code(), rpc_error.details() or "")
        response_time_ms = (time.perf_counter() - start) * 1000

        self.environment.events.request.fire(
            request_type="grpc",
            name=method.path,
            response_time=response_time_ms,
            response_length=response.ByteSize() if response is not None else 0,
            exception=error,
            context={"uid": self.credential.uid},
        )


class ConnectJsonAdminUser(ConnectJsonUser):
    """An admin on Connect JSON, who also lists the users."""

    abstract = ADMIN_USERS == 0
    fixed_count = ADMIN_USERS
    is_admin = True

    def open_app(self) -> None:
        """Load the caller's profile, then the first page of users, as the admin console does."""
        super().open_app()
        self.list_users()

    @task(2)
    def list_users(self) -> None:
        self.call(LIST_USERS, user_pb2.ListUsersRequest(page_size=LIST_PAGE_SIZE))


class GrpcAdminUser(GrpcUser):
    """An admin on gRPC, who also lists the users."""

    abstract = ADMIN_USERS == 0
    fixed_count = ADMIN_USERS
    is_admin = True

    def open_app(self) -> None:
        """Load the caller's profile, then the first page of users, as the admin console does."""
        super().open_app()
        self.list_users()

    @task(2)
    def list_users(self) -> None:
        self.call(LIST_USERS, user_pb2.ListUsersRequest(page_size=LIST_PAGE_SIZE))
