"""Message codecs for google.protobuf messages: binary, and JSON written compactly."""

from __future__ import annotations

import json
from typing import TypeVar

from connectrpc.codec import Codec
from connectrpc.compat import google_protobuf_binary_codec
from google.protobuf import json_format
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


class CompactJSONCodec(Codec[Message, M]):
    """Protobuf JSON without indentation.

    connectrpc's JSON codec for google.protobuf indents by two spaces, which makes
    CPython's json module fall back from its C encoder to the pure-Python one.
    Reading follows the protobuf JSON mapping, so int64 values may be strings or
    numbers and enums names or numbers; unknown fields are ignored.
    """

    def name(self) -> str:
        return "json"

    def encode(self, message: Message) -> bytes:
        value = json_format.MessageToDict(message)
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def decode(self, data: bytes | bytearray, message_class: type[M]) -> M:
        message = message_class()
        json_format.Parse(bytes(data), message, ignore_unknown_fields=True)
        return message


def server_codecs() -> list[Codec]:
    """Return the codecs every service accepts: binary protobuf and compact JSON."""
    return [google_protobuf_binary_codec(), CompactJSONCodec()]
