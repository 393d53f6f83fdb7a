"""Real nodes running real pods: two member clusters side by side, each with one node (containerd,
kubelet, kube-proxy, a CNI bridge; realkube.node) in its cluster's network namespace of the
data-path topology (datapath.netns: the namespaces joined only by a transit bridge), images
imported from tarballs the tests write.

* A Deployment applied through the API server runs: its pod gets an address, passes its readiness
  probe and serves a request; a second pod reaches it by its Service's ClusterIP (kube-proxy).
* The clusters are reachable from each other only through what the tests route between them: a
  host-network pod of west on its node's transit address (where an east-west gateway listens) is
  reached from east; west's pod addresses are not.
* isthmus discovers the real thing: the EndpointSlice the controller manager wrote for the pod, the
  pod's service account and its node's locality, read with the least-privilege role.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.kube.members import Members
from isthmus.discovery.kube.reflector import Timing
from isthmus.discovery.model import MeshView, ServiceKey
from realkube.binaries import kube_bin
from realkube.cluster import RealCluster
from realkube.fixtures import clusters_with_nodes, reader_kubeconfig
from realkube.node import APP_IMAGE, ENVOY_IMAGE, Node, available
from realkube.objects import deployment, service
from realkube.wait import until

pytestmark = [pytest.mark.realkube, pytest.mark.skipif(available() is not None, reason=str(available()))]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    with clusters_with_nodes(("east", "west"), tmp_path_factory.mktemp("realnodes"), kube_bin("all")) as (
        _,
        made,
    ):
        yield made


async def node_ready(node: Node) -> None:
    async def ready() -> bool:
        obj = await node.cluster.admin.get("Node", None, node.name)
        conditions = (obj or {}).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    await until(ready, f"node {node.name} Ready")


async def ready_pod(cluster: RealCluster, app: str) -> dict[str, Any]:
    async def find() -> dict[str, Any] | None:
        pods = await cluster.admin.request(
            "GET", f"/api/v1/namespaces/default/pods?labelSelector=app%3D{app}"
        )
        for pod in pods["items"]:
            conditions = pod.get("status", {}).get("conditions", [])
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                return dict(pod)
        return None

    return await until(find, f"a Ready pod of {app} in {cluster.name}")


async def test_a_deployment_runs_serves_and_is_reached_by_its_cluster_ip(nodes: dict[str, Node]) -> None:
    east = nodes["east"]
    await node_ready(east)
    await east.cluster.admin.apply(service("web"))
    await east.cluster.admin.apply(deployment("web", "web-east"))
    pod = await ready_pod(east.cluster, "web")
    address = pod["status"]["podIP"]
    assert address.startswith(f"10.{east.n}.1."), address  # east's pod range, on its CNI bridge
    direct = east.run_in(str(east.bin / "testapp"), "get", f"http://{address}:8080/", "5")
    assert (direct.returncode, direct.stdout.strip()) == (0, "web-east"), direct.stderr
    # A second pod reaches the first through the Service's ClusterIP (kube-proxy's iptables rules).
    cluster_ip = (await east.cluster.admin.get("Service", "default", "web"))["spec"]["clusterIP"]  # type: ignore[index]
    await east.cluster.admin.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "client", "namespace": "default"},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "containers": [
                    {
                        "name": "get",
                        "image": APP_IMAGE,
                        "imagePullPolicy": "Never",
                        "args": ["get", f"http://{cluster_ip}/", "20"],
                    }
                ],
            },
        }
    )

    async def finished() -> dict[str, Any] | None:
        client = await east.cluster.admin.get("Pod", "default", "client")
        phase = (client or {}).get("status", {}).get("phase")
        return client if phase in ("Succeeded", "Failed") else None

    client = await until(finished, "the client pod to finish")
    state = client["status"]["containerStatuses"][0]["state"]
    assert client["status"]["phase"] == "Succeeded", state
    assert state["terminated"]["exitCode"] == 0


async def test_clusters_reach_each_other_only_through_what_is_routed(nodes: dict[str, Node]) -> None:
    east, west = nodes["east"], nodes["west"]
    for node in (east, west):
        await node_ready(node)
    await west.cluster.admin.apply(deployment("web", "web-west"))
    pod = await ready_pod(west.cluster, "web")
    address = pod["status"]["podIP"]
    assert address.startswith(f"10.{west.n}.1."), address
    mine = west.run_in(str(west.bin / "testapp"), "get", f"http://{address}:8080/")
    assert (mine.returncode, mine.stdout.strip()) == (0, "web-west"), mine.stderr
    other = east.run_in(str(east.bin / "testapp"), "get", f"http://{address}:8080/")
    assert other.returncode != 0, other.stdout
    assert "unreachable" in other.stderr, other.stderr
    # West's node address is on the transit network: a host-network pod there (as an east-west
    # gateway would be) is reached from east.
    gateway = deployment("gateway", "west-gateway")
    gateway["spec"]["template"]["spec"]["hostNetwork"] = True
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    container["args"] = ["serve", "west-gateway", f"{west.address}:15443"]
    container["ports"] = [{"name": "tls", "containerPort": 15443}]
    container["readinessProbe"] = {"tcpSocket": {"port": 15443}, "periodSeconds": 1}
    await west.cluster.admin.apply(gateway)
    await ready_pod(west.cluster, "gateway")
    through = east.run_in(str(east.bin / "testapp"), "get", f"http://{west.address}:15443/", "5")
    assert (through.returncode, through.stdout.strip()) == (0, "west-gateway"), through.stderr


async def test_isthmus_discovers_real_pods_with_the_reader_role(
    nodes: dict[str, Node], tmp_path: Path
) -> None:
    east = nodes["east"]
    await node_ready(east)
    await east.cluster.admin.apply(service("api"))
    await east.cluster.admin.apply(deployment("api", "api-east"))
    pod = await ready_pod(east.cluster, "api")
    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    await reader_kubeconfig(east.cluster, directory / "east.yaml")
    views: list[MeshView] = []
    changed = asyncio.Event()

    def on_view(view: MeshView) -> None:
        views.append(view)
        changed.set()

    aggregator = Aggregator(on_view, quiet=0.02, max_delay=0.2)
    timing = Timing(watch_timeout=30, request_timeout=5.0, backoff_initial=0.2, backoff_max=2.0)
    members = Members(aggregator, directory=directory, timing=timing, poll_interval=0.2)
    tasks = [asyncio.create_task(aggregator.run()), asyncio.create_task(members.run())]
    key = ServiceKey("default", "api")
    try:

        async def discovered() -> MeshView | None:
            view = views[-1] if views else None
            svc = view.services.get(key) if view else None
            return view if svc and [e.address for e in svc.endpoints] == [pod["status"]["podIP"]] else None

        view = await until(discovered, "isthmus to see the pod behind api")
        endpoint = view.services[key].endpoints[0]
        assert endpoint.locality.cluster == "east"
        assert endpoint.service_account == "default"
        assert endpoint.ports == (("http", 8080),)
    finally:
        for task in tasks:
            task.cancel()


HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
ENVOY_CONFIG = {
    "static_resources": {
        "listeners": [
            {
                "name": "inbound",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15001}},
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.http_connection_manager",
                                "typed_config": {
                                    "@type": HCM,
                                    "stat_prefix": "inbound",
                                    "route_config": {
                                        "virtual_hosts": [
                                            {
                                                "name": "app",
                                                "domains": ["*"],
                                                "routes": [
                                                    {"match": {"prefix": "/"}, "route": {"cluster": "app"}}
                                                ],
                                            }
                                        ]
                                    },
                                    "http_filters": [
                                        {
                                            "name": "envoy.filters.http.router",
                                            "typed_config": {"@type": ROUTER},
                                        }
                                    ],
                                },
                            }
                        ]
                    }
                ],
            }
        ],
        "clusters": [
            {
                "name": "app",
                "type": "STATIC",
                "load_assignment": {
                    "cluster_name": "app",
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {"address": "127.0.0.1", "port_value": 8080}
                                        }
                                    }
                                }
                            ]
                        }
                    ],
                },
            }
        ],
    }
}


async def test_envoy_from_a_local_image_proxies_for_the_app_in_its_pod(nodes: dict[str, Node]) -> None:
    """The Envoy image (the wheel's Envoy 1.40 and its libraries) runs beside the sample app in one
    pod, with its configuration from a ConfigMap volume, and answers for the app on its own port."""
    west = nodes["west"]
    await node_ready(west)
    west.import_envoy()
    await west.cluster.admin.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "envoy", "namespace": "default"},
            "data": {"envoy.yaml": json.dumps(ENVOY_CONFIG)},  # JSON is YAML
        }
    )
    pod = deployment("proxied", "proxied-west")
    spec = pod["spec"]["template"]["spec"]
    spec["containers"].append(
        {
            "name": "envoy",
            "image": ENVOY_IMAGE,
            "imagePullPolicy": "Never",
            "args": ["-c", "/etc/envoy/envoy.yaml", "--disable-hot-restart", "--log-level", "warn"],
            "volumeMounts": [{"name": "config", "mountPath": "/etc/envoy"}],
            "readinessProbe": {"tcpSocket": {"port": 15001}, "periodSeconds": 1},
        }
    )
    spec["volumes"] = [{"name": "config", "configMap": {"name": "envoy"}}]
    await west.cluster.admin.apply(pod)
    ready = await ready_pod(west.cluster, "proxied")
    through = west.run_in(str(west.bin / "testapp"), "get", f"http://{ready['status']['podIP']}:15001/", "5")
    assert (through.returncode, through.stdout.strip()) == (0, "proxied-west"), through.stderr
