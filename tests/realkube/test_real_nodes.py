"""Real nodes running real pods: two member clusters side by side, each with one node (containerd,
kubelet, kube-proxy, a CNI bridge) in its own network namespace (realkube.node), images imported
from tarballs the tests write.

* A Deployment applied through the API server runs: its pod gets an address, passes its readiness
  probe and serves a request; a second pod reaches it by its Service's ClusterIP (kube-proxy).
* The clusters are isolated: a pod address of one is unreachable from the other's namespace.
* isthmus discovers the real thing: the EndpointSlice the controller manager wrote for the pod, the
  pod's service account and its node's locality, read with the least-privilege role.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.kube.members import Members
from isthmus.discovery.kube.reflector import Timing
from isthmus.discovery.model import MeshView, ServiceKey
from realkube.binaries import kube_bin
from realkube.cluster import RealCluster
from realkube.fixtures import reader_kubeconfig, start_all
from realkube.node import APP_IMAGE, Node, available

pytestmark = [pytest.mark.realkube, pytest.mark.skipif(available() is not None, reason=str(available()))]

T = TypeVar("T")


async def until(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    binaries = kube_bin("all")
    base = tmp_path_factory.mktemp("realnodes")
    clusters = [RealCluster(name, base / name, binaries) for name in ("east", "west")]
    start_all(clusters)
    made: dict[str, Node] = {}
    try:
        for n, cluster in enumerate(clusters, start=1):
            cluster.start_scheduler()
            made[cluster.name] = Node(cluster, n, binaries)
            made[cluster.name].start()
        yield made
    finally:
        for node in made.values():
            node.stop()
        for cluster in clusters:
            cluster.stop()


def deployment(name: str, answer: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, **(labels or {})}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 1,
                    "containers": [
                        {
                            "name": "app",
                            "image": APP_IMAGE,
                            "imagePullPolicy": "Never",
                            "args": ["serve", answer],
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
                        }
                    ],
                },
            },
        },
    }


def service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }


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
    assert address.startswith("10.1.1."), address  # east's pod range, on its CNI bridge
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


async def test_clusters_side_by_side_cannot_reach_each_others_pods(nodes: dict[str, Node]) -> None:
    east, west = nodes["east"], nodes["west"]
    for node in (east, west):
        await node_ready(node)
    await west.cluster.admin.apply(deployment("web", "web-west"))
    pod = await ready_pod(west.cluster, "web")
    address = pod["status"]["podIP"]
    assert address.startswith("10.2.1."), address
    mine = west.run_in(str(west.bin / "testapp"), "get", f"http://{address}:8080/")
    assert (mine.returncode, mine.stdout.strip()) == (0, "web-west"), mine.stderr
    other = east.run_in(str(east.bin / "testapp"), "get", f"http://{address}:8080/")
    assert other.returncode != 0, other.stdout
    assert "unreachable" in other.stderr, other.stderr


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
