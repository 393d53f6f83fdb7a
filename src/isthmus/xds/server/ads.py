"""AdsServer: registers StreamAggregatedResources and DeltaAggregatedResources on a grpc.aio server.

Responses are pre-encoded bytes (see xds.resources), so the handlers are
registered with an identity response serializer. Requests are parsed by the
generated protobuf classes; a request that fails to parse, or breaks a rule,
ends that stream with a gRPC status and nothing else.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from isthmus import metrics
from isthmus.xds.cache import ConfigCache
from isthmus.xds.proxy import Proxy, Role
from isthmus.xds.server.auth import AuthFailure, StreamAuthenticator
from isthmus.xds.server.delta import DeltaStream
from isthmus.xds.server.sotw import SotwStream
from isthmus.xds.server.status import ProxyStatus
from isthmus.xds.server.stream import Limits, SendBudget, Stream, StreamError

log = logging.getLogger(__name__)

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
MAX_REQUEST_BYTES = 4 * 1024 * 1024


def _parse(kind: Any) -> Any:
    def parse(data: bytes) -> Any:
        return kind.FromString(data)

    return parse


def _check_free(address: str) -> None:
    """Bind ``address`` without SO_REUSEPORT and let go: fails if anything holds the port (also
    another control plane sharing it with its workers), which a shared bind would join silently."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or int(port) == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError as exc:
            raise OSError(f"cannot listen on {address} for xDS: {exc.strerror}") from None


MAX_PENDING_STREAMS = 50_000  # new streams waiting for the event loop (a reconnect storm of W3)


class AdsServer:
    """The gRPC ADS endpoint. Construct, then ``await start()``; ``await stop()`` to drain."""

    def __init__(
        self,
        cache: ConfigCache,
        address: str = "127.0.0.1:15010",
        limits: Limits | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        credentials: grpc.ServerCredentials | None = None,
        authenticator: StreamAuthenticator | None = None,
    ) -> None:
        self.cache = cache
        self.address = address
        self.credentials = credentials  # TLS (identity.xds_tls); None: plain text
        self.authenticator = authenticator  # None: every stream is served (loopback, tests)
        self.locate: Callable[[Proxy], Proxy] | None = None  # completes a Node's locality (app)
        self.auth_failures: collections.Counter[str] = collections.Counter()  # by reason
        self.services: list[grpc.GenericRpcHandler[Any, Any]] = []  # other services on the xDS port (CSDS)
        self.limits = limits or Limits()
        self._budget = SendBudget(self.limits.send_budget)
        self.max_request_bytes = max_request_bytes
        self.port: int | None = None
        # Port sharing (SO_REUSEPORT) with the xDS worker processes of this control plane
        # (isthmus.workers): "first" checks the port is free and opens it for them, "join" binds
        # beside the first. Without it a second server on the same port fails, as it must.
        self.share_port: str = ""
        self._server: grpc.aio.Server | None = None
        self._streams: dict[int, Stream] = {}
        self._ids = itertools.count(1)
        self._closing = asyncio.Event()
        self.streams_opened = 0
        # Gauges computed from the streams and the budget when /metrics is read (isthmus.metrics).
        metrics.CONNECTED_PROXIES.track(self, AdsServer._connected_sample)
        metrics.SEND_BUDGET_USED.track(self, lambda server: [((), server._budget.used)])
        metrics.SEND_BUDGET_LIMIT.track(self, lambda server: [((), server._budget.limit)])
        metrics.SEND_BUDGET_WAITING.track(self, lambda server: [((), server._budget.waiting)])

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> int:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.max_request_bytes),
                ("grpc.so_reuseport", 1 if self.share_port else 0),  # others must fail, not share it
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                # Connections that hold nothing: a TCP or TLS connection that does not finish its
                # handshake in 10 s (gRPC's default: 120 s), and one with no stream for 60 s (an
                # Envoy's ADS stream is open as long as it is connected; a refused client's is
                # not) are closed, so garbage cannot pile up.
                ("grpc.server_handshake_timeout_ms", 10_000),
                ("grpc.max_connection_idle_ms", 60_000),
                # Calls the event loop has not picked up yet: gRPC's core cancels those past this
                # bound (1,000 by default), so a burst of new streams (a reconnect storm) lost
                # hundreds with INTERNAL at the client (tests/protocol/test_many_streams.py).
                ("grpc.server.max_pending_requests", MAX_PENDING_STREAMS),
                ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_STREAMS),
            ]
        )
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._sotw, request_deserializer=_parse(discovery_pb2.DiscoveryRequest)
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._delta, request_deserializer=_parse(discovery_pb2.DeltaDiscoveryRequest)
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers), *self.services)
        )
        if self.share_port == "first":
            _check_free(self.address)
        if self.credentials is not None:
            port = server.add_secure_port(self.address, self.credentials)
        else:
            port = server.add_insecure_port(self.address)
        if port == 0:
            raise OSError(f"cannot listen on {self.address} for xDS")
        await server.start()
        self._server = server
        self.port = port
        where = (
            self.address if self.address.startswith("unix:") else self.address.rsplit(":", 1)[0] + f":{port}"
        )
        log.info(
            "xDS (ADS, SotW and Delta) listening on %s (%s)",
            where,
            "TLS" if self.credentials else "plain text",
        )
        return port

    async def stop(self, grace: float = 5.0) -> None:
        """Close every stream with UNAVAILABLE (Envoy reconnects on it), then stop the server."""
        if self._server is None:
            return
        self._closing.set()
        for stream in list(self._streams.values()):
            stream._wakeup.set()
        await self._server.stop(grace)
        self._server = None

    # ---- status --------------------------------------------------------------------------

    def status(self) -> list[ProxyStatus]:
        """A copy of every connected stream's status, by stream id."""
        return [s.status.snapshot() for _, s in sorted(self._streams.items())]

    def streams(self) -> list[Stream]:
        """The open streams, by id, for readers (xds.server.introspect); never change them."""
        return [s for _, s in sorted(self._streams.items())]

    def _connected_sample(self) -> list[tuple[tuple[str, str, str], float]]:
        """isthmus_xds_connected_proxies: streams by (member cluster, role, mode); a cluster the
        mesh does not have is 'unknown' (a Node may claim anything: the label stays bounded)."""
        known = self.cache.view.clusters
        counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        for stream in self._streams.values():
            proxy = stream.proxy
            if proxy is not None:
                cluster = proxy.cluster if proxy.cluster in known else metrics.UNKNOWN_CLUSTER
                counts[(cluster, proxy.role.value, stream.mode)] += 1
        return [(labels, float(n)) for labels, n in counts.items()]

    def connected_clusters(self, role: Role) -> set[str]:
        """Member clusters with at least one connected proxy of ``role`` (cheap: copies nothing)."""
        return {
            s.proxy.cluster for s in self._streams.values() if s.proxy is not None and s.proxy.role is role
        }

    def lagging(self, type_url: str) -> list[str]:
        """Node ids of the proxies that have not yet been sent, and ACKed, the current resources
        of ``type_url`` (what a drain waits for)."""
        out = []
        for stream in self._streams.values():
            state = stream.states.get(type_url)
            if stream.proxy is None or state is None or not state.subscription.started:
                continue
            current = self.cache.resources(type_url, stream.proxy)
            if (
                state.delivery.dirty
                or state.delivery.last_set is not current
                or state.in_flight.nonce is not None
            ):
                out.append(stream.proxy.node_id)
        return sorted(out)

    def proxy_status(self, node_id: str) -> list[ProxyStatus]:
        return [s for s in self.status() if s.node_id == node_id]

    # ---- handlers ------------------------------------------------------------------------

    async def _sotw(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await self._serve(SotwStream, requests, context)

    async def _delta(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await self._serve(DeltaStream, requests, context)

    async def _serve(
        self,
        kind: type[Stream],
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        stream_id = next(self._ids)
        self.streams_opened += 1
        metrics.STREAMS.labels(kind.mode).inc()
        authorize = None
        if self.authenticator is not None:  # before anything of the stream exists
            metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
            try:
                authorize = await self.authenticator(metadata)
            except AuthFailure as exc:
                self.auth_failures[exc.reason] += 1
                metrics.AUTHENTICATIONS.labels(exc.reason).inc()
                log.warning("stream %d from %s refused: %s", stream_id, context.peer(), exc.details)
                await context.abort(exc.code, exc.details)
        stream = kind(
            stream_id,
            self.cache,
            context,
            self.limits,
            self._closing,
            budget=self._budget,
            authorize=authorize,
            locate=self.locate,
        )
        self._streams[stream_id] = stream
        try:
            await stream.run(requests)
        except StreamError as exc:
            if exc.auth_reason:
                self.auth_failures[exc.auth_reason] += 1
                metrics.AUTHENTICATIONS.labels(exc.auth_reason).inc()
            log.info(
                "stream %d (%s) closed: %s %s",
                stream_id,
                stream.status.node_id or "?",
                exc.code.name,
                exc.details,
            )
            await context.abort(exc.code, exc.details)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log.exception("stream %d (%s) failed", stream_id, stream.status.node_id or "?")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
        finally:
            del self._streams[stream_id]
