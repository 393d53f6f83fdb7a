"""A gateway whose xDS stream moves from one replica to another is not taken for dead (issue 14's
known divergence): two ``isthmus serve`` replicas watch the same member clusters (fake API servers);
west's gateway is the labelled Service, its pod ready in its EndpointSlice. Its stream is on replica A,
then leaves A for B; a sidecar of east served by A keeps getting west's gateway endpoint HEALTHY past
the grace period. When the gateway's pod is not ready, both replicas push it UNHEALTHY, whatever the
streams say."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import health_check_pb2
from test_envoy_kube import KubeControlPlane

from conftest import LOOPBACK
from isthmus.xds import types
from kubeapi.kubeconfig import write_kubeconfig
from kubeapi.server import FakeKubeApi
from protocol.client import DeltaClient, make_node

pytestmark = pytest.mark.envoy

WEB = "outbound|80||web.shop.svc.cluster.local"
GATEWAY_IP = "127.0.0.50"
GRACE = "1"


def objects(api: FakeKubeApi, pod_ip: str, gateway: bool) -> None:
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    api.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 80}]},
        }
    )
    api.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-1",
                "namespace": "shop",
                "annotations": {"isthmus.io/inbound-port": "15006"},
            },
            "spec": {"serviceAccountName": "web"},
        }
    )
    api.create(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-x",
                "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {
                    "addresses": [pod_ip],
                    "conditions": {"ready": True},
                    "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1"},
                }
            ],
        }
    )
    if gateway:
        api.create(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": "eastwest",
                    "namespace": "shop",
                    "labels": {"isthmus.io/gateway": "eastwest"},
                },
                "spec": {"type": "LoadBalancer", "ports": [{"name": "tls", "port": 15443}]},
                "status": {"loadBalancer": {"ingress": [{"ip": GATEWAY_IP}]}},
            }
        )
        api.create(gateway_slice(True))


def gateway_slice(ready: bool) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "eastwest-x",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "eastwest"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "tls", "port": 15443}],
        "endpoints": [{"addresses": ["10.9.9.9"], "conditions": {"ready": ready}}],
    }


def gateway_health(reply: Any) -> int | None:
    """The health of west's gateway endpoint in a ClusterLoadAssignment reply (None: absent)."""
    assignment = reply.resources.get(WEB)
    if assignment is None:
        return None
    for locality in assignment.endpoints:
        for lb in locality.lb_endpoints:
            if lb.endpoint.address.socket_address.address == GATEWAY_IP:
                return int(lb.health_status)
    return None


async def test_a_gateway_moving_between_replicas_stays_alive_for_both(procs: Any, tmp_path: Path) -> None:
    apis = {"east": FakeKubeApi(), "west": FakeKubeApi()}
    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    try:
        for name, api in apis.items():
            await api.start()
            write_kubeconfig(directory / f"{name}.yaml", api.url, api.token, name)
        objects(apis["east"], "10.1.0.1", gateway=False)
        objects(apis["west"], "10.2.0.1", gateway=True)
        replicas = []
        for i in range(2):
            cp = KubeControlPlane(
                directory,
                tmp_path / f"replica-{i}.log",
                ["--insecure-unauthenticated-xds", "--gateway-grace", GRACE],
            )
            procs.started.append(cp)
            cp.start()
            await cp.wait_ready()
            replicas.append(cp)
        a, b = replicas
        gateway_node = make_node(
            "gateway~gw-1.isthmus-system~west",
            cluster="west",
            role="gateway",
            namespace="isthmus-system",
            service="isthmus-gateway",
            service_account="isthmus-gateway",
        )
        async with (
            grpc.aio.insecure_channel(f"{LOOPBACK}:{a.xds_port}") as on_a,
            grpc.aio.insecure_channel(f"{LOOPBACK}:{b.xds_port}") as on_b,
        ):
            sidecar = DeltaClient(
                on_a,
                make_node("sidecar~client-1.shop~east", cluster="east", namespace="shop", service="client"),
            )
            await sidecar.subscribe(types.ENDPOINT, [WEB])
            first = await sidecar.recv()
            await sidecar.ack(first)
            assert gateway_health(first) == health_check_pb2.HEALTHY, first
            # The gateway's stream: on A, then it moves to B.
            gateway = DeltaClient(on_a, gateway_node)
            await gateway.subscribe(types.CLUSTER, ["*"])
            await gateway.ack(await gateway.recv())
            await asyncio.sleep(0.5)
            await gateway.close()
            moved = DeltaClient(on_b, gateway_node)
            await moved.subscribe(types.CLUSTER, ["*"])
            await moved.ack(await moved.recv())
            # Past A's grace period (1 s) for the stream it lost: nothing marks west's gateway dead.
            pushed = await sidecar.drain(within=3 * float(GRACE) + 1)
            assert all(gateway_health(r) in (None, health_check_pb2.HEALTHY) for r in pushed), [
                str(r) for r in pushed
            ]
            # The gateway's pod is not ready: both replicas push it unhealthy (A has no stream, B has).
            apis["west"].update({**gateway_slice(False), "metadata": {**gateway_slice(False)["metadata"]}})
            for channel in (on_a, on_b):
                watcher = DeltaClient(
                    channel,
                    make_node(
                        "sidecar~client-2.shop~east", cluster="east", namespace="shop", service="client"
                    ),
                )
                await watcher.subscribe(types.ENDPOINT, [WEB])

                async def unhealthy(w: DeltaClient = watcher) -> None:
                    while True:
                        reply = await w.recv()
                        await w.ack(reply)
                        if gateway_health(reply) == health_check_pb2.UNHEALTHY:
                            return

                await asyncio.wait_for(unhealthy(), 15)
                await watcher.close()
            await moved.close()
            await sidecar.close()
    finally:
        for api in apis.values():
            await api.stop()
