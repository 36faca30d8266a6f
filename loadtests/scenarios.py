"""The requests the benchmark sends, and the check that one response of each is right."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import httpx
from functions.user.v1 import user_pb2
from google.protobuf import json_format
from google.protobuf.message import DecodeError

GET_ME_PATH = "/functions.user.v1.UserService/GetMe"
RAW_PATH = "/bench/raw"
BENCH_UID = "bench"
BENCH_EMAIL = "bench@example.com"
# The gRPC and gRPC-Web framing of an empty message: flag byte 0, then length 0 as uint32.
EMPTY_ENVELOPE = b"\x00\x00\x00\x00\x00"
GRPC_WEB_TRAILER_FLAG = 0x80
CHECK_TIMEOUT_SECONDS = 10.0


class BenchmarkError(Exception):
    """A failed step of the benchmark: the server, a load generator or a wrong response."""


@dataclass(frozen=True)
class Scenario:
    """One request, sent over and over by one load generator."""

    name: str
    description: str
    tool: str  # "wrk" (HTTP/1.1) or "h2load" (h2c with prior knowledge)
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    is_rpc: bool = True


def build_scenarios(token: str) -> list[Scenario]:
    """Return every scenario, baseline first; all RPCs call GetMe as the token's user."""
    bearer = {"authorization": f"Bearer {token}"}
    return [
        Scenario("raw", "GET /bench/raw, HTTP/1.1", "wrk", "GET", RAW_PATH, is_rpc=False),
        Scenario("raw-h2c", "GET /bench/raw, h2c", "h2load", "GET", RAW_PATH, is_rpc=False),
        Scenario(
            "connect-json", "GetMe, Connect JSON", "wrk", "POST", GET_ME_PATH,
            {"content-type": "application/json", "connect-protocol-version": "1", **bearer}, b"{}",
        ),
        Scenario(
            "connect-proto", "GetMe, Connect binary", "wrk", "POST", GET_ME_PATH,
            {"content-type": "application/proto", "connect-protocol-version": "1", **bearer}, b"",
        ),
        Scenario(
            "grpc-web", "GetMe, gRPC-Web binary", "wrk", "POST", GET_ME_PATH,
            {"content-type": "application/grpc-web+proto", "x-grpc-web": "1", **bearer}, EMPTY_ENVELOPE,
        ),
        Scenario(
            "grpc", "GetMe, gRPC over h2c", "h2load", "POST", GET_ME_PATH,
            {"content-type": "application/grpc", "te": "trailers", **bearer}, EMPTY_ENVELOPE,
        ),
    ]


def check_scenario(scenario: Scenario, base_url: str, address: str) -> int:
    """Send the scenario's request once and check the response.

    Returns the DATA bytes of one good gRPC response (envelope and message), which the gRPC
    load run compares its received bytes with, and 0 for every other scenario. raw-h2c is not
    sent here: h2load's status counts check it.
    """
    if scenario.name == "grpc":
        return len(EMPTY_ENVELOPE) + len(check_grpc(scenario, address))
    if scenario.tool == "wrk":
        check_http_scenario(scenario, base_url)
    return 0


def check_profile(response: user_pb2.GetMeResponse, scenario: str) -> None:
    """Raise BenchmarkError unless the response carries the benchmark user's profile."""
    user = response.user
    if user.uid != BENCH_UID or user.email != BENCH_EMAIL:
        raise BenchmarkError(f"{scenario}: expected the profile of {BENCH_UID!r}: got uid {user.uid!r}, email {user.email!r}")


def split_grpc_web_frames(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """Split a gRPC-Web response body into its messages and its trailers."""
    messages: list[bytes] = []
    trailers: dict[str, str] = {}
    offset = 0
    while offset < len(body):
        if len(body) - offset < 5:
            raise BenchmarkError(f"gRPC-Web body ends inside a frame header at byte {offset}")
        flags = body[offset]
        length = int.from_bytes(body[offset + 1 : offset + 5], "big")
        payload = body[offset + 5 : offset + 5 + length]
        if len(payload) != length:
            raise BenchmarkError(f"gRPC-Web frame at byte {offset} announces {length} bytes: got {len(payload)}")
        if flags & GRPC_WEB_TRAILER_FLAG:
            for line in payload.decode().split("\r\n"):
                if line:
                    name, _, value = line.partition(":")
                    trailers[name.strip().lower()] = value.strip()
        else:
            messages.append(payload)
        offset += 5 + length
    return messages, trailers


def check_http_scenario(scenario: Scenario, base_url: str) -> None:
    """Send the scenario's request once over HTTP/1.1 and check status and body."""
    try:
        response = httpx.request(
            scenario.method, base_url + scenario.path, headers=scenario.headers, content=scenario.body,
            timeout=CHECK_TIMEOUT_SECONDS,
        )
    except httpx.TimeoutException:
        raise BenchmarkError(f"{scenario.name}: no response within {CHECK_TIMEOUT_SECONDS:g} s") from None
    except httpx.HTTPError as error:
        raise BenchmarkError(f"{scenario.name}: request failed: {type(error).__name__}: {error}") from None
    if response.status_code != 200:
        raise BenchmarkError(f"{scenario.name}: expected HTTP 200: got {response.status_code} {response.text[:300]!r}")

    try:
        if scenario.name == "raw" and response.content != b"ok":
            raise BenchmarkError(f"raw: expected the body 'ok': got {response.content[:100]!r}")
        if scenario.name == "connect-json":
            check_profile(json_format.Parse(response.content, user_pb2.GetMeResponse()), scenario.name)
        if scenario.name == "connect-proto":
            check_profile(user_pb2.GetMeResponse.FromString(response.content), scenario.name)
        if scenario.name == "grpc-web":
            check_grpc_web_response(response)
    except (json_format.ParseError, DecodeError) as error:
        raise BenchmarkError(f"{scenario.name}: the body is not a GetMeResponse: {error}; body {response.content[:200]!r}") from None


def check_grpc_web_response(response: httpx.Response) -> None:
    header_status = response.headers.get("grpc-status")
    if header_status not in (None, "0"):
        raise BenchmarkError(f"grpc-web: expected grpc-status 0: got {header_status} {response.headers.get('grpc-message')!r}")
    messages, trailers = split_grpc_web_frames(response.content)
    if trailers.get("grpc-status") != "0":
        raise BenchmarkError(f"grpc-web: expected the trailer grpc-status 0: got trailers {trailers}")
    if len(messages) != 1:
        raise BenchmarkError(f"grpc-web: expected 1 message: got {len(messages)}")
    check_profile(user_pb2.GetMeResponse.FromString(messages[0]), "grpc-web")


def check_grpc(scenario: Scenario, address: str) -> bytes:
    """Call GetMe once with grpcio; return the response message's bytes after checking them."""
    metadata = [(name, value) for name, value in scenario.headers.items() if name == "authorization"]
    with grpc.insecure_channel(address) as channel:
        get_me = channel.unary_unary(
            GET_ME_PATH,
            request_serializer=user_pb2.GetMeRequest.SerializeToString,
            response_deserializer=user_pb2.GetMeResponse.FromString,
        )
        try:
            response, call = get_me.with_call(user_pb2.GetMeRequest(), metadata=metadata, timeout=CHECK_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            raise BenchmarkError(f"grpc: GetMe failed with {error.code().name}: {error.details()}") from None
    if call.code() != grpc.StatusCode.OK:
        raise BenchmarkError(f"grpc: expected status OK: got {call.code().name}")
    check_profile(response, scenario.name)
    return response.SerializeToString()
