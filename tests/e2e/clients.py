"""One way to call any RPC over each protocol, with real clients.

- Connect JSON: httpx, the way curl or a browser's fetch would.
- Connect binary and gRPC-Web: the generated connectrpc clients.
- gRPC: grpcio over HTTP/2 cleartext.

`call_client_stream` sends a list of messages to a client-streaming method: Connect JSON as
enveloped JSON frames over httpx, Connect binary and gRPC-Web with the generated clients, gRPC
with grpcio's stream_unary.

Every call returns the decoded response or raises RpcError with the Connect code name
(`not_found`, ...), the message and the error details as google.protobuf messages.
"""

from __future__ import annotations

import base64
import enum
import json
import re
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import httpx
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from functions.auth.v1 import auth_connect
from functions.file.v1 import file_connect
from functions.user.v1 import user_connect
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2


class Protocol(enum.Enum):
    CONNECT_JSON = "connect-json"
    CONNECT_PROTO = "connect-proto"
    GRPC_WEB = "grpc-web"
    GRPC = "grpc"


ALL_PROTOCOLS = list(Protocol)

_CLIENTS = {
    "functions.user.v1.UserService": user_connect.UserServiceClient,
    "functions.auth.v1.AuthService": auth_connect.AuthServiceClient,
    "functions.file.v1.FileService": file_connect.FileServiceClient,
}
# A Connect streaming envelope: one flag byte, then the big-endian length of the message.
_ENVELOPE_HEADER = struct.Struct(">BI")
_END_STREAM_FLAG = 0x02
_DETAIL_TYPES = {
    "google.rpc.BadRequest": error_details_pb2.BadRequest,
    "google.rpc.ErrorInfo": error_details_pb2.ErrorInfo,
    "google.rpc.RetryInfo": error_details_pb2.RetryInfo,
}


@dataclass
class RpcError(Exception):
    code: str
    message: str
    details: list[Message] = field(default_factory=list)

    def detail(self, kind: type[Message]) -> Message | None:
        return next((d for d in self.details if isinstance(d, kind)), None)

    @property
    def reason(self) -> str:
        info = self.detail(error_details_pb2.ErrorInfo)
        return info.reason if info else ""

    @property
    def violations(self) -> dict[str, str]:
        bad_request = self.detail(error_details_pb2.BadRequest)
        return {v.field: v.description for v in bad_request.field_violations} if bad_request else {}


def _decode_detail(type_name: str, value: bytes) -> Message | None:
    kind = _DETAIL_TYPES.get(type_name)
    return kind.FromString(value) if kind else None


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _headers(token: str | None, headers: dict[str, str] | None) -> dict[str, str]:
    result = dict(headers or {})
    if token:
        result["authorization"] = f"Bearer {token}"
    return result


async def call(
    protocol: Protocol,
    address: str,
    service: str,
    method: str,
    request: Message,
    response_type: type[Message],
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> Message:
    """Call service/method on the server at address (host:port) over protocol."""
    all_headers = _headers(token, headers)
    if protocol is Protocol.CONNECT_JSON:
        return await _call_connect_json(address, service, method, request, response_type, all_headers)
    if protocol is Protocol.GRPC:
        return await _call_grpc(address, service, method, request, response_type, all_headers)
    return await _call_connectrpc(protocol, address, service, method, request, all_headers)


async def _call_connect_json(address, service, method, request, response_type, headers) -> Message:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            f"http://{address}/{service}/{method}",
            content=json_format.MessageToJson(request),
            headers={"content-type": "application/json", **headers},
        )
    if response.status_code == 200:
        return json_format.Parse(response.content, response_type(), ignore_unknown_fields=True)
    body = response.json()
    details = []
    for item in body.get("details", []):
        value = item["value"] + "=" * (-len(item["value"]) % 4)
        decoded = _decode_detail(item["type"], base64.b64decode(value))
        if decoded is not None:
            details.append(decoded)
    raise RpcError(body["code"], body.get("message", ""), details)


async def _call_connectrpc(protocol, address, service, method, request, headers) -> Message:
    protocol_type = ProtocolType.GRPC_WEB if protocol is Protocol.GRPC_WEB else ProtocolType.CONNECT
    async with _CLIENTS[service](f"http://{address}", protocol=protocol_type) as client:
        try:
            return await getattr(client, _snake(method))(request, headers=headers)
        except ConnectError as error:
            details = [d for d in (_decode_detail(x.type_name, x.message_bytes) for x in error.details) if d]
            raise RpcError(error.code.value, error.message, details) from None


async def _call_grpc(address, service, method, request, response_type, headers) -> Message:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        try:
            return await stub(request, metadata=list(headers.items()), timeout=30)
        except grpc.aio.AioRpcError as error:
            details = []
            for key, value in error.trailing_metadata() or ():
                if key == "grpc-status-details-bin":
                    status = status_pb2.Status.FromString(value)
                    details = [
                        d for d in (_decode_detail(a.type_url.split("/")[-1], a.value) for a in status.details) if d
                    ]
            raise RpcError(error.code().name.lower(), error.details() or "", details) from None


async def call_client_stream(
    protocol: Protocol,
    address: str,
    service: str,
    method: str,
    requests: Sequence[Message],
    response_type: type[Message],
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> Message:
    """Send `requests` in order to the client-streaming service/method over protocol and return its response."""
    all_headers = _headers(token, headers)
    if protocol is Protocol.CONNECT_JSON:
        return await _client_stream_connect_json(address, service, method, requests, response_type, all_headers)
    if protocol is Protocol.GRPC:
        return await _client_stream_grpc(address, service, method, requests, response_type, all_headers)
    return await _client_stream_connectrpc(protocol, address, service, method, requests, all_headers)


async def _client_stream_connect_json(address, service, method, requests, response_type, headers) -> Message:
    frames = []
    for request in requests:
        payload = json_format.MessageToJson(request).encode()
        frames.append(_ENVELOPE_HEADER.pack(0, len(payload)) + payload)

    async def body() -> AsyncIterator[bytes]:
        for frame in frames:
            yield frame

    request_headers = {"content-type": "application/connect+json", "connect-protocol-version": "1", **headers}
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(f"http://{address}/{service}/{method}", content=body(), headers=request_headers)
    if response.status_code != 200:
        error = response.json()
        raise RpcError(error["code"], error.get("message", ""), _json_details(error))

    result = None
    buffer = response.content
    while buffer:
        flags, length = _ENVELOPE_HEADER.unpack_from(buffer)
        payload = buffer[_ENVELOPE_HEADER.size : _ENVELOPE_HEADER.size + length]
        buffer = buffer[_ENVELOPE_HEADER.size + length :]
        if flags & _END_STREAM_FLAG:
            error = json.loads(payload).get("error")
            if error:
                raise RpcError(error["code"], error.get("message", ""), _json_details(error))
        else:
            result = json_format.Parse(payload, response_type(), ignore_unknown_fields=True)
    if result is None:
        raise AssertionError("the Connect stream ended without a response message")
    return result


def _json_details(error: dict) -> list[Message]:
    details = []
    for item in error.get("details", []):
        value = item["value"] + "=" * (-len(item["value"]) % 4)
        decoded = _decode_detail(item["type"], base64.b64decode(value))
        if decoded is not None:
            details.append(decoded)
    return details


async def _client_stream_connectrpc(protocol, address, service, method, requests, headers) -> Message:
    protocol_type = ProtocolType.GRPC_WEB if protocol is Protocol.GRPC_WEB else ProtocolType.CONNECT

    async def messages() -> AsyncIterator[Message]:
        for request in requests:
            yield request

    async with _CLIENTS[service](f"http://{address}", protocol=protocol_type) as client:
        try:
            return await getattr(client, _snake(method))(messages(), headers=headers)
        except ConnectError as error:
            details = [d for d in (_decode_detail(x.type_name, x.message_bytes) for x in error.details) if d]
            raise RpcError(error.code.value, error.message, details) from None


async def _client_stream_grpc(address, service, method, requests, response_type, headers) -> Message:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = channel.stream_unary(
            f"/{service}/{method}",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        try:
            return await stub(iter(requests), metadata=list(headers.items()), timeout=30)
        except grpc.aio.AioRpcError as error:
            raise RpcError(error.code().name.lower(), error.details() or "", _grpc_details(error)) from None


def _grpc_details(error: grpc.aio.AioRpcError) -> list[Message]:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            return [d for d in (_decode_detail(a.type_url.split("/")[-1], a.value) for a in status.details) if d]
    return []
