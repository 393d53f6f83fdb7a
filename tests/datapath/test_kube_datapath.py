"""API server loss with real Envoys: the mesh comes from two member clusters' Kubernetes API servers
(fake aiohttp servers, and real kube-apiservers read with the least-privilege reader role; the
real kubernetes_asyncio client either way); the workloads run in the clusters' network
namespaces. West's API server stops for longer than any watch timeout while its workloads
keep running: traffic to them continues with 0 failed requests, west is reported unreachable, then
stale (demoted: west's own client moves to east), and a change made meanwhile is reconciled when
the API server returns."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from datapath.harness import App, DataPath, eventually
from datapath.scenario import SIDECAR_PORT, Stream, answered_by, pods, start_sidecars
from kubeapi.server import FakeKubeApi
from realkube.members import FakeMember, MemberApi, RealMember

pytestmark = [pytest.mark.envoy, pytest.mark.datapath]

MAX_STALENESS = 4


def service(name: str) -> dict[str, Any]:
    ports = [{"name": "http", "port": 80, "targetPort": 8080}]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"ports": ports},
    }


def pod(name: str, account: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "annotations": {"isthmus.io/inbound-port": str(SIDECAR_PORT)},
        },
        "spec": {"serviceAccountName": account, "containers": [{"name": "app", "image": "isthmus.test/app"}]},
    }


def endpoint_slice(service_name: str, apps: list[App]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service_name}-1",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {
                "addresses": [app.address],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": app.name},
            }
            for app in apps
        ],
    }


async def declare(api: MemberApi, service_name: str, *apps: App) -> None:
    await api.apply(service(service_name))
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": service_name, "namespace": "shop"},
    }
    await api.apply(account)  # a real API server admits a Pod only if its service account exists
    for app in apps:
        await api.apply(pod(app.name, service_name))
    await api.apply(endpoint_slice(service_name, list(apps)))


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.realkube)])
def member_apis(request: pytest.FixtureRequest) -> dict[str, MemberApi]:
    """East's and west's API servers: fake ones, or real ones of this test only."""
    if request.param == "fake":
        return {name: FakeMember(name, FakeKubeApi(bookmark_interval=0.5)) for name in ("east", "west")}
    clusters = request.getfixturevalue("real_cluster_factory")("east", "west")
    return {c.name: RealMember(c.name, c) for c in clusters}


async def test_api_server_loss_keeps_traffic_demotes_then_reconciles(
    dp: DataPath, tmp_path: Path, member_apis: dict[str, MemberApi]
) -> None:
    apis = member_apis
    for api in apis.values():
        await api.prepare(("shop",))
    try:
        p = await pods(dp, ("east", "web-east"), ("west", "web-west"), ("west", "api-west"))
        await declare(apis["east"], "web", p["web-east"].app)
        await declare(apis["west"], "web", p["web-west"].app)
        await declare(apis["west"], "api", p["api-west"].app)
        # The data-path proxies present no token yet (they connect over a Unix socket).
        args: list[str] = [
            "--max-staleness",
            str(MAX_STALENESS),
            "--ready-timeout",
            "5",
            "--insecure-unauthenticated-xds",
        ]
        for name, api in apis.items():
            kubeconfig = await api.kubeconfig(tmp_path / f"{name}.yaml")
            args += [
                "--cluster",
                f"{name}={kubeconfig}",
                "--cluster-gateway",
                f"{name}={dp[name].gateway_address}:15443",
            ]
        # Member clusters come from Kubernetes only: the mesh file declares none.
        localities = dict(dp.mesh.members)
        dp.mesh.members.clear()
        cp = await dp.control_plane(extra_args=args)
        dp.mesh.members.update(localities)  # (the harness reads the proxies' localities from it)

        await start_sidecars(dp, {"web-east": "web", "web-west": "web", "api-west": "api"}, p)
        await dp.gateway("east")
        await dp.gateway("west")
        east_client = await dp.sidecar("east", "client")
        west_client = await dp.sidecar("west", "client")

        async def steady() -> None:
            assert await answered_by(east_client, "api.shop", count=4) == {"api-west": 4}
            assert await answered_by(west_client, "web.shop", count=4) == {"web-west": 4}

        await eventually(steady, what="east reaches api in west; west's client is served by west", within=30)
        streams = [Stream(east_client, "api.shop"), Stream(west_client, "web.shop")]
        for s in streams:
            s.start()

        await apis["west"].stop()

        async def west_state(expected: str) -> None:
            state = (await cp.readyz())["member_clusters"]["west"]["state"]
            assert state == expected, state

        await eventually(lambda: west_state("unreachable"), what="west is reported unreachable", within=15)
        await eventually(lambda: west_state("stale"), what="west turns stale", within=MAX_STALENESS + 10)

        async def demoted() -> None:
            assert await answered_by(west_client, "web.shop", count=4) == {"web-east": 4}

        await eventually(demoted, what="stale west is demoted: west's client is served by east", within=15)

        # While west's API server is away, a second api pod starts there (its store changes).
        p.update(await pods(dp, ("west", "api-west-2")))
        await start_sidecars(dp, {"api-west-2": "api"}, p)
        await declare(apis["west"], "api", p["api-west"].app, p["api-west-2"].app)
        await apis["west"].start()
        await eventually(lambda: west_state("synced"), what="west is synced again", within=30)

        async def reconciled() -> None:
            got = await answered_by(west_client, "api.shop", count=20)
            assert set(got) == {"api-west", "api-west-2"}, got
            assert await answered_by(west_client, "web.shop", count=4) == {"web-west": 4}

        await eventually(reconciled, what="the change made while west was away is applied", within=30)
        for s in streams:
            await s.stop()
        total = sum(s.total for s in streams)
        failures = [f for s in streams for f in s.failures]
        print(f"\nAPI server loss: {len(failures)} failed of {total} requests")
        assert total >= 100
        assert not failures, failures[:5]
    finally:
        for api in apis.values():
            if isinstance(api, FakeMember):
                await api.stop()
        await asyncio.sleep(0)
