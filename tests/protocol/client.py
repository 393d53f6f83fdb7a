"""Test-side ADS clients (SotW and Delta) and resource builders for the protocol tests.

The server's responses are pre-encoded bytes; here they are parsed with the generated
stubs only, so every test also holds the encoding to the protobuf wire format. Each client
reads its stream in a background task into a queue, because cancelling a grpc.aio
``read()`` (as a timeout would) cancels the whole call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import duration_pb2

from isthmus.xds import types

RECV_TIMEOUT = 5.0  # generous bound for a response that must come
QUIET = 0.3  # how long to wait for a response that must NOT come

# A type URL the server does not serve (ECDS).
UNKNOWN_TYPE = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"

T = TypeVar("T")

# ---- resources ------------------------------------------------------------------------------

_MESSAGES: dict[str, tuple[Any, str]] = {
    types.CLUSTER: (cluster_pb2.Cluster, "name"),
    types.ENDPOINT: (endpoint_pb2.ClusterLoadAssignment, "cluster_name"),
    types.LISTENER: (listener_pb2.Listener, "name"),
    types.ROUTE: (route_pb2.RouteConfiguration, "name"),
    types.SECRET: (secret_pb2.Secret, "name"),
}
_TYPE_BY_MESSAGE = {cls.DESCRIPTOR.full_name: url for url, (cls, _) in _MESSAGES.items()}


def type_of(message: Any) -> str:
    return _TYPE_BY_MESSAGE[message.DESCRIPTOR.full_name]


def name_of(message: Any) -> str:
    return str(getattr(message, _MESSAGES[type_of(message)][1]))


def parse(type_url: str, value: bytes) -> Any:
    return _MESSAGES[type_url][0].FromString(value)


def cluster(name: str, timeout: int = 1) -> Any:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource())
        ),
        connect_timeout=duration_pb2.Duration(seconds=timeout),
    )


def endpoints(name: str, *ports: int) -> Any:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=address_pb2.Address(
                                socket_address=address_pb2.SocketAddress(address="10.0.0.1", port_value=port)
                            )
                        )
                    )
                    for port in ports
                ]
            )
        ],
    )


def listener(name: str, port: int) -> Any:
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="0.0.0.0", port_value=port)
        ),
    )


def route(name: str, *clusters: str) -> Any:
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=name,
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix=f"/{c}"),
                        route=route_components_pb2.RouteAction(cluster=c),
                    )
                    for c in clusters
                ],
            )
        ],
    )


def secret(name: str, value: str = "s3cr3t") -> Any:
    return secret_pb2.Secret(
        name=name,
        generic_secret=secret_pb2.GenericSecret(secret=base_pb2.DataSource(inline_string=value)),
    )


def make_node(
    node_id: str = "sidecar-1",
    *,
    cluster: str = "east",
    role: str = "sidecar",
    namespace: str = "default",
    service: str = "web",
    service_account: str = "web",
) -> Any:
    node = base_pb2.Node(id=node_id, cluster=service)
    node.metadata.update(
        {
            "isthmus": {
                "role": role,
                "cluster": cluster,
                "namespace": namespace,
                "service": service,
                "service_account": service_account,
            }
        }
    )
    return node


# ---- replies --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One response, parsed: resource names in wire order, messages by name, and (Delta) removals."""

    type_url: str
    version: str
    nonce: str
    names: tuple[str, ...]
    resources: Mapping[str, Any]
    removed: tuple[str, ...] = ()
    versions: Mapping[str, str] = field(default_factory=dict)  # Delta only: per-resource versions

    @classmethod
    def from_sotw(cls, response: Any) -> Reply:
        names: list[str] = []
        resources: dict[str, Any] = {}
        for entry in response.resources:
            assert entry.type_url == response.type_url, "a resource of another type in the response"
            message = parse(response.type_url, entry.value)
            names.append(name_of(message))
            resources[name_of(message)] = message
        return cls(response.type_url, response.version_info, response.nonce, tuple(names), resources)

    @classmethod
    def from_delta(cls, response: Any) -> Reply:
        names: list[str] = []
        resources: dict[str, Any] = {}
        versions: dict[str, str] = {}
        for entry in response.resources:
            assert entry.resource.type_url == response.type_url, "a resource of another type in the response"
            message = parse(response.type_url, entry.resource.value)
            assert name_of(message) == entry.name, "Resource.name differs from the resource's own name"
            assert entry.version, "a Delta resource without a version"
            names.append(entry.name)
            resources[entry.name] = message
            versions[entry.name] = entry.version
        return cls(
            response.type_url,
            response.system_version_info,
            response.nonce,
            tuple(names),
            resources,
            tuple(response.removed_resources),
            versions,
        )

    def __str__(self) -> str:
        kind = types.short(self.type_url)
        return f"{kind} v={self.version} n={self.nonce} {list(self.names)} removed={list(self.removed)}"


class StreamClosed(Exception):
    """The server ended the stream while a response was expected."""

    def __init__(self, code: grpc.StatusCode | None, details: str | None) -> None:
        super().__init__(f"stream closed: {code} {details}")
        self.code = code
        self.details = details


_END = object()


class AdsClient:
    """One ADS stream. ``subscribe``/``resubscribe``/``ack``/``nack`` work the same in both modes."""

    mode = ""

    def __init__(self, channel: grpc.aio.Channel, node: Any) -> None:
        self.node = node
        self.names: dict[str, set[str]] = {}
        self.nonces: dict[str, str] = {}
        self._node_sent = False
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.call = self._open(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel))
        self._pump_task = asyncio.create_task(self._pump())

    # ---- protocol-specific -------------------------------------------------------------

    def _open(self, stub: Any) -> Any:
        raise NotImplementedError

    def _reply(self, response: Any) -> Reply:
        raise NotImplementedError

    async def subscribe(self, type_url: str, names: Iterable[str] | None = None, **kwargs: Any) -> None:
        raise NotImplementedError

    async def resubscribe(self, type_url: str, names: Iterable[str]) -> None:
        raise NotImplementedError

    async def ack(self, reply: Reply) -> None:
        raise NotImplementedError

    async def nack(self, reply: Reply, message: str) -> None:
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------

    async def _pump(self) -> None:
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    break
                self._inbox.put_nowait(message)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            self._inbox.put_nowait(_END)

    async def send(self, request: Any, *, with_node: bool | None = None) -> None:
        """Write a raw request; the Node goes on the first request unless ``with_node`` says otherwise."""
        if with_node is None:
            with_node = not self._node_sent
        if with_node:
            request.node.CopyFrom(self.node)
            self._node_sent = True
        await self.call.write(request)

    async def recv(self, within: float = RECV_TIMEOUT) -> Reply:
        item = await asyncio.wait_for(self._inbox.get(), within)
        if item is _END:
            self._inbox.put_nowait(_END)
            raise StreamClosed(await self.call.code(), await self.call.details())
        reply = self._reply(item)
        self.nonces[reply.type_url] = reply.nonce
        return reply

    async def recv_ack(self, within: float = RECV_TIMEOUT) -> Reply:
        reply = await self.recv(within)
        await self.ack(reply)
        return reply

    async def quiet(self, within: float = QUIET) -> None:
        """Assert that no response arrives ``within`` seconds."""
        try:
            item = await asyncio.wait_for(self._inbox.get(), within)
        except TimeoutError:
            return
        if item is _END:
            self._inbox.put_nowait(_END)
            raise AssertionError("expected no response, but the stream ended")
        raise AssertionError(f"expected no response, got {self._reply(item)}")

    async def drain(self, within: float = QUIET) -> list[Reply]:
        """Receive and ACK responses until the server stays quiet for ``within`` seconds."""
        replies: list[Reply] = []
        while True:
            try:
                replies.append(await self.recv_ack(within))
            except TimeoutError:
                return replies

    async def closed(self, within: float = RECV_TIMEOUT) -> tuple[grpc.StatusCode, str]:
        """Wait for the server to end the stream; returns its status code and details."""
        await asyncio.wait_for(asyncio.shield(self._pump_task), within)
        return await self.call.code(), await self.call.details() or ""

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump_task


class SotwClient(AdsClient):
    """StreamAggregatedResources: full resource_names lists, version_info and response_nonce."""

    mode = "sotw"

    def __init__(self, channel: grpc.aio.Channel, node: Any) -> None:
        super().__init__(channel, node)
        self.acked: dict[str, str] = {}
        self.order: dict[str, list[str]] = {}

    def _open(self, stub: Any) -> Any:
        return stub.StreamAggregatedResources()

    def _reply(self, response: Any) -> Reply:
        return Reply.from_sotw(response)

    async def request(
        self,
        type_url: str,
        names: Iterable[str] = (),
        *,
        version: str = "",
        nonce: str = "",
        error: str | None = None,
        with_node: bool | None = None,
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=list(names), version_info=version, response_nonce=nonce
        )
        if error is not None:
            request.error_detail.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            request.error_detail.message = error
        await self.send(request, with_node=with_node)

    async def subscribe(
        self,
        type_url: str,
        names: Iterable[str] | None = None,
        *,
        version: str = "",
        with_node: bool | None = None,
    ) -> None:
        self.order[type_url] = list(names or [])
        self.names[type_url] = set(self.order[type_url])
        await self.request(type_url, self.order[type_url], version=version, with_node=with_node)

    async def resubscribe(self, type_url: str, names: Iterable[str]) -> None:
        """A new request with the latest nonce (as Envoy sends when its resource hints change)."""
        self.order[type_url] = list(names)
        self.names[type_url] = set(self.order[type_url])
        await self.request(
            type_url,
            self.order[type_url],
            version=self.acked.get(type_url, ""),
            nonce=self.nonces.get(type_url, ""),
        )

    async def ack(self, reply: Reply, names: Iterable[str] | None = None) -> None:
        if names is not None:
            self.order[reply.type_url] = list(names)
            self.names[reply.type_url] = set(self.order[reply.type_url])
        self.acked[reply.type_url] = reply.version
        await self.request(
            reply.type_url, self.order.get(reply.type_url, []), version=reply.version, nonce=reply.nonce
        )

    async def nack(self, reply: Reply, message: str) -> None:
        await self.request(
            reply.type_url,
            self.order.get(reply.type_url, []),
            version=self.acked.get(reply.type_url, ""),
            nonce=reply.nonce,
            error=message,
        )


class DeltaClient(AdsClient):
    """DeltaAggregatedResources: subscribe/unsubscribe deltas, initial_resource_versions, nonces."""

    mode = "delta"

    def _open(self, stub: Any) -> Any:
        return stub.DeltaAggregatedResources()

    def _reply(self, response: Any) -> Reply:
        return Reply.from_delta(response)

    async def request(
        self,
        type_url: str,
        subscribe: Iterable[str] = (),
        unsubscribe: Iterable[str] = (),
        *,
        nonce: str = "",
        initial: Mapping[str, str] | None = None,
        error: str | None = None,
        with_node: bool | None = None,
    ) -> None:
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe),
            initial_resource_versions=dict(initial or {}),
            response_nonce=nonce,
        )
        if error is not None:
            request.error_detail.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            request.error_detail.message = error
        await self.send(request, with_node=with_node)

    async def subscribe(
        self,
        type_url: str,
        names: Iterable[str] | None = None,
        *,
        initial: Mapping[str, str] | None = None,
        with_node: bool | None = None,
    ) -> None:
        names = list(names or [])
        self.names[type_url] = set(names)
        await self.request(type_url, names, initial=initial, with_node=with_node)

    async def resubscribe(self, type_url: str, names: Iterable[str]) -> None:
        wanted = set(names)
        held = self.names.get(type_url, set())
        self.names[type_url] = wanted
        await self.request(type_url, sorted(wanted - held), sorted(held - wanted))

    async def ack(self, reply: Reply) -> None:
        await self.request(reply.type_url, nonce=reply.nonce)

    async def nack(self, reply: Reply, message: str) -> None:
        await self.request(reply.type_url, nonce=reply.nonce, error=message)


CLIENTS: dict[str, type[AdsClient]] = {"sotw": SotwClient, "delta": DeltaClient}


async def eventually(
    check: Callable[[], T | None], within: float = RECV_TIMEOUT, what: str = "condition"
) -> T:
    """Poll ``check`` until it returns something truthy (bounded); the value is returned."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)
