"""Two replicas of ``isthmus serve`` (two processes, so two hash seeds) on the same mesh and the same
CA root serve the same bytes (issue 14, Replicas): for a sidecar and a gateway, every resource of
every type but the workload's own certificate is byte for byte identical with the same versions,
and a Delta proxy that moves from one replica to the other (its initial_resource_versions from the
first) is sent nothing new but that certificate."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from conftest import LOOPBACK, ControlPlaneProcess, Processes
from isthmus.discovery.file import example_mesh_text
from isthmus.xds import naming, types
from protocol.client import DeltaClient, make_node

pytestmark = pytest.mark.envoy

NODES = {
    "sidecar": make_node("sidecar~web-1.shop~east", cluster="east", namespace="shop", service="web"),
    "gateway": make_node(
        "gateway~gw.isthmus-system~west",
        cluster="west",
        role="gateway",
        namespace="isthmus-system",
        service="isthmus-gateway",
        service_account="isthmus-gateway",
    ),
}


@contextlib.asynccontextmanager
async def channel(cp: ControlPlaneProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{cp.xds_port}") as ch:
        yield ch


async def fetch(cp: ControlPlaneProcess, node: Any) -> dict[str, tuple[str, dict[str, bytes]]]:
    """Everything ``node`` gets over SotW: per type, (version, {name: the resource's bytes as sent})."""
    out: dict[str, tuple[str, dict[str, bytes]]] = {}
    async with channel(cp) as ch:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources()

        async def ask(type_url: str, names: list[str]) -> dict[str, bytes]:
            await call.write(
                discovery_pb2.DiscoveryRequest(node=node, type_url=type_url, resource_names=names)
            )
            try:
                response = await asyncio.wait_for(call.read(), 10)
            except TimeoutError:
                raise AssertionError(f"no {types.short(type_url)} response for {names} in 10 s") from None
            assert response.type_url == type_url
            await call.write(  # the ACK: the server holds later types until earlier ones are applied
                discovery_pb2.DiscoveryRequest(
                    type_url=type_url,
                    resource_names=names,
                    version_info=response.version_info,
                    response_nonce=response.nonce,
                )
            )
            got = {}
            for entry in response.resources:
                message = _parse(type_url, entry.value)
                got[_name(type_url, message)] = entry.value
            out[type_url] = (response.version_info, got)
            return got

        clusters = await ask(types.CLUSTER, [])
        eds = sorted(
            n for n, raw in clusters.items() if _parse(types.CLUSTER, raw).HasField("eds_cluster_config")
        )
        listeners = await ask(types.LISTENER, [])
        await ask(types.ENDPOINT, eds)
        routes = sorted(_route_names(listeners.values()))
        if routes:
            await ask(types.ROUTE, routes)
        if node.metadata["isthmus"]["role"] == "sidecar":  # gateways hold no key and get no secret
            await ask(types.SECRET, [naming.WORKLOAD_SECRET, naming.ROOT_SECRET])
        call.cancel()
    return out


def _parse(type_url: str, raw: bytes) -> Any:
    from protocol.client import parse

    return parse(type_url, raw)


def _name(type_url: str, message: Any) -> str:
    from protocol.client import name_of

    return name_of(message)


def _route_names(listeners: Any) -> set[str]:
    names = set()
    for raw in listeners:
        listener = _parse(types.LISTENER, raw)
        for chain in [*listener.filter_chains, listener.default_filter_chain]:
            for f in chain.filters:
                if f.typed_config.Is(hcm.HttpConnectionManager.DESCRIPTOR):
                    manager = hcm.HttpConnectionManager()
                    f.typed_config.Unpack(manager)
                    if manager.HasField("rds"):
                        names.add(manager.rds.route_config_name)
    return names


async def test_two_replicas_serve_the_same_bytes_and_a_moving_proxy_gets_nothing_new(
    procs: Processes, tmp_path: Path
) -> None:
    mesh = tmp_path / "mesh.yaml"
    # The example mesh, its endpoints with sidecars (so that gateways forward to them).
    mesh.write_text(
        example_mesh_text().replace(", service_account:", ", sidecar_port: 15006, service_account:")
    )
    args = ["--ca-dir", str(tmp_path / "ca")]
    first = await procs.control_plane(mesh, args)  # makes the development root
    second = await procs.control_plane(mesh, args)  # reads it
    for role, node in NODES.items():
        a, b = await fetch(first, node), await fetch(second, node)
        assert set(a) == set(b), role
        for type_url in a:
            version_a, resources_a = a[type_url]
            version_b, resources_b = b[type_url]
            assert set(resources_a) == set(resources_b), (role, type_url)
            if type_url == types.SECRET:
                # Each replica issues the workload its own certificate; the trust bundle is the same.
                assert resources_a[naming.ROOT_SECRET] == resources_b[naming.ROOT_SECRET], role
                continue
            assert version_a == version_b, (role, types.short(type_url))
            differing = sorted(n for n in resources_a if resources_a[n] != resources_b[n])
            assert not differing, (role, types.short(type_url), differing)
        assert a[types.CLUSTER][1], f"{role}: no clusters at all"

    # A Delta sidecar served by the first replica moves to the second with what it holds.
    node = NODES["sidecar"]
    held: dict[str, dict[str, str]] = {}
    async with channel(first) as ch:
        client = DeltaClient(ch, node)
        for type_url in (types.CLUSTER, types.LISTENER):
            await client.subscribe(type_url, ["*"])
            reply = await client.recv()
            held[type_url] = dict(reply.versions)
            await client.ack(reply)
        await client.close()
    assert held[types.CLUSTER]
    assert held[types.LISTENER]
    async with channel(second) as ch:
        client = DeltaClient(ch, node)
        for type_url in (types.CLUSTER, types.LISTENER):
            await client.subscribe(type_url, ["*"], initial=held[type_url])
        sent = await client.drain(within=1.0)
        await client.close()
    assert [
        (types.short(r.type_url), list(r.names), list(r.removed)) for r in sent if r.names or r.removed
    ] == []
