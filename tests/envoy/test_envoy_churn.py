"""Convergence under churn: an in-process ADS server gets many mesh views in quick succession (services
come and go, endpoints move, protocols flip), often faster than Envoy ACKs; Envoy must end up with
exactly the last view, with nothing warming and nothing rejected (SotW and Delta)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from isthmus.discovery.file import parse_mesh
from isthmus.xds.cache import ConfigCache
from isthmus.xds.server import AdsServer

pytestmark = pytest.mark.envoy

CHANGES = 40
SEED = 20240611  # fixed: a failure replays the same sequence


@pytest.fixture
async def ads() -> AsyncIterator[tuple[AdsServer, ConfigCache]]:
    cache = ConfigCache()
    server = AdsServer(cache, "127.0.0.1:0")
    await server.start()
    try:
        yield server, cache
    finally:
        await server.stop(0.5)


async def test_envoy_converges_to_the_last_of_many_quick_changes(
    delta, ads, procs, mesh, upstreams, eventually
) -> None:
    server, cache = ads
    rnd = random.Random(SEED)
    pool = [await upstreams.start(f"u{i}", f"127.0.1.{i + 1}") for i in range(4)]
    names = ["a", "b", "c", "d", "e"]

    def random_services() -> list[dict]:
        return [
            mesh.service(
                name, *rnd.sample(pool, rnd.randint(0, len(pool))), protocol=rnd.choice(["http", "http2"])
            )
            for name in sorted(rnd.sample(names, rnd.randint(0, len(names))))
        ]

    def expected_of(services: list[dict]) -> dict[str, set[str]]:
        return {
            mesh.cluster(s["name"]): {f"{e['address']}:{e['port']}" for e in s["endpoints"]} for s in services
        }

    async def applied(services: list[dict]) -> None:
        expected = expected_of(services)
        hosts = await envoy.admin.cluster_hosts()
        assert {name: set(h) for name, h in hosts.items()} == expected
        assert await envoy.admin.warming_clusters() == []
        routes = await envoy.admin.route_configs()
        vhosts = routes.get("outbound_http", {}).get("virtual_hosts", [])
        assert {vh["routes"][0]["route"]["cluster"] for vh in vhosts} == set(expected)
        protocols = {
            name: bool(c["cluster"].get("typed_extension_protocol_options"))
            for name, c in (await envoy.admin.active_clusters()).items()
        }
        assert protocols == {mesh.cluster(s["name"]): s["ports"][0]["protocol"] == "http2" for s in services}

    assert server.port is not None
    envoy = await procs.envoy(procs.bootstrap(xds_port=server.port, delta=delta))
    services = random_services()
    cache.set_view(parse_mesh(mesh.text(*services), "churn"))
    await eventually(lambda: applied(services), what="the first view is applied")

    for _ in range(CHANGES):
        services = random_services()
        cache.set_view(parse_mesh(mesh.text(*services), "churn"))
        await asyncio.sleep(rnd.choice([0, 0, 0.002, 0.03]))  # bursts coalesce behind un-ACKed pushes
    await eventually(lambda: applied(services), what=f"Envoy converges to the last of {CHANGES} views")

    (status,) = server.status()
    assert all(t.nacks == 0 for t in status.types.values()), status
    stats = await envoy.admin.rejections()
    assert set(stats.values()) == {0}, stats
    # Traffic follows the last view too.
    for service in services:
        if service["endpoints"] and service["ports"][0]["protocol"] == "http":
            reply = await envoy.request(f"{service['name']}.shop:80")
            assert reply.status == 200, reply
            assert reply.upstream in {u.name for u in pool}, reply
