"""The cross-cluster data path with real Envoys in separate network namespaces (issue 4).

Two member clusters, east and west, each its own network namespace: pods (apps behind sidecars)
have addresses only their own cluster can reach; each cluster's east-west gateway listens on the
transit network, the only way between clusters. The control plane (file source, mTLS with its
development CA) serves every Envoy over a Unix socket ("unix"); the tests marked ``both_xds`` run
a second time with xDS over the transit network ("transit": TLS to the control plane's own
namespace, every sidecar and gateway authenticated by its token; see datapath.harness). The
certificate rotation test, 12 s of steady traffic by design, runs over the Unix socket only.
Requests are real HTTP requests made inside east's namespace to the client sidecar's outbound
listener.
"""

from __future__ import annotations

import asyncio

import pytest

from datapath.harness import XDS_MODES, DataPath, eventually
from datapath.scenario import (
    SIDECAR_PORT,
    Stream,
    answered_by,
    meshed,
    pods,
    start_sidecars,
    web_east_and_west,
)

pytestmark = [pytest.mark.envoy, pytest.mark.datapath]
both_xds = pytest.mark.parametrize("dp", XDS_MODES, indirect=True)

CLIENT_ID = "spiffe://cluster.local/ns/shop/sa/client"


@both_xds
async def test_affinity_to_own_cluster_then_zone(dp: DataPath) -> None:
    """web runs in east (two zones) and west. From east zone a: east-a serves; without it,
    east-b (same cluster, other zone) serves, not west."""
    p = await pods(dp, ("east", "web-east-a"), ("east", "web-east-b"), ("west", "web-west"))
    _, east_zone = dp.mesh.locality("east")
    web = [
        meshed(dp, p["web-east-a"], "web"),
        meshed(dp, p["web-east-b"], "web", zone="east-other-zone"),
        meshed(dp, p["web-west"], "web"),
    ]
    await dp.control_plane(dp.mesh.service("web", *web))
    await start_sidecars(dp, dict.fromkeys(p, "web"), p)
    client = await dp.sidecar("east", "client")
    assert dp.mesh.locality("east")[1] == east_zone

    async def zone_a_only() -> None:
        assert await answered_by(client, "web.shop") == {"web-east-a": 20}

    await eventually(zone_a_only, what="east's own zone serves every request", within=20)

    dp.mesh.write(dp.mesh.service("web", *web[1:]))

    async def other_zone() -> None:
        assert await answered_by(client, "web.shop") == {"web-east-b": 20}

    await eventually(other_zone, what="east's other zone takes over, not west", within=20)


@both_xds
async def test_remote_only_service_goes_through_the_remote_gateway(dp: DataPath) -> None:
    """api runs only in west. From east it is served by west, through west's gateway; west's pod
    address is unreachable from east's namespace."""
    p = await pods(dp, ("west", "api-west"))
    await dp.control_plane(dp.mesh.service("api", meshed(dp, p["api-west"], "api")))
    await start_sidecars(dp, {"api-west": "api"}, p)
    gateway = await dp.gateway("west")
    client = await dp.sidecar("east", "client")
    await gateway.wait_listeners("eastwest_15443")

    async def served_by_west() -> None:
        assert await answered_by(client, "api.shop", count=10) == {"api-west": 10}

    await eventually(served_by_west, what="east reaches api in west", within=20)
    stats = await gateway.admin.stats(r"^tcp\.eastwest\.downstream_cx_total$")
    assert stats["tcp.eastwest.downstream_cx_total"] >= 1, stats
    # East's EDS for api holds west's gateway, never west's pod address.
    hosts = await client.admin.cluster_hosts()
    assert set(hosts["outbound|80||api.shop.svc.cluster.local"]) == {f"{dp['west'].gateway_address}:15443"}
    if dp.isolated:
        blocked = await dp.agent("east").connect(p["api-west"].app.address, SIDECAR_PORT, timeout=2)
        assert not blocked.ok, "a west pod address must not be reachable from east"


@both_xds
async def test_mtls_end_to_end_and_the_gateway_holds_no_key(dp: DataPath) -> None:
    """The app in west sees the caller's SPIFFE identity, set by its sidecar; the gateway has no
    secret and no TLS context; the sidecar's inbound port refuses plain text."""
    p = await pods(dp, ("west", "api-west"))
    await dp.control_plane(dp.mesh.service("api", meshed(dp, p["api-west"], "api")))
    await start_sidecars(dp, {"api-west": "api"}, p)
    gateway = await dp.gateway("west")
    client = await dp.sidecar("east", "client")

    async def identity_seen() -> None:
        got = await client.request("api.shop", "/", count=1, headers={"x-forwarded-client-cert": "By=forged"})
        assert got.all_ok, got.summary()
        xfcc = got.results[0].request_header("x-forwarded-client-cert") or ""
        assert f"URI={CLIENT_ID}" in xfcc, xfcc
        assert "forged" not in xfcc, "the caller's own XFCC header is replaced"
        assert "By=spiffe://cluster.local/ns/shop/sa/api" in xfcc, xfcc

    await eventually(identity_seen, what="west's app sees east's client identity", within=20)
    assert await gateway.admin.config_dump("dynamic_active_secrets") == []
    listener = (await gateway.admin.listeners())["eastwest_15443"]["active_state"]["listener"]
    assert all("transport_socket" not in chain for chain in listener["filter_chains"])
    # Plain text straight to west's sidecar inbound port (from inside west) gets no answer.
    sidecar = p["api-west"].sidecar
    assert sidecar is not None
    plain = await dp.agent("west").get(f"http://{p['api-west'].app.address}:{SIDECAR_PORT}/", timeout=3)
    assert not plain.ok, plain.describe()
    assert plain.status is None, plain.describe()


@both_xds
async def test_failover_to_the_other_cluster_and_back(dp: DataPath) -> None:
    """web in east and west, called from east: east serves; east's endpoints removed: west serves
    (through west's gateway); restored: east again. No failed request in between."""
    web = await web_east_and_west(dp)
    both, client = web.endpoints, web.client

    async def only(app: str) -> None:
        assert await answered_by(client, "web.shop", count=10) == {app: 10}

    await eventually(lambda: only("web-east"), what="east serves east", within=20)
    stream = Stream(client, "web.shop")
    stream.start()
    dp.mesh.write(dp.mesh.service("web", both[1]))
    await eventually(lambda: only("web-west"), what="west takes over", within=20)
    dp.mesh.write(dp.mesh.service("web", *both))
    await eventually(lambda: only("web-east"), what="east is back", within=20)
    await stream.stop()
    assert stream.total >= 20, stream.total
    assert not stream.failures, stream.failures[:5]
    assert {"web-east", "web-west"} <= stream.apps, stream.apps


async def test_certificates_rotate_without_failed_requests(dp: DataPath) -> None:
    """With a 10 s certificate lifetime, certificates are renewed every ~5 s; a steady stream of
    requests from east to west over 12 s sees no failure, and west's sidecar changed certificate."""
    p = await pods(dp, ("west", "api-west"))
    await dp.control_plane(
        dp.mesh.service("api", meshed(dp, p["api-west"], "api")), extra_args=("--cert-ttl", "10")
    )
    await start_sidecars(dp, {"api-west": "api"}, p)
    await dp.gateway("west")
    client = await dp.sidecar("east", "client")
    server = p["api-west"].sidecar
    assert server is not None

    async def served() -> None:
        assert await answered_by(client, "api.shop", count=2) == {"api-west": 2}

    await eventually(served, what="east reaches api in west", within=20)

    async def serial() -> str:
        certs = await server.admin.json("/certs")
        chains = [c for entry in certs["certificates"] for c in entry.get("cert_chain", [])]
        assert chains, certs
        return str(chains[0]["serial_number"])

    first = await serial()
    stream = Stream(client, "api.shop")
    stream.start()
    await asyncio.sleep(12)
    await stream.stop()
    assert stream.total >= 100, stream.total
    assert not stream.failures, stream.failures[:5]
    assert await serial() != first, "the certificate was rotated during the stream"
