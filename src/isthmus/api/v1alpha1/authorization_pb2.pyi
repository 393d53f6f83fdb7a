from isthmus.api.v1alpha1 import options_pb2 as _options_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuthorizationPolicySpec(_message.Message):
    __slots__ = ("selector", "rules")
    class Selector(_message.Message):
        __slots__ = ("service_account",)
        SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
        service_account: str
        def __init__(self, service_account: _Optional[str] = ...) -> None: ...
    class Caller(_message.Message):
        __slots__ = ("namespace", "service_account")
        NAMESPACE_FIELD_NUMBER: _ClassVar[int]
        SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
        namespace: str
        service_account: str
        def __init__(self, namespace: _Optional[str] = ..., service_account: _Optional[str] = ...) -> None: ...
    class To(_message.Message):
        __slots__ = ("ports", "paths", "methods")
        PORTS_FIELD_NUMBER: _ClassVar[int]
        PATHS_FIELD_NUMBER: _ClassVar[int]
        METHODS_FIELD_NUMBER: _ClassVar[int]
        ports: _containers.RepeatedScalarFieldContainer[int]
        paths: _containers.RepeatedScalarFieldContainer[str]
        methods: _containers.RepeatedScalarFieldContainer[str]
        def __init__(self, ports: _Optional[_Iterable[int]] = ..., paths: _Optional[_Iterable[str]] = ..., methods: _Optional[_Iterable[str]] = ...) -> None: ...
    class Rule(_message.Message):
        __slots__ = ("callers", "to")
        CALLERS_FIELD_NUMBER: _ClassVar[int]
        TO_FIELD_NUMBER: _ClassVar[int]
        callers: _containers.RepeatedCompositeFieldContainer[AuthorizationPolicySpec.Caller]
        to: AuthorizationPolicySpec.To
        def __init__(self, callers: _Optional[_Iterable[_Union[AuthorizationPolicySpec.Caller, _Mapping]]] = ..., to: _Optional[_Union[AuthorizationPolicySpec.To, _Mapping]] = ...) -> None: ...
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    selector: AuthorizationPolicySpec.Selector
    rules: _containers.RepeatedCompositeFieldContainer[AuthorizationPolicySpec.Rule]
    def __init__(self, selector: _Optional[_Union[AuthorizationPolicySpec.Selector, _Mapping]] = ..., rules: _Optional[_Iterable[_Union[AuthorizationPolicySpec.Rule, _Mapping]]] = ...) -> None: ...
