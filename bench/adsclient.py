"""Simulated Envoys for the load tool: one ADS stream each, SotW or Delta, cheap enough for 1,000 per process.

Each client behaves like Envoy on ADS: it subscribes CDS and LDS (wildcard) and, with mTLS, SDS for
``default`` and ``ROOTCA``; then EDS for the EDS clusters it received and RDS for the route names its
listeners' HTTP connection managers reference. Every response is ACKed (SotW: version and nonce; Delta:
nonce). Responses arrive as raw bytes (no deserializer on the call), so the bytes received are exact and
only what is needed is parsed: the envelope with upb, each resource's name from its field 1 (all five
types put the name there), and Clusters and Listeners fully, cached by their bytes because many
proxies receive identical resources. A client can carry gRPC metadata on its stream (bench.load
--auth: its bearer token and member cluster, as `isthmus bootstrap --token-file` makes Envoy send).

A stream that ends (the server went away, or ended it) is opened again after a jittered 0.1-1 s, as
Envoy retries its ADS stream, presenting what the client holds: Delta sends, per type, the names it
subscribes and (with ``track_versions``) ``initial_resource_versions`` for every resource it holds;
SotW sends the last ACKed ``version_info`` of each type with the names it subscribes and no nonce
(nonces belong to a stream). The channel's own reconnect backoff is set by the load tool (0.1-1 s).
With ``keep_eds`` a client keeps the bytes of every ClusterLoadAssignment it holds (interned by
content: the clients of one member cluster share them), so the load tool can check what it holds.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.service.discovery.v3 import discovery_pb2

PREFIX = "type.googleapis.com/"
CDS = PREFIX + "envoy.config.cluster.v3.Cluster"
EDS = PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = PREFIX + "envoy.config.listener.v3.Listener"
RDS = PREFIX + "envoy.config.route.v3.RouteConfiguration"
SDS = PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
HCM = PREFIX + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
SECRETS = ("default", "ROOTCA")

SERVICE = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
METHODS = {"sotw": SERVICE + "StreamAggregatedResources", "delta": SERVICE + "DeltaAggregatedResources"}


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()  # type: ignore[no-any-return]


def open_stream(channel: grpc.aio.Channel, mode: str) -> Any:
    """A stream-stream multicallable that yields raw response bytes."""
    return channel.stream_stream(METHODS[mode], request_serializer=_serialize, response_deserializer=None)


# ---- parsing, cached by resource bytes -------------------------------------------------------

_CLUSTERS: dict[bytes, tuple[str, str | None]] = {}
_LISTENERS: dict[bytes, tuple[str, tuple[str, ...]]] = {}
_BODIES: dict[bytes, bytes] = {}  # keep_eds: one bytes object per distinct ClusterLoadAssignment
_BACKOFF = random.Random(0)  # the stream retry's jitter, apart from the load tool's seeded changes
RETRY_MIN_S, RETRY_MAX_S = 0.1, 1.0


def intern_body(value: bytes) -> bytes:
    return _BODIES.setdefault(value, value)


def name_of(value: bytes) -> str:
    """Field 1 (``name``/``cluster_name``) of a serialized resource, read without parsing the rest."""
    if value[:1] == b"\x0a":
        length, shift, i = 0, 0, 1
        while True:
            b = value[i]
            length |= (b & 0x7F) << shift
            i += 1
            if b < 0x80:
                break
            shift += 7
        return value[i : i + length].decode()
    return ""


def cluster_info(value: bytes) -> tuple[str, str | None]:
    """(name, EDS service name or None when the cluster is not of type EDS)."""
    hit = _CLUSTERS.get(value)
    if hit is None:
        c = cluster_pb2.Cluster.FromString(value)
        eds = None
        if c.type == cluster_pb2.Cluster.EDS:
            eds = c.eds_cluster_config.service_name or c.name
        hit = _CLUSTERS[value] = (c.name, eds)
    return hit


def listener_info(value: bytes) -> tuple[str, tuple[str, ...]]:
    """(name, RDS route names referenced by its HTTP connection managers)."""
    hit = _LISTENERS.get(value)
    if hit is None:
        lis = listener_pb2.Listener.FromString(value)
        routes: list[str] = []
        chains = list(lis.filter_chains)
        if lis.HasField("default_filter_chain"):
            chains.append(lis.default_filter_chain)
        for chain in chains:
            for f in chain.filters:
                if f.typed_config.type_url == HCM:
                    hcm = http_connection_manager_pb2.HttpConnectionManager.FromString(f.typed_config.value)
                    if hcm.HasField("rds"):
                        routes.append(hcm.rds.route_config_name)
        hit = _LISTENERS[value] = (lis.name, tuple(sorted(set(routes))))
    return hit


# ---- one simulated Envoy ---------------------------------------------------------------------


@dataclass
class Totals:
    """Shared by all clients of one run."""

    responses: int = 0
    bytes: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    nacks: int = 0
    resources: int = 0  # resources carried by the responses (Delta: added or changed, SotW: all sent)
    resources_by_type: dict[str, int] = field(default_factory=dict)
    # Names the server removed: Delta removed_resources, or left out of a SotW CDS/LDS response.
    removed_by_type: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # Streams that ended and were opened again. Outside ``expect_breaks`` (the load tool sets it
    # while it restarts the server) an ended stream is also an error.
    breaks: int = 0
    break_codes: dict[str, int] = field(default_factory=dict)
    expect_breaks: bool = False
    resume_bytes: int = 0  # the first requests of streams opened again: what the clients present


# on_eds(client, raw_response_bytes, names, ack_time) is called after an EDS response was ACKed;
# names: the assignments it added or replaced (with keep_eds, their bytes are in client.eds).
EdsHook = Callable[["SimEnvoy", bytes, list[str], float], None]


def make_node(
    node_id: str,
    *,
    cluster: str,
    region: str,
    zone: str,
    namespace: str,
    service: str,
    service_account: str | None = None,
) -> base_pb2.Node:
    node = base_pb2.Node(id=node_id, cluster=service)
    node.locality.region = region
    node.locality.zone = zone
    node.locality.sub_zone = cluster
    node.metadata.update(
        {
            "isthmus": {
                "role": "sidecar",
                "cluster": cluster,
                "namespace": namespace,
                "service": service,
                "service_account": service_account or service,
                "listen_address": "0.0.0.0",
                "outbound_port": 15001,
                "inbound_port": 15006,
            }
        }
    )
    return node


class SimEnvoy:
    def __init__(
        self,
        index: int,
        node: base_pb2.Node,
        member: str,
        mode: str,
        multicallable: Any,
        totals: Totals,
        *,
        mtls: bool,
        on_eds: EdsHook | None = None,
        on_complete: Callable[[SimEnvoy], None] | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
        keep_eds: bool = False,
        track_versions: bool = False,
    ) -> None:
        self.index = index
        self.metadata = metadata  # gRPC metadata of the stream (credentials: authorization, isthmus-cluster)
        self.node = node
        self.member = member
        self.mode = mode
        self.totals = totals
        self.mtls = mtls
        self.on_eds = on_eds
        self.on_complete = on_complete
        self.complete_at: float | None = None
        self._mc = multicallable
        self._call: Any = None
        self._node_sent = False
        # what is subscribed and what is held, per type
        self.subscribed: dict[str, set[str]] = {EDS: set(), RDS: set()}
        self.held: dict[str, set[str]] = {CDS: set(), EDS: set(), LDS: set(), RDS: set(), SDS: set()}
        self.acked_types: set[str] = set()
        self.version: dict[str, str] = {}
        self.nonce: dict[str, str] = {}
        self.clusters: dict[str, str | None] = {}  # CDS name -> EDS name
        self.listeners: dict[str, tuple[str, ...]] = {}  # LDS name -> route names
        self.keep_eds = keep_eds
        self.eds: dict[str, bytes] = {}  # keep_eds: EDS name -> the assignment's bytes
        self.track_versions = track_versions and mode == "delta"
        self.versions: dict[str, dict[str, str]] = {}  # Delta: type -> name -> version held
        self.requested: list[str] = []  # the types asked for on the stream, in order
        # Streams: how many were opened, when the current one was (its first request written), the
        # last ACK and the responses on it.
        self.streams = 0
        self.connected_at: float | None = None
        self.last_ack_at: float | None = None
        self.stream_responses = 0
        self.removed = 0  # names the server removed (as removed_by_type), all types
        self._stopping = False
        self._resuming = False

    # ---- requests ----------------------------------------------------------------------

    async def _send(self, request: Any) -> None:
        if request.type_url not in self.requested:
            self.requested.append(request.type_url)
        if not self._node_sent:
            request.node.CopyFrom(self.node)
            self._node_sent = True
        if self._resuming:
            self.totals.resume_bytes += request.ByteSize()
        await self._call.write(request)

    async def _sotw(self, type_url: str, names: set[str] | None, version: str = "", nonce: str = "") -> None:
        await self._send(
            discovery_pb2.DiscoveryRequest(
                type_url=type_url,
                resource_names=sorted(names) if names else [],
                version_info=version,
                response_nonce=nonce,
            )
        )

    async def _delta(
        self,
        type_url: str,
        sub: set[str] | None = None,
        unsub: set[str] | None = None,
        nonce: str = "",
        initial: dict[str, str] | None = None,
    ) -> None:
        await self._send(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url,
                resource_names_subscribe=sorted(sub or ()),
                resource_names_unsubscribe=sorted(unsub or ()),
                response_nonce=nonce,
                initial_resource_versions=initial or {},
            )
        )

    async def _subscribe(self, type_url: str, wanted: set[str]) -> None:
        """Change a non-wildcard subscription (EDS, RDS, SDS) to ``wanted``."""
        have = self.subscribed.get(type_url, set())
        if wanted == have:
            return
        self.subscribed[type_url] = set(wanted)
        if self.mode == "sotw":
            await self._sotw(type_url, wanted, self.version.get(type_url, ""), self.nonce.get(type_url, ""))
        else:
            await self._delta(type_url, wanted - have, have - wanted)

    # ---- the stream ----------------------------------------------------------------------

    async def run(self) -> None:
        """The ADS stream, opened again (after a jittered 0.1-1 s) whenever it ends, until cancel()."""
        while not self._stopping:
            code = await self._stream()
            if self._stopping:
                return
            t = self.totals
            t.breaks += 1
            t.break_codes[code] = t.break_codes.get(code, 0) + 1
            await asyncio.sleep(_BACKOFF.uniform(RETRY_MIN_S, RETRY_MAX_S))

    async def _stream(self) -> str:
        """One stream, from its first request to its end; returns how it ended (a status code name)."""
        self._call = self._mc(wait_for_ready=True, metadata=self.metadata or None)
        self._node_sent = False
        self.nonce = {}  # nonces belong to the stream that sent them
        self.streams += 1
        self.stream_responses = 0
        try:
            if self.streams == 1:
                if self.mode == "sotw":
                    await self._sotw(CDS, None)
                    await self._sotw(LDS, None)
                else:
                    await self._delta(CDS)
                    await self._delta(LDS)
                if self.mtls:
                    await self._subscribe(SDS, set(SECRETS))
            else:
                self._resuming = True
                try:
                    await self._resume()
                finally:
                    self._resuming = False
            self.connected_at = time.monotonic()
            while True:
                raw = await self._call.read()
                if raw is grpc.aio.EOF:  # type: ignore[attr-defined]
                    self._broke("the server ended the stream")
                    return "EOF"
                await self._handle(raw)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            if not self._stopping:
                self._broke(f"{exc.code()} {exc.details()}")
            return str(exc.code().name)
        except Exception as exc:  # a load tool reports, it does not crash
            if not self._stopping:
                self.totals.errors.append(f"{self.node.id}: {type(exc).__name__}: {exc}")
            return type(exc).__name__

    def _broke(self, why: str) -> None:
        if not self.totals.expect_breaks and not self._stopping:
            self.totals.errors.append(f"{self.node.id}: stream {self.streams} ended: {why}")

    async def _resume(self) -> None:
        """A new stream's first requests: every type asked for before, presenting what is held."""
        for type_url in self.requested:
            names = self.subscribed.get(type_url)  # None: a wildcard type (CDS, LDS)
            if names is not None and not names:
                continue
            if self.mode == "sotw":
                await self._sotw(type_url, names, self.version.get(type_url, ""))
            else:
                initial = self.versions.get(type_url) if self.track_versions else None
                await self._delta(type_url, names, initial=initial)

    def cancel(self) -> None:
        self._stopping = True
        if self._call is not None:
            self._call.cancel()

    async def _handle(self, raw: bytes) -> None:
        t = self.totals
        t.responses += 1
        t.bytes += len(raw)
        self.stream_responses += 1
        names: list[str] = []
        if self.mode == "sotw":
            r = discovery_pb2.DiscoveryResponse.FromString(raw)
            type_url = r.type_url
            values = [a.value for a in r.resources]
            count = len(values)
            if type_url == CDS:
                self.clusters = dict(cluster_info(v) for v in values)
                self._full_state(CDS, set(self.clusters))
            elif type_url == LDS:
                self.listeners = dict(listener_info(v) for v in values)
                self._full_state(LDS, set(self.listeners))
            else:
                # EDS, RDS and SDS responses carry the requested resources; absent ones are kept.
                names = [name_of(v) for v in values]
                self.held[type_url].update(names)
                if type_url == EDS and self.keep_eds:
                    for name, v in zip(names, values, strict=True):
                        self.eds[name] = intern_body(v)
        else:
            r = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
            type_url = r.type_url
            removed = set(r.removed_resources)
            count = len(r.resources)
            if removed:
                t.removed_by_type[r.type_url] = t.removed_by_type.get(r.type_url, 0) + len(removed)
                self.removed += len(removed)
            if type_url == CDS:
                for name in removed:
                    self.clusters.pop(name, None)
                self.clusters.update(cluster_info(x.resource.value) for x in r.resources)
                self.held[CDS] = set(self.clusters)
            elif type_url == LDS:
                for name in removed:
                    self.listeners.pop(name, None)
                self.listeners.update(listener_info(x.resource.value) for x in r.resources)
                self.held[LDS] = set(self.listeners)
            else:
                held = self.held[type_url]
                held -= removed
                names = [x.name for x in r.resources]
                held.update(names)
                if type_url == EDS and self.keep_eds:
                    for name in removed:
                        self.eds.pop(name, None)
                    for x in r.resources:
                        self.eds[x.name] = intern_body(x.resource.value)
            if self.track_versions:
                versions = self.versions.setdefault(type_url, {})
                for name in removed:
                    versions.pop(name, None)
                for x in r.resources:
                    versions[x.name] = sys.intern(x.version)
        t.by_type[type_url] = t.by_type.get(type_url, 0) + 1
        t.resources += count
        t.resources_by_type[type_url] = t.resources_by_type.get(type_url, 0) + count
        # Envoy requests the dependent types before it ACKs the response that named them.
        if type_url == CDS:
            await self._subscribe(EDS, {e for e in self.clusters.values() if e is not None})
        elif type_url == LDS:
            await self._subscribe(RDS, {name for routes in self.listeners.values() for name in routes})
        if self.mode == "sotw":
            self.version[type_url] = r.version_info
            self.nonce[type_url] = r.nonce
            await self._sotw(type_url, self.subscribed.get(type_url), r.version_info, r.nonce)
        else:
            await self._delta(type_url, nonce=r.nonce)
        now = time.monotonic()
        self.last_ack_at = now
        self.acked_types.add(type_url)
        if type_url == EDS and self.on_eds is not None:
            self.on_eds(self, raw, names, now)
        if self.complete_at is None and self._complete():
            self.complete_at = now
            if self.on_complete is not None:
                self.on_complete(self)

    def _full_state(self, type_url: str, names: set[str]) -> None:
        """A SotW CDS or LDS response: what it leaves out is removed."""
        gone = len(self.held[type_url] - names)
        if gone:
            t = self.totals
            t.removed_by_type[type_url] = t.removed_by_type.get(type_url, 0) + gone
            self.removed += gone
        self.held[type_url] = names

    def _complete(self) -> bool:
        if not {CDS, LDS} <= self.acked_types:
            return False
        if not self.subscribed[EDS] <= self.held[EDS] or not self.subscribed[RDS] <= self.held[RDS]:
            return False
        if self.subscribed[EDS] and EDS not in self.acked_types:
            return False
        return not self.mtls or set(SECRETS) <= self.held[SDS]
