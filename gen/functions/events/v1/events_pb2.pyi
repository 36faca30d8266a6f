from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UserCreated(_message.Message):
    __slots__ = ("uid",)
    UID_FIELD_NUMBER: _ClassVar[int]
    uid: str
    def __init__(self, uid: _Optional[str] = ...) -> None: ...

class UserUpdated(_message.Message):
    __slots__ = ("uid", "changed_fields", "version")
    UID_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    uid: str
    changed_fields: _field_mask_pb2.FieldMask
    version: int
    def __init__(self, uid: _Optional[str] = ..., changed_fields: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class UserDeleted(_message.Message):
    __slots__ = ("uid",)
    UID_FIELD_NUMBER: _ClassVar[int]
    uid: str
    def __init__(self, uid: _Optional[str] = ...) -> None: ...

class FileUploaded(_message.Message):
    __slots__ = ("file_id", "uid")
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    file_id: str
    uid: str
    def __init__(self, file_id: _Optional[str] = ..., uid: _Optional[str] = ...) -> None: ...

class FileDeleted(_message.Message):
    __slots__ = ("file_id", "uid")
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    file_id: str
    uid: str
    def __init__(self, file_id: _Optional[str] = ..., uid: _Optional[str] = ...) -> None: ...
