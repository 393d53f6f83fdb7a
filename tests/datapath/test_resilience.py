"""Resilience with real Envoys across network namespaces (issue 5): endpoint failure, control plane
loss. Each test measures a steady request stream at the client and prints its figures (also in
docs/resilience.md); the assertions bound them loosely, timings are not the point of the test."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import pytest

from datapath.harness import DataPath, eventually
from datapath.scenario import (
    Stream,
    answered_by,
    meshed,
    pods,
    start_sidecars,
    stream_around,
    web_east_and_west,
)

pytestmark = [pytest.mark.envoy, pytest.mark.datapath]


async def test_endpoint_failure_moves_traffic_to_the_other_cluster(dp: DataPath) -> None:
    """Every endpoint of web in east dies (its process stops; the API still lists it). Retries and
    outlier detection move the stream to west; few or no requests fail."""
    client = (await web_east_and_west(dp)).client

    async def east_serves() -> None:
        assert await answered_by(client, "web.shop", count=10) == {"web-east": 10}

    await eventually(east_serves, what="east serves east", within=20)
    stream, killed = await stream_around(
        client, "web.shop", lambda: dp.agent("east").stop_app("web-east"), settle=4.0
    )
    after, failed = stream.after(killed), stream.failed_after(killed)
    recovered = stream.recovered_at(killed, "web-west")
    print(
        f"\nendpoint failure: {len(failed)} failed of {len(after)} requests after the kill; "
        f"served by west only from {None if recovered is None else round(recovered - killed, 3)} s"
    )
    assert recovered is not None, [(s.ok, s.app) for s in after][:20]
    assert len(failed) <= 2, [s.error for s in failed][:5]
    assert len(after) >= 20


LISTENER_CHURN = r"^listener_manager\.(listener_modified|listener_removed|total_listeners_draining)$"


async def test_control_plane_loss_keeps_traffic_and_restart_drains_nothing(dp: DataPath, tmp_path) -> None:
    """isthmus is killed for 15 s: every Envoy keeps its last configuration and a stream across
    clusters sees no failure. On restart (same CA root, from --ca-dir) every proxy reconnects and
    resyncs without modifying or draining a single listener."""
    p = await pods(dp, ("east", "web-east"), ("west", "api-west"))
    services = (
        dp.mesh.service("web", meshed(dp, p["web-east"], "web")),
        dp.mesh.service("api", meshed(dp, p["api-west"], "api")),
    )
    await dp.control_plane(*services, extra_args=("--ca-dir", str(tmp_path / "ca")))
    await start_sidecars(dp, {"web-east": "web", "api-west": "api"}, p)
    envoys = [
        p["web-east"].sidecar,
        p["api-west"].sidecar,
        await dp.gateway("west"),
        await dp.sidecar("east", "client"),
    ]
    client = envoys[-1]
    assert client is not None

    async def both_served() -> None:
        assert await answered_by(client, "web.shop", count=4) == {"web-east": 4}
        assert await answered_by(client, "api.shop", count=4) == {"api-west": 4}

    await eventually(both_served, what="east reaches web (east) and api (west)", within=20)
    before = [await e.admin.stats(LISTENER_CHURN) for e in envoys if e is not None]
    streams = [Stream(client, "web.shop"), Stream(client, "api.shop")]
    for s in streams:
        s.start()
    cp = await dp.restart_control_plane(kill=True, down_for=15.0)
    await cp.wait_proxies(len(envoys))
    await asyncio.sleep(2.0)
    for s in streams:
        await s.stop()
    after = [await e.admin.stats(LISTENER_CHURN) for e in envoys if e is not None]

    total = sum(s.total for s in streams)
    failures = [f for s in streams for f in s.failures]
    print(f"\ncontrol plane loss (15 s down): {len(failures)} failed of {total} requests")
    assert total >= 100
    assert not failures, failures[:5]
    assert all(len(s) == 3 for s in before), before
    assert after == before, "the resync modified, removed or drained listeners"


async def test_cluster_loss_dead_gateway_moves_traffic_and_is_marked(make_datapath) -> None:
    """Three clusters; north's client prefers west (same region) over east. West's gateway dies:
    outlier detection moves the stream to east at once, and the control plane, seeing the gateway's
    xDS stream gone, pushes west's gateway endpoints as unhealthy (not removed)."""
    dp = await make_datapath("east", "west", "north")
    dp.mesh.set_locality("east", "r1", "r1-a")
    dp.mesh.set_locality("west", "r2", "r2-a")
    dp.mesh.set_locality("north", "r2", "r2-b")
    web = await web_east_and_west(dp, client_in="north", gateways=("east", "west"))
    west_gateway, client = web.gateways["west"], web.client

    async def west_serves() -> None:
        assert await answered_by(client, "web.shop", count=10) == {"web-west": 10}

    await eventually(west_serves, what="north prefers west (same region)", within=20)
    stream = Stream(client, "web.shop")
    stream.start()
    await asyncio.sleep(1.0)
    killed = time.monotonic()
    west_gateway.process.signal_group(signal.SIGKILL)

    west_host = f"{dp['west'].gateway_address}:15443"

    async def marked_unhealthy() -> None:
        hosts = await client.admin.cluster_hosts()
        health = hosts["outbound|80||web.shop.svc.cluster.local"][west_host]["health_status"]
        assert health.get("eds_health_status") == "UNHEALTHY", health

    await eventually(marked_unhealthy, what="the control plane marks west's gateway unhealthy", within=15)
    marked = time.monotonic()
    await asyncio.sleep(1.0)
    await stream.stop()
    after, failed = stream.after(killed), stream.failed_after(killed)
    moved = stream.recovered_at(killed, "web-east")
    moved_after = None if moved is None else round(moved - killed, 3)
    print(
        f"\ncluster loss (gateway killed): {len(failed)} failed of {len(after)}; east only from "
        f"{moved_after} s; marked unhealthy after {marked - killed:.1f} s"
    )
    assert moved is not None
    assert len(failed) <= 2, [s.error for s in failed][:5]


async def run_cli(*argv: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "isthmus.cli",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, out.decode()
    return out.decode()


async def test_drain_moves_traffic_gradually_without_failures_and_undrain_brings_it_back(
    dp: DataPath,
) -> None:
    """`isthmus drain east`: east's own client moves to west step by step (75, 50, 25, 0 %), every
    step ACKed by every proxy, 0 failed requests; `isthmus drain east --undo` brings it back."""
    web = await web_east_and_west(dp, extra_args=("--drain-step", "1"))
    cp, client = web.control_plane, web.client

    async def only(app: str) -> None:
        assert await answered_by(client, "web.shop", count=10) == {app: 10}

    await eventually(lambda: only("web-east"), what="east serves east", within=20)
    stream = Stream(client, "web.shop")
    stream.start()
    started = time.monotonic()
    out = await run_cli("drain", "east", "--admin-address", f"127.0.0.1:{cp.admin_port}")
    drained = time.monotonic()
    assert "east: drain done at 0%" in out, out
    await asyncio.sleep(1.0)
    during = stream.after(started)
    tail = stream.after(drained + 0.5)
    assert {s.app for s in tail} == {"web-west"}, "drained: only west serves"
    # Gradual: while the drain ran, both clusters served.
    in_drain = [s for s in during if s.at < drained]
    assert {"web-east", "web-west"} <= {s.app for s in in_drain}
    out = await run_cli("drain", "east", "--undo", "--admin-address", f"127.0.0.1:{cp.admin_port}")
    assert "east: undrain done at 100%" in out, out
    await eventually(lambda: only("web-east"), what="east serves east again", within=20)
    await stream.stop()
    print(f"\ndrain: {len(stream.failures)} failed of {stream.total}; drain took {drained - started:.1f} s")
    assert not stream.failures, stream.failures[:5]
