"""Message codecs for google.protobuf messages: binary, and JSON written compactly."""

from __future__ import annotations

import json
from functools import cache
from typing import Any, TypeVar

from connectrpc.codec import Codec
from connectrpc.compat import google_protobuf_binary_codec
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from app.platform.context import current_request_id
from app.platform.errors import FieldViolation, InvalidInput, to_connect_error

M = TypeVar("M", bound=Message)

# Well-known types whose JSON form is not an object of their fields (a string, a number, a list).
_SPECIAL_JSON_TYPES = frozenset(
    f"google.protobuf.{name}"
    for name in (
        "Any", "Timestamp", "Duration", "FieldMask", "Struct", "Value", "ListValue", "DoubleValue", "FloatValue",
        "Int64Value", "UInt64Value", "Int32Value", "UInt32Value", "BoolValue", "StringValue", "BytesValue",
    )
)
_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}


class CompactJSONCodec(Codec[Message, M]):
    """Protobuf JSON without indentation, read strictly.

    connectrpc's JSON codec for google.protobuf indents by two spaces, which makes
    CPython's json module fall back from its C encoder to the pure-Python one.
    Reading follows the protobuf JSON mapping, so int64 values may be strings or
    numbers and enums names or numbers. A key that names no field is an error
    naming it, because a misspelled field would otherwise be read as unset, and an
    update mask would then clear it. A known field of the wrong JSON type is an
    error too: google.protobuf's own lenient mode would read `"user": "x"` as an
    empty message.
    """

    def name(self) -> str:
        return "json"

    def encode(self, message: Message) -> bytes:
        value = json_format.MessageToDict(message)
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def decode(self, data: bytes | bytearray, message_class: type[M]) -> M:
        message = message_class()
        try:
            value = json.loads(data) if data else {}
            _check_fields(value, message.DESCRIPTOR, "")
            json_format.ParseDict(value, message)
        except InvalidInput as error:
            raise to_connect_error(error, current_request_id()) from None
        except json.JSONDecodeError as error:
            raise _invalid_body(f"must be valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
        except RecursionError:
            raise _invalid_body("must not nest JSON values this deeply") from None
        except json_format.ParseError as error:
            # google.protobuf's messages end with one or two periods.
            raise _invalid_body(f"does not match {message.DESCRIPTOR.full_name}: {str(error).rstrip('.')}") from None
        except (TypeError, ValueError):
            raise _invalid_body(f"does not match {message.DESCRIPTOR.full_name}") from None
        return message


def _invalid_body(problem: str):
    return to_connect_error(InvalidInput(FieldViolation("request body", problem)), current_request_id())


@cache
def _fields_by_json_key(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    """Map both JSON names (camelCase) and proto names of a message's fields to the fields."""
    fields = {field.name: field for field in descriptor.fields}
    fields.update({field.json_name: field for field in descriptor.fields})
    return fields


def _check_fields(value: Any, descriptor: Descriptor, path: str) -> None:
    """Raise InvalidInput for a key that names no field, or where a message is not a JSON object."""
    if descriptor.full_name in _SPECIAL_JSON_TYPES:
        return
    if not isinstance(value, dict):
        kind = "null" if value is None else _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
        raise InvalidInput(FieldViolation(path or "request body", f"must be a JSON object: got {kind}"))

    fields = _fields_by_json_key(descriptor)
    seen: set[str] = set()
    for key in list(value):
        field = fields.get(key)
        if field is None:
            unknown_path = f"{path}.{key}" if path else key
            raise InvalidInput(FieldViolation(unknown_path, f"is not a field of {descriptor.full_name}: check its spelling"))
        field_path = f"{path}.{field.name}" if path else field.name
        if field.name in seen:
            raise InvalidInput(FieldViolation(field_path, f"must appear once: got both {field.name} and {field.json_name}"))
        seen.add(field.name)
        item = value[key]
        if field.message_type is None or item is None:
            continue

        if field.message_type.GetOptions().map_entry:
            value_type = field.message_type.fields_by_name["value"].message_type
            if value_type is not None and isinstance(item, dict):
                for map_key, map_value in item.items():
                    _check_fields(map_value, value_type, f"{field_path}[{map_key}]")
        elif field.is_repeated:
            if isinstance(item, list):
                for index, element in enumerate(item):
                    _check_fields(element, field.message_type, f"{field_path}[{index}]")
        else:
            _check_fields(item, field.message_type, field_path)


def server_codecs() -> list[Codec]:
    """Return the codecs every service accepts: binary protobuf and compact JSON."""
    return [google_protobuf_binary_codec(), CompactJSONCodec()]
