"""Clients that misbehave on the wire: a stuck Envoy (stops reading) must not delay pushes to the
others and is closed after the send timeout; a client that vanishes mid-push or sends bytes that are
not a DiscoveryRequest costs nothing but its own stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from isthmus.discovery.model import MeshView
from isthmus.xds import types
from isthmus.xds.cache import ConfigCache
from isthmus.xds.proxy import Proxy
from isthmus.xds.server import AdsServer, Limits

# Big enough to overflow a 64 KiB HTTP/2 window many times over.
PADDING = "x" * 4096
CLUSTERS = 512


class Mesh:
    """Mutable test mesh: a generation counter baked into every cluster's alt_stat_name."""

    def __init__(self) -> None:
        self.round = 0

    def clusters(self, view: MeshView, proxy: Proxy, identity: object) -> Mapping[str, Any]:
        out = {}
        for i in range(CLUSTERS):
            c = cluster_pb2.Cluster(name=f"c{i}", alt_stat_name=f"{self.round}-{PADDING}")
            out[c.name] = c
        return out


@pytest.fixture
async def server() -> AsyncIterator[tuple[AdsServer, Mesh]]:
    mesh = Mesh()
    gens = {t: (lambda v, p, i: {}) for t in types.PUSH_ORDER}
    gens[types.CLUSTER] = mesh.clusters
    cache = ConfigCache(None, gens)
    ads = AdsServer(cache, "127.0.0.1:0", Limits(send_timeout=1.0))
    await ads.start()
    yield ads, mesh
    await ads.stop(0.5)


def _request(node_id: str, **kw: Any) -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=node_id), type_url=types.CLUSTER, **kw)


def _channel(port: int, small_window: bool) -> grpc.aio.Channel:
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", -1)]
    if small_window:
        # Keep the HTTP/2 window at its 64 KiB default so that not reading really stalls the sender.
        options += [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 0)]
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)


async def test_stuck_client_does_not_delay_others_and_is_closed(server: tuple[AdsServer, Mesh]) -> None:
    ads, mesh = server
    assert ads.port is not None
    async with _channel(ads.port, small_window=True) as stuck_ch, _channel(ads.port, False) as ok_ch:
        stuck = ads_pb2_grpc.AggregatedDiscoveryServiceStub(stuck_ch).StreamAggregatedResources()
        await stuck.write(_request("stuck"))  # ... and never read
        healthy = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ok_ch).StreamAggregatedResources()
        await healthy.write(_request("healthy"))
        first = await asyncio.wait_for(healthy.read(), 10)
        await healthy.write(_request("healthy", version_info=first.version_info, response_nonce=first.nonce))
        # The stuck stream's write is blocked on flow control; a change must still reach the healthy one.
        for _ in range(3):
            mesh.round += 1
            ads.cache.invalidate()
            update = await asyncio.wait_for(healthy.read(), 10)
            assert update.version_info != first.version_info
            await healthy.write(
                _request("healthy", version_info=update.version_info, response_nonce=update.nonce)
            )
            first = update

        # The stuck stream is closed by the send timeout.
        async def stuck_stream_gone() -> None:
            while any(s.node_id == "stuck" for s in ads.status()):
                await asyncio.sleep(0.05)

        await asyncio.wait_for(stuck_stream_gone(), 15)
        assert [s.node_id for s in ads.status()] == ["healthy"]
        stuck.cancel()


async def test_client_vanishing_mid_push_leaves_server_serving(server: tuple[AdsServer, Mesh]) -> None:
    ads, _ = server
    assert ads.port is not None
    for i in range(5):
        async with _channel(ads.port, small_window=True) as ch:
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources()
            await call.write(_request(f"gone-{i}"))
        # channel closed while the server is writing a 2 MB response into a 64 KiB window

    async def drained() -> None:
        while ads.status():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(drained(), 10)
    async with _channel(ads.port, small_window=False) as ch:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources()
        await call.write(_request("after"))
        response = await asyncio.wait_for(call.read(), 10)
        assert len(response.resources) == CLUSTERS
        call.cancel()


@pytest.mark.parametrize("method", ["StreamAggregatedResources", "DeltaAggregatedResources"])
async def test_malformed_bytes_close_only_that_stream(server: tuple[AdsServer, Mesh], method: str) -> None:
    ads, _ = server
    assert ads.port is not None
    async with _channel(ads.port, small_window=False) as ch:
        raw = ch.stream_stream(f"/envoy.service.discovery.v3.AggregatedDiscoveryService/{method}")()
        await raw.write(b"\xff\xff\xff")  # not a protobuf message
        assert await asyncio.wait_for(raw.code(), 10) == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed request" in await raw.details()
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources()
        await call.write(_request("after"))
        response = await asyncio.wait_for(call.read(), 10)
        assert len(response.resources) == CLUSTERS
        call.cancel()
