"""Shared bytes: proxies in the same group (Proxy.for_type) get the same ResourceSet and Resource
objects, each resource is serialized once per mesh version, and streams send exactly those bytes."""

from __future__ import annotations

from typing import Any

import pytest

from isthmus.xds import types
from isthmus.xds.cache import ConfigCache
from isthmus.xds.proxy import proxy_from_node

from .client import cluster, make_node
from .conftest import Mesh

CDS = types.CLUSTER


def clusters_cache(state: dict[str, Any]) -> ConfigCache:
    return ConfigCache(generators={CDS: lambda view, proxy, identity: dict(state)})


def test_same_key_shares_one_resource_set_and_one_serialization() -> None:
    cache = clusters_cache({"a": cluster("a"), "b": cluster("b")})
    one = proxy_from_node(make_node("sidecar-1"))
    two = proxy_from_node(make_node("sidecar-2"))
    assert one.node_id != two.node_id
    assert one.for_type(CDS) == two.for_type(CDS)

    first = cache.resources(CDS, one)
    assert cache.serializations == 2
    second = cache.resources(CDS, two)
    assert second is first
    assert cache.serializations == 2  # memoized: nothing serialized for the second proxy
    for name in ("a", "b"):
        assert second[name] is first[name]
        assert second[name].sotw_entry is first[name].sotw_entry


def test_different_keys_with_identical_resources_share_the_bytes() -> None:
    cache = clusters_cache({"a": cluster("a")})
    east = proxy_from_node(make_node("sidecar-1", cluster="east"))
    west = proxy_from_node(make_node("sidecar-2", cluster="west"))
    assert east.for_type(CDS) != west.for_type(CDS)

    a_east = cache.resources(CDS, east)["a"]
    a_west = cache.resources(CDS, west)["a"]
    assert cache.serializations == 2  # generated per key ...
    assert a_west is a_east  # ... but interned by content: one Resource, one set of bytes


def test_regeneration_without_change_keeps_identity_and_a_change_does_not() -> None:
    state = {"a": cluster("a")}
    cache = clusters_cache(state)
    proxy = proxy_from_node(make_node())
    before = cache.resources(CDS, proxy)
    cache.invalidate()
    assert cache.resources(CDS, proxy) is before

    state["a"] = cluster("a", timeout=9)
    cache.invalidate()
    after = cache.resources(CDS, proxy)
    assert after is not before
    assert after.version != before.version
    assert after["a"].version != before["a"].version


@pytest.mark.parametrize("modes", [("sotw", "sotw"), ("sotw", "delta"), ("delta", "delta")], ids="-".join)
async def test_streams_with_the_same_key_serialize_once(mesh: Mesh, modes: tuple[str, str]) -> None:
    clients = [await mesh.client(mode, node=make_node(f"same-key-{i}")) for i, mode in enumerate(modes)]
    replies = []
    for client in clients:
        await client.subscribe(CDS)
        replies.append(await client.recv_ack())
    assert mesh.cache.serializations == len(mesh.state[CDS])
    first, second = replies
    assert first.resources == second.resources
    assert first.version == second.version

    mesh.put(cluster("a", timeout=6))
    mesh.publish()
    for client in clients:
        await client.recv_ack()
    assert mesh.cache.serializations == 2 * len(mesh.state[CDS])  # once per mesh version, not per stream
