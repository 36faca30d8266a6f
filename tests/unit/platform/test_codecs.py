"""The JSON codec: compact output, the protobuf JSON mapping's alternatives on input, strict shapes."""

from __future__ import annotations

import pytest
from connectrpc.errors import ConnectError
from functions.options.v1 import options_pb2
from functions.user.v1 import user_pb2
from google.protobuf import descriptor_pb2

from app.platform.codecs import CompactJSONCodec

codec = CompactJSONCodec()


def test_output_has_no_whitespace() -> None:
    encoded = codec.encode(user_pb2.User(uid="u1", display_name="Zoë", preferences={"a": "b"}))

    assert encoded == '{"uid":"u1","displayName":"Zoë","preferences":{"a":"b"}}'.encode()


@pytest.mark.parametrize("body", [b'{"negativeIntValue": "-9007199254740993"}', b'{"negativeIntValue": -9007199254740993}'])
def test_int64_as_string_or_number(body: bytes) -> None:
    message = codec.decode(body, descriptor_pb2.UninterpretedOption)

    assert message.negative_int_value == -9007199254740993


@pytest.mark.parametrize("body", [b'{"access": "ACCESS_ROLE"}', b'{"access": 3}'])
def test_enum_as_name_or_number(body: bytes) -> None:
    message = codec.decode(body, options_pb2.AccessPolicy)

    assert message.access == options_pb2.ACCESS_ROLE


def test_proto_field_names_are_accepted() -> None:
    message = codec.decode(b'{"page_size": 3, "email_prefix": "a"}', user_pb2.ListUsersRequest)

    assert message.page_size == 3
    assert message.email_prefix == "a"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"user": {"display_nam": "A"}, "updateMask": "displayName"}',
            "user.display_nam is not a field of functions.user.v1.User: check its spelling",
        ),
        (
            b'{"user": {"displayName": "A"}, "newTopLevel": true}',
            "newTopLevel is not a field of functions.user.v1.UpdateMeRequest: check its spelling",
        ),
    ],
)
def test_unknown_fields_are_named(body: bytes, message: str) -> None:
    with pytest.raises(ConnectError) as raised:
        codec.decode(body, user_pb2.UpdateMeRequest)

    assert raised.value.message == message


def test_empty_body_is_empty_message() -> None:
    assert codec.decode(b"", user_pb2.GetMeRequest) == user_pb2.GetMeRequest()


def test_wrong_shape_names_field() -> None:
    with pytest.raises(ConnectError) as raised:
        codec.decode(b'{"user": ["not", "an", "object"]}', user_pb2.UpdateMeRequest)

    assert raised.value.message == "user must be a JSON object: got array"
    assert {d.type_name for d in raised.value.details} == {"google.rpc.ErrorInfo", "google.rpc.BadRequest"}
