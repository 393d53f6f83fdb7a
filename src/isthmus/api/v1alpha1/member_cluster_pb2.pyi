import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from isthmus.api.v1alpha1 import condition_pb2 as _condition_pb2
from isthmus.api.v1alpha1 import options_pb2 as _options_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MemberClusterSpec(_message.Message):
    __slots__ = ("drain",)
    class Drain(_message.Message):
        __slots__ = ("weight",)
        WEIGHT_FIELD_NUMBER: _ClassVar[int]
        weight: int
        def __init__(self, weight: _Optional[int] = ...) -> None: ...
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    drain: MemberClusterSpec.Drain
    def __init__(self, drain: _Optional[_Union[MemberClusterSpec.Drain, _Mapping]] = ...) -> None: ...

class MemberClusterStatus(_message.Message):
    __slots__ = ("drain", "conditions")
    class Drain(_message.Message):
        __slots__ = ("weight", "state", "proxies_waiting", "updated")
        class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
            __slots__ = ()
            running: _ClassVar[MemberClusterStatus.Drain.State]
            done: _ClassVar[MemberClusterStatus.Drain.State]
            cancelled: _ClassVar[MemberClusterStatus.Drain.State]
        running: MemberClusterStatus.Drain.State
        done: MemberClusterStatus.Drain.State
        cancelled: MemberClusterStatus.Drain.State
        WEIGHT_FIELD_NUMBER: _ClassVar[int]
        STATE_FIELD_NUMBER: _ClassVar[int]
        PROXIES_WAITING_FIELD_NUMBER: _ClassVar[int]
        UPDATED_FIELD_NUMBER: _ClassVar[int]
        weight: int
        state: MemberClusterStatus.Drain.State
        proxies_waiting: int
        updated: _timestamp_pb2.Timestamp
        def __init__(self, weight: _Optional[int] = ..., state: _Optional[_Union[MemberClusterStatus.Drain.State, str]] = ..., proxies_waiting: _Optional[int] = ..., updated: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    drain: MemberClusterStatus.Drain
    conditions: _containers.RepeatedCompositeFieldContainer[_condition_pb2.Condition]
    def __init__(self, drain: _Optional[_Union[MemberClusterStatus.Drain, _Mapping]] = ..., conditions: _Optional[_Iterable[_Union[_condition_pb2.Condition, _Mapping]]] = ...) -> None: ...
