"""API server loss with real Envoys: the mesh comes from two member clusters' Kubernetes API servers
(fake aiohttp servers, the real kubernetes_asyncio client); the workloads run in the clusters'
network namespaces. West's API server stops for longer than any watch timeout while its workloads
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
from kubeapi.kubeconfig import write_kubeconfig
from kubeapi.server import FakeKubeApi

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
        "spec": {"serviceAccountName": account},
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


def declare(api: FakeKubeApi, service_name: str, *apps: App) -> None:
    api.apply(service(service_name))
    for app in apps:
        api.apply(pod(app.name, service_name))
    api.apply(endpoint_slice(service_name, list(apps)))


async def test_api_server_loss_keeps_traffic_demotes_then_reconciles(dp: DataPath, tmp_path: Path) -> None:
    apis = {name: FakeKubeApi(bookmark_interval=0.5) for name in ("east", "west")}
    for api in apis.values():
        await api.start()
    try:
        p = await pods(dp, ("east", "web-east"), ("west", "web-west"), ("west", "api-west"))
        declare(apis["east"], "web", p["web-east"].app)
        declare(apis["west"], "web", p["web-west"].app)
        declare(apis["west"], "api", p["api-west"].app)
        args: list[str] = ["--max-staleness", str(MAX_STALENESS), "--ready-timeout", "5"]
        for name, api in apis.items():
            kubeconfig = write_kubeconfig(tmp_path / f"{name}.yaml", api.url, api.token, name)
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
        declare(apis["west"], "api", p["api-west"].app, p["api-west-2"].app)
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
            await api.stop()
        await asyncio.sleep(0)
