"""Control plane restart: `isthmus serve` is SIGKILLed; Envoy keeps serving its last config while it is
down, reconnects when it is back on the same port, and resyncs to a mesh changed in the meantime
(an added endpoint, an added service, a removed service) (SotW and Delta)."""

from __future__ import annotations

import asyncio
import time

import pytest

pytestmark = pytest.mark.envoy

CONNECTED = "control_plane.connected_state"
XDS_CLUSTER = "isthmus_xds"  # the bootstrap's static cluster for the control plane
RECONNECT_DEADLINE = 40.0  # Envoy's jittered reconnect backoff grows while the control plane is down


async def test_envoy_survives_control_plane_restart(delta, procs, mesh, upstreams, eventually, holds) -> None:
    web1 = await upstreams.start("web-1", "127.0.0.1")
    web2 = await upstreams.start("web-2", "127.0.0.2")
    reviews1 = await upstreams.start("reviews-1", "127.0.0.3")
    api1 = await upstreams.start("api-1", "127.0.0.4")
    web, reviews, api = mesh.cluster("web"), mesh.cluster("reviews", 9080), mesh.cluster("api")

    mesh.write(mesh.service("web", web1), mesh.service("reviews", reviews1, port=9080))
    cp = await procs.control_plane(mesh.path)
    envoy = await procs.envoy(procs.bootstrap(xds_port=cp.xds_port, delta=delta))

    async def hosts_are(expected: dict[str, set[str]]) -> None:
        hosts = await envoy.admin.cluster_hosts()
        assert {name: set(h) for name, h in hosts.items()} == expected

    async def answers(host: str, upstream: str) -> None:
        reply = await envoy.request(host)
        assert (reply.status, reply.upstream) == (200, upstream), reply

    async def connected(state: int) -> None:
        stats = await envoy.admin.stats(f"^{CONNECTED}$")
        assert stats.get(CONNECTED) == state, stats

    before = {web: {web1.address}, reviews: {reviews1.address}}
    await eventually(lambda: hosts_are(before), what="the initial mesh is applied")
    await eventually(lambda: answers("web.shop:80", "web-1"), what="web-1 answers")
    await answers("reviews.shop:9080", "reviews-1")
    connect_failures = f"cluster.{XDS_CLUSTER}.upstream_cx_connect_fail"
    failures_before = (await envoy.admin.stats(f"^{connect_failures}$"))[connect_failures]

    # The control plane dies without a goodbye.
    cp.kill()
    await eventually(lambda: connected(0), what="Envoy notices the control plane is gone")

    # While it is down, Envoy serves its last config (and tries to reconnect); meanwhile the mesh changes.
    mesh.write(mesh.service("web", web1, web2), mesh.service("api", api1))

    async def last_config_serves() -> None:
        await answers("web.shop:80", "web-1")
        await answers("reviews.shop:9080", "reviews-1")
        await hosts_are(before)

    await holds(
        last_config_serves, what="Envoy serving its last config while the control plane is down", duration=2.0
    )
    assert (await envoy.request("api.shop:80")).status == 404

    async def reconnect_attempted() -> None:
        failures = (await envoy.admin.stats(f"^{connect_failures}$"))[connect_failures]
        assert failures > failures_before, f"{connect_failures}: {failures}"

    await eventually(reconnect_attempted, what="Envoy tries to reconnect and fails while it is down")
    await hosts_are(before)

    # Back on the same port: Envoy reconnects and resyncs to the changed mesh.
    cp.start()
    await cp.wait_ready()
    await eventually(lambda: connected(1), what="Envoy reconnects", within=RECONNECT_DEADLINE)
    after = {web: {web1.address, web2.address}, api: {api1.address}}
    await eventually(lambda: hosts_are(after), what="the changed mesh is applied after the restart")
    active = await envoy.admin.active_clusters()
    assert set(active) == set(after), sorted(active)
    await eventually(lambda: answers("api.shop:80", "api-1"), what="the new service api answers")

    async def gone() -> None:
        reply = await envoy.request("reviews.shop:9080")
        assert reply.status == 404, reply

    await eventually(gone, what="the removed service reviews is no longer routed")
    seen = set()
    for _ in range(40):
        reply = await envoy.request("web.shop:80")
        assert reply.status == 200, reply
        seen.add(reply.upstream)
        if len(seen) == 2:
            break
    assert seen == {"web-1", "web-2"}, seen

    # It was the same Envoy all along, and it rejected nothing.
    assert envoy.running
    info = await cp.readyz()
    assert info["proxies"] == 1, info

    # A graceful stop (SIGTERM) with Envoy connected exits cleanly, and Envoy keeps serving.
    started = time.monotonic()
    status = await asyncio.to_thread(cp.stop, 15.0)
    took = time.monotonic() - started
    assert status == 0, f"isthmus serve exited with {status} after SIGTERM ({took:.1f}s)"
    await eventually(lambda: connected(0), what="Envoy sees the control plane go away")
    await answers("api.shop:80", "api-1")
    stats = await envoy.admin.rejections()
    assert set(stats.values()) == {0}, stats
