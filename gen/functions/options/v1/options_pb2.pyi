from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Access(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCESS_UNSPECIFIED: _ClassVar[Access]
    ACCESS_PUBLIC: _ClassVar[Access]
    ACCESS_SIGNED_IN: _ClassVar[Access]
    ACCESS_ROLE: _ClassVar[Access]
    ACCESS_SELF_OR_ADMIN: _ClassVar[Access]
ACCESS_UNSPECIFIED: Access
ACCESS_PUBLIC: Access
ACCESS_SIGNED_IN: Access
ACCESS_ROLE: Access
ACCESS_SELF_OR_ADMIN: Access
POLICY_FIELD_NUMBER: _ClassVar[int]
policy: _descriptor.FieldDescriptor

class AccessPolicy(_message.Message):
    __slots__ = ("access", "roles", "owner_field", "rate_limit")
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    access: Access
    roles: _containers.RepeatedScalarFieldContainer[str]
    owner_field: str
    rate_limit: str
    def __init__(self, access: _Optional[_Union[Access, str]] = ..., roles: _Optional[_Iterable[str]] = ..., owner_field: _Optional[str] = ..., rate_limit: _Optional[str] = ...) -> None: ...
