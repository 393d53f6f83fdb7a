import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from isthmus.api.v1alpha1 import condition_pb2 as _condition_pb2
from isthmus.api.v1alpha1 import options_pb2 as _options_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MeshConfigSpec(_message.Message):
    __slots__ = ("trust_domain", "export_policy", "max_staleness", "withdraw_after", "debounce", "gateways", "clusterset_range")
    class ExportPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        all: _ClassVar[MeshConfigSpec.ExportPolicy]
        serviceexport: _ClassVar[MeshConfigSpec.ExportPolicy]
    all: MeshConfigSpec.ExportPolicy
    serviceexport: MeshConfigSpec.ExportPolicy
    class Debounce(_message.Message):
        __slots__ = ("quiet", "max")
        QUIET_FIELD_NUMBER: _ClassVar[int]
        MAX_FIELD_NUMBER: _ClassVar[int]
        quiet: _duration_pb2.Duration
        max: _duration_pb2.Duration
        def __init__(self, quiet: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
    class Gateway(_message.Message):
        __slots__ = ("cluster", "address", "port")
        CLUSTER_FIELD_NUMBER: _ClassVar[int]
        ADDRESS_FIELD_NUMBER: _ClassVar[int]
        PORT_FIELD_NUMBER: _ClassVar[int]
        cluster: str
        address: str
        port: int
        def __init__(self, cluster: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    EXPORT_POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    WITHDRAW_AFTER_FIELD_NUMBER: _ClassVar[int]
    DEBOUNCE_FIELD_NUMBER: _ClassVar[int]
    GATEWAYS_FIELD_NUMBER: _ClassVar[int]
    CLUSTERSET_RANGE_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    export_policy: MeshConfigSpec.ExportPolicy
    max_staleness: _duration_pb2.Duration
    withdraw_after: _duration_pb2.Duration
    debounce: MeshConfigSpec.Debounce
    gateways: _containers.RepeatedCompositeFieldContainer[MeshConfigSpec.Gateway]
    clusterset_range: str
    def __init__(self, trust_domain: _Optional[str] = ..., export_policy: _Optional[_Union[MeshConfigSpec.ExportPolicy, str]] = ..., max_staleness: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., withdraw_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., debounce: _Optional[_Union[MeshConfigSpec.Debounce, _Mapping]] = ..., gateways: _Optional[_Iterable[_Union[MeshConfigSpec.Gateway, _Mapping]]] = ..., clusterset_range: _Optional[str] = ...) -> None: ...

class MeshConfigStatus(_message.Message):
    __slots__ = ("in_force", "conditions")
    class Setting(_message.Message):
        __slots__ = ("name", "value", "source")
        class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
            __slots__ = ()
            default: _ClassVar[MeshConfigStatus.Setting.Source]
            flag: _ClassVar[MeshConfigStatus.Setting.Source]
            meshconfig: _ClassVar[MeshConfigStatus.Setting.Source]
        default: MeshConfigStatus.Setting.Source
        flag: MeshConfigStatus.Setting.Source
        meshconfig: MeshConfigStatus.Setting.Source
        NAME_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        SOURCE_FIELD_NUMBER: _ClassVar[int]
        name: str
        value: str
        source: MeshConfigStatus.Setting.Source
        def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ..., source: _Optional[_Union[MeshConfigStatus.Setting.Source, str]] = ...) -> None: ...
    IN_FORCE_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    in_force: _containers.RepeatedCompositeFieldContainer[MeshConfigStatus.Setting]
    conditions: _containers.RepeatedCompositeFieldContainer[_condition_pb2.Condition]
    def __init__(self, in_force: _Optional[_Iterable[_Union[MeshConfigStatus.Setting, _Mapping]]] = ..., conditions: _Optional[_Iterable[_Union[_condition_pb2.Condition, _Mapping]]] = ...) -> None: ...
