"""Kubernetes discovery against fake API servers: several member clusters into one graph, live
membership, 410 relists, outages that keep the last known endpoints, refused kubeconfigs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.kube.cluster import ClusterPolicy
from isthmus.discovery.kube.members import Members
from isthmus.discovery.kube.reflector import Timing
from isthmus.discovery.model import ClusterState, Gateway, MeshView, ServiceKey
from kubeapi.kubeconfig import write_kubeconfig
from kubeapi.server import FakeKubeApi

WEB = ServiceKey("shop", "web")
FAST = Timing(watch_timeout=5, idle_timeout=3.0, request_timeout=2.0, backoff_initial=0.05, backoff_max=0.5)


def service(name: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }


def endpoint_slice(name: str, addresses: Iterable[str], svc: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in sorted(addresses)],
    }


class Graph:
    """Collects MeshViews and waits for a condition on the latest one."""

    def __init__(self) -> None:
        self.view = MeshView.build((), ())
        self.changed = asyncio.Event()

    def on_view(self, view: MeshView) -> None:
        self.view = view
        self.changed.set()

    async def until(self, check: Callable[[MeshView], bool], timeout: float = 15.0) -> MeshView:
        async def wait() -> MeshView:
            while not check(self.view):
                self.changed.clear()
                await self.changed.wait()
            return self.view

        try:
            return await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"graph never satisfied the check; last view: {self.view}") from None


def addresses(view: MeshView, key: ServiceKey = WEB) -> set[tuple[str, str]]:
    service = view.services.get(key)
    return {(e.locality.cluster, e.address) for e in service.endpoints} if service else set()


def seed(api: FakeKubeApi, directory: Path, name: str, *addresses: str) -> None:
    """Give cluster ``name`` the web service with one slice, and a kubeconfig in ``directory``."""
    api.create(service())
    api.create(endpoint_slice(f"web-{name}", list(addresses)))
    write_kubeconfig(directory / f"{name}.yaml", api.url, api.token, name)


@pytest.fixture
async def clusters(tmp_path: Path) -> AsyncIterator[dict[str, FakeKubeApi]]:
    apis = {name: FakeKubeApi(bookmark_interval=0.5) for name in ("a", "b", "c")}
    for api in apis.values():
        await api.start()
    yield apis
    for api in apis.values():
        await api.stop()


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[tuple[Graph, Aggregator, Path]]:
    graph = Graph()
    aggregator = Aggregator(graph.on_view, quiet=0.02, max_delay=0.2)
    task = asyncio.create_task(aggregator.run())
    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    yield graph, aggregator, directory
    task.cancel()


async def run_members(members: Members) -> asyncio.Task[None]:
    return asyncio.create_task(members.run())


async def test_three_clusters_one_graph_and_live_membership(
    clusters: dict[str, FakeKubeApi], mesh: tuple[Graph, Aggregator, Path]
) -> None:
    graph, aggregator, directory = mesh
    for i, (name, api) in enumerate(clusters.items()):
        seed(api, directory, name, f"127.0.{i + 1}.1", f"127.0.{i + 1}.2")
    members = Members(
        aggregator,
        directory=directory,
        timing=FAST,
        poll_interval=0.1,
        policy=lambda n: ClusterPolicy(region=f"r-{n}"),
    )
    task = await run_members(members)
    try:
        view = await graph.until(lambda v: len(addresses(v)) == 6)
        assert {c for c, _ in addresses(view)} == {"a", "b", "c"}
        assert all(view.clusters[n].state is ClusterState.SYNCED for n in "abc")
        # A watch event in one cluster changes only that cluster's endpoints.
        clusters["b"].update(endpoint_slice("web-b", ["127.0.2.9"]))
        view = await graph.until(lambda v: ("b", "127.0.2.9") in addresses(v))
        assert ("b", "127.0.2.1") not in addresses(view)
        assert len(addresses(view)) == 5
        # Remove a cluster live: its endpoints go; add it back: they return.
        (directory / "c.yaml").unlink()
        await graph.until(lambda v: "c" not in v.clusters and len(addresses(v)) == 3)
        assert members.status()["c"]["state"] == "removed"
        write_kubeconfig(directory / "c.yaml", clusters["c"].url, clusters["c"].token, "c")
        await graph.until(lambda v: len(addresses(v)) == 5)
    finally:
        task.cancel()


async def test_410_during_outage_relists_and_applies_deletions(
    clusters: dict[str, FakeKubeApi], mesh: tuple[Graph, Aggregator, Path]
) -> None:
    graph, aggregator, directory = mesh
    api = clusters["a"]
    api.create(service())
    api.create(endpoint_slice("web-1", ["127.0.1.1"]))
    api.create(endpoint_slice("web-2", ["127.0.1.2"]))
    write_kubeconfig(directory / "a.yaml", api.url, api.token, "a")
    task = await run_members(Members(aggregator, directory=directory, timing=FAST, poll_interval=0.1))
    try:
        await graph.until(lambda v: len(addresses(v)) == 2)
        await api.stop()
        view = await graph.until(lambda v: v.clusters["a"].state is ClusterState.UNREACHABLE)
        assert len(addresses(view)) == 2, "an unreachable API server keeps its last known endpoints"
        api.delete("endpointslices", "shop", "web-2")  # happens while we cannot watch
        api.create(endpoint_slice("web-3", ["127.0.1.3"]))
        await api.start()  # history dropped on restart: resuming gets 410, the watcher must relist
        view = await graph.until(
            lambda v: (
                addresses(v) == {("a", "127.0.1.1"), ("a", "127.0.1.3")}
                and v.clusters["a"].state is ClusterState.SYNCED
            )
        )
    finally:
        task.cancel()


async def test_unreachable_cluster_does_not_block_others_and_exec_is_refused(
    clusters: dict[str, FakeKubeApi], mesh: tuple[Graph, Aggregator, Path]
) -> None:
    graph, aggregator, directory = mesh
    good = clusters["a"]
    seed(good, directory, "a", "127.0.1.1")
    down = clusters["b"]
    await down.stop()
    write_kubeconfig(directory / "b.yaml", down.url, down.token, "b")
    write_kubeconfig(directory / "x.yaml", good.url, good.token, "x", exec_plugin=True)
    members = Members(aggregator, directory=directory, timing=FAST, poll_interval=0.1)
    task = await run_members(members)
    try:
        await graph.until(lambda v: addresses(v) == {("a", "127.0.1.1")})
        assert "exec plugin" in members.status()["x"]["detail"]
        assert members.status()["x"]["state"] == "refused"
        assert "x" not in members.members
        await graph.until(lambda v: "b" in v.clusters and v.clusters["b"].state is ClusterState.UNREACHABLE)
        since = str(members.status()["b"]["unreachable_since"])
        assert since.endswith("+00:00"), since  # when, in UTC, for operators
        # b comes up later and joins.
        down.create(service())
        down.create(endpoint_slice("web-b", ["127.0.2.1"]))
        await down.start()
        await graph.until(lambda v: ("b", "127.0.2.1") in addresses(v))
    finally:
        task.cancel()


async def test_credentials_rotate_without_a_gap(
    clusters: dict[str, FakeKubeApi], mesh: tuple[Graph, Aggregator, Path]
) -> None:
    graph, aggregator, directory = mesh
    api = clusters["a"]
    seed(api, directory, "a", "127.0.1.1")
    members = Members(aggregator, directory=directory, timing=FAST, poll_interval=0.1)
    task = await run_members(members)
    seen: list[int] = []
    original = graph.on_view

    def record(view: MeshView) -> None:
        seen.append(len(addresses(view)))
        original(view)

    aggregator.on_view = record
    try:
        await graph.until(lambda v: len(addresses(v)) == 1)
        assert seen[-1] == 1
        del seen[:-1]  # from the first synced view on: the rotation must not lose the endpoint
        api.add_token("rotated")
        old = members.members["a"].watcher
        write_kubeconfig(directory / "a.yaml", api.url, "rotated", "a")

        async def switched() -> None:
            while members.members["a"].watcher is old:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(switched(), 15)
        api.rotate_token("rotated")  # the old token is now invalid
        api.create(endpoint_slice("web-a2", ["127.0.1.2"]))
        await graph.until(lambda v: len(addresses(v)) == 2)
        assert 0 not in seen, "the cluster's endpoints never vanished during the rotation"
    finally:
        task.cancel()


async def test_staleness_policy_demotes_then_withdraws(
    clusters: dict[str, FakeKubeApi], mesh: tuple[Graph, Aggregator, Path]
) -> None:
    graph, aggregator, directory = mesh
    api = clusters["a"]
    seed(api, directory, "a", "127.0.1.1")
    policy = ClusterPolicy(demote_after=1.0, withdraw_after=2.5)
    task = await run_members(
        Members(aggregator, directory=directory, timing=FAST, poll_interval=0.1, policy=lambda n: policy)
    )
    try:
        await graph.until(lambda v: len(addresses(v)) == 1)
        api.hang(True)
        api.drop_watches()
        view = await graph.until(lambda v: v.clusters["a"].state is ClusterState.STALE)
        assert len(addresses(view)) == 1, "demoted, not withdrawn yet"
        await graph.until(lambda v: not addresses(v))
        api.hang(False)
        await graph.until(lambda v: len(addresses(v)) == 1 and v.clusters["a"].state is ClusterState.SYNCED)
    finally:
        task.cancel()


async def test_gateways_and_sidecars_are_discovered(
    clusters: dict[str, FakeKubeApi], mesh: tuple[Graph, Aggregator, Path]
) -> None:
    """a's gateway comes from its labelled LoadBalancer Service (which is not a mesh service); b's
    from the configured address, which wins; pods annotated with a sidecar port carry it."""
    graph, aggregator, directory = mesh
    a, b = clusters["a"], clusters["b"]
    seed(a, directory, "a", "127.0.1.1")
    seed(b, directory, "b", "127.0.2.1")
    a.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    for api in (a, b):
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
            }
        )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web-1",
            "namespace": "shop",
            "annotations": {"isthmus.io/inbound-port": "15006"},
        },
        "spec": {"serviceAccountName": "web"},
    }
    a.create(pod)
    ref = endpoint_slice("web-a", ["127.0.1.1"])
    ref["endpoints"][0]["targetRef"] = {"kind": "Pod", "namespace": "shop", "name": "web-1"}
    a.update(ref)
    policy = {"b": ClusterPolicy(gateway=Gateway("198.51.100.2", 443))}
    members = Members(
        aggregator,
        directory=directory,
        timing=FAST,
        poll_interval=0.1,
        policy=lambda n: policy.get(n, ClusterPolicy()),
    )
    task = await run_members(members)
    try:
        view = await graph.until(lambda v: len(addresses(v)) == 2 and "b" in v.clusters)
        assert view.clusters["a"].gateway is None, "no LoadBalancer address yet"
        assert view.clusters["b"].gateway == Gateway("198.51.100.2", 443)
        assert ServiceKey("shop", "eastwest") not in view.services
        [web_a] = [e for e in view.services[WEB].endpoints if e.locality.cluster == "a"]
        assert (web_a.sidecar_port, web_a.service_account) == (15006, "web")
        # The cloud assigns the LoadBalancer address: a's gateway appears.
        service_a = a.get("services", "shop", "eastwest")
        assert service_a is not None
        a.update({**service_a, "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}})
        await graph.until(lambda v: v.clusters["a"].gateway == Gateway("198.51.100.1", 15443))
        # Its readiness, what every replica reads alike: unknown without EndpointSlices, then its
        # pods' ready condition; b's configured gateway has none.
        assert view.clusters["a"].gateway_ready is None
        gateway_slice = endpoint_slice("eastwest-x", ["127.0.1.9"], svc="eastwest")
        a.create(gateway_slice)
        view = await graph.until(lambda v: v.clusters["a"].gateway_ready is True)
        assert view.clusters["a"].gateway_down is False
        stored = a.get("endpointslices", "shop", "eastwest-x")
        assert stored is not None
        stored["endpoints"][0]["conditions"] = {"ready": False}
        a.update(stored)
        view = await graph.until(lambda v: v.clusters["a"].gateway_ready is False)
        assert view.clusters["a"].gateway_down is True
        assert view.clusters["b"].gateway_ready is None
    finally:
        task.cancel()


async def test_traffic_splits_come_from_the_smi_crd_when_installed(
    clusters: dict[str, FakeKubeApi], mesh: tuple[Graph, Aggregator, Path]
) -> None:
    graph, aggregator, directory = mesh
    a = clusters["a"]
    seed(a, directory, "a", "127.0.1.1")
    task = await run_members(Members(aggregator, directory=directory, timing=FAST, poll_interval=0.1))
    try:
        # Without the CRD the cluster still syncs (no splits).
        await graph.until(lambda v: len(addresses(v)) == 1 and v.clusters["a"].state is ClusterState.SYNCED)
        a.set_installed("trafficsplits", True)
        a.create(
            {
                "apiVersion": "split.smi-spec.io/v1alpha2",
                "kind": "TrafficSplit",
                "metadata": {"name": "web-split", "namespace": "shop"},
                "spec": {
                    "service": "web",
                    "backends": [{"service": "web-v1", "weight": 90}, {"service": "web-v2", "weight": 10}],
                },
            }
        )
        view = await graph.until(lambda v: WEB in v.splits)
        assert view.splits[WEB].backends == (("web-v1", 90), ("web-v2", 10))
        a.delete("trafficsplits", "shop", "web-split")
        await graph.until(lambda v: WEB not in v.splits)
    finally:
        task.cancel()
