"""CSDS (envoy.service.status.v3.ClientStatusDiscoveryService) on the xDS port: which
configuration each connected client holds, asked the way Envoy's own tooling asks.

* ``FetchClientStatus`` (unary) and ``StreamClientStatus`` (one answer per request) answer a
  ``ClientStatusRequest``: every connected proxy whose node id matches ``node_matchers`` (exact,
  prefix, suffix, contains or a regex on the id; no matcher: every proxy), with one
  ``GenericXdsConfig`` per resource it holds: type, name, version, the resource itself (unless
  ``exclude_resource_contents``; never for secrets, whose private keys are their owner's alone),
  the type's config status (SYNCED, STALE, ERROR after a NACK, NOT_SENT) and the client's.
* Callers are checked before anything is read (``check``: the admin API's rule, right ``read``
  on ``/debug/csds``, with the ``authorization: Bearer`` metadata): UNAUTHENTICATED,
  PERMISSION_DENIED or UNAVAILABLE otherwise. A request this cannot answer (an unsupported
  matcher, a bad regex) gets INVALID_ARGUMENT; the stream ends, nothing else does.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.status.v3 import csds_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2

from isthmus.xds.server.introspect import NACKED, NOT_SENT, SECRET_TYPE, STALE, SYNCED, held, sync_state
from isthmus.xds.server.stream import Stream

SERVICE = "envoy.service.status.v3.ClientStatusDiscoveryService"
# (token or None) -> (200/401/403/503, who or why): the admin API's check of right "read".
CsdsCheck = Callable[[str | None], Awaitable[tuple[int, str]]]

_CONFIG = {
    SYNCED: csds_pb2.SYNCED,
    STALE: csds_pb2.STALE,
    NACKED: csds_pb2.ERROR,
    NOT_SENT: csds_pb2.NOT_SENT,
}
_CLIENT = {
    SYNCED: config_dump_shared_pb2.ACKED,
    STALE: config_dump_shared_pb2.REQUESTED,
    NACKED: config_dump_shared_pb2.NACKED,
    NOT_SENT: config_dump_shared_pb2.REQUESTED,
}
_REFUSED = {401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED}
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class BadRequest(ValueError):
    """A ClientStatusRequest this server cannot answer; the message says why."""


def _string_matcher(matcher: string_pb2.StringMatcher) -> Callable[[str], bool]:
    kind = matcher.WhichOneof("match_pattern")
    fold = matcher.ignore_case

    def norm(text: str) -> str:
        return text.lower() if fold else text

    if kind == "exact":
        return lambda s: norm(s) == norm(matcher.exact)
    if kind == "prefix":
        return lambda s: norm(s).startswith(norm(matcher.prefix))
    if kind == "suffix":
        return lambda s: norm(s).endswith(norm(matcher.suffix))
    if kind == "contains":
        return lambda s: norm(matcher.contains) in norm(s)
    if kind == "safe_regex":
        try:
            pattern = re.compile(matcher.safe_regex.regex)
        except re.error as exc:
            raise BadRequest(f"node_matchers: bad regex {matcher.safe_regex.regex!r}: {exc}") from None
        return lambda s: pattern.fullmatch(s) is not None
    raise BadRequest(f"node_matchers: node_id matcher {kind or 'unset'} is not supported")


def _matchers(request: csds_pb2.ClientStatusRequest) -> list[Callable[[str], bool]]:
    out = []
    for matcher in request.node_matchers:
        if matcher.node_metadatas:
            raise BadRequest("node_matchers: node_metadatas are not supported (match the node id)")
        out.append(_string_matcher(matcher.node_id) if matcher.HasField("node_id") else (lambda s: True))
    return out


def client_status(
    streams: list[Stream], request: csds_pb2.ClientStatusRequest
) -> csds_pb2.ClientStatusResponse:
    """The answer to ``request`` from the open ``streams`` (BadRequest when it cannot be answered)."""
    matchers = _matchers(request)
    response = csds_pb2.ClientStatusResponse()
    for stream in streams:
        proxy = stream.proxy
        if proxy is None or (matchers and not any(m(proxy.node_id) for m in matchers)):
            continue
        config = response.config.add()
        config.node.CopyFrom(base_pb2.Node(id=proxy.node_id, cluster=proxy.cluster))
        for type_url, items in held(stream).items():
            status = stream.states[type_url].status
            state = sync_state(status)
            for item in items:
                entry = config.generic_xds_configs.add(
                    type_url=type_url,
                    name=item.name,
                    version_info=item.version,
                    config_status=_CONFIG[state],
                    client_status=_CLIENT[state],
                )
                if status.last_sent_at is not None:
                    entry.last_updated.FromNanoseconds(int(status.last_sent_at * 1e9))
                include = not request.exclude_resource_contents and type_url != SECRET_TYPE
                if include and item.resource is not None:
                    entry.xds_config.CopyFrom(any_pb2.Any(type_url=type_url, value=item.resource.body))
                if state == NACKED and status.last_nack is not None:
                    entry.error_state.details = status.last_nack.message
                    entry.error_state.version_info = status.last_nack.version
    return response


# The parts of other processes serving xDS (isthmus.workers): serialized ClientStatusResponses.
OtherParts = Callable[[bytes], Awaitable[list[bytes]]]
# (bearer token or None, serialized request) -> (refusal code or None, its detail, serialized
# response): the whole answer, given by another process (an xDS worker asks its main process).
Relay = Callable[[str | None, bytes], Awaitable[tuple[int | None, str, bytes]]]


class Refused(Exception):
    """A CSDS call that gets no answer: the gRPC status code and why."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Csds:
    """The CSDS service over the streams of an AdsServer (``streams``), callers checked by ``check``;
    with the parts of ``others``, or answered by ``relay`` instead."""

    def __init__(
        self,
        streams: Callable[[], list[Stream]],
        check: CsdsCheck | None = None,
        others: OtherParts | None = None,
        relay: Relay | None = None,
    ) -> None:
        self.streams = streams
        self.check = check
        self.others = others
        self.relay = relay

    async def respond(
        self, token: str | None, request: csds_pb2.ClientStatusRequest
    ) -> csds_pb2.ClientStatusResponse:
        """The answer to ``request`` for a caller with ``token`` (Refused when there is none)."""
        if self.check is not None:
            status, detail = await self.check(token)
            if status != 200:
                raise Refused(_REFUSED.get(status, grpc.StatusCode.UNAVAILABLE), f"CSDS: {detail}")
        try:
            response = client_status(self.streams(), request)
        except BadRequest as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if self.others is not None:
            for part in await self.others(request.SerializeToString()):
                response.MergeFromString(part)  # the repeated configs of each process, one after another
        return response

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        parse = csds_pb2.ClientStatusRequest.FromString
        encode = csds_pb2.ClientStatusResponse.SerializeToString
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "FetchClientStatus": grpc.unary_unary_rpc_method_handler(
                    self._fetch, request_deserializer=parse, response_serializer=encode
                ),
                "StreamClientStatus": grpc.stream_stream_rpc_method_handler(
                    self._stream, request_deserializer=parse, response_serializer=encode
                ),
            },
        )

    @staticmethod
    def _token(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        scheme, _, token = metadata.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None

    async def _answer(
        self, request: csds_pb2.ClientStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> csds_pb2.ClientStatusResponse:
        token = self._token(context)
        if self.relay is not None:
            code, detail, body = await self.relay(token, request.SerializeToString())
            if code is not None:
                await context.abort(_CODES.get(code, grpc.StatusCode.UNAVAILABLE), detail)
            return csds_pb2.ClientStatusResponse.FromString(body)
        try:
            return await self.respond(token, request)
        except Refused as exc:
            await context.abort(exc.code, exc.details)
            raise  # abort raises; this is for the type checker

    async def _fetch(
        self, request: csds_pb2.ClientStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> csds_pb2.ClientStatusResponse:
        return await self._answer(request, context)

    async def _stream(
        self,
        requests: AsyncIterator[csds_pb2.ClientStatusRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[csds_pb2.ClientStatusResponse]:
        async for request in requests:
            yield await self._answer(request, context)
