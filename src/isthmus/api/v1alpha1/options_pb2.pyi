from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor
SCHEMA_FIELD_NUMBER: _ClassVar[int]
schema: _descriptor.FieldDescriptor

class Constraints(_message.Message):
    __slots__ = ("minimum", "maximum", "pattern", "enum", "min_length", "max_length", "required", "format", "list_map_keys", "max_items")
    MINIMUM_FIELD_NUMBER: _ClassVar[int]
    MAXIMUM_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    ENUM_FIELD_NUMBER: _ClassVar[int]
    MIN_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    LIST_MAP_KEYS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
    minimum: int
    maximum: int
    pattern: str
    enum: _containers.RepeatedScalarFieldContainer[str]
    min_length: int
    max_length: int
    required: bool
    format: str
    list_map_keys: _containers.RepeatedScalarFieldContainer[str]
    max_items: int
    def __init__(self, minimum: _Optional[int] = ..., maximum: _Optional[int] = ..., pattern: _Optional[str] = ..., enum: _Optional[_Iterable[str]] = ..., min_length: _Optional[int] = ..., max_length: _Optional[int] = ..., required: _Optional[bool] = ..., format: _Optional[str] = ..., list_map_keys: _Optional[_Iterable[str]] = ..., max_items: _Optional[int] = ...) -> None: ...
