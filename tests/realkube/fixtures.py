"""Fixtures of the real-Kubernetes tier (tests/conftest.py makes them visible to every tier).

* ``real_clusters``: three member clusters (a, b, c) started once per test session and shared; tests
  keep to their own namespaces (``namespace`` gives each test a fresh one in every cluster).
* ``real_cluster_factory``: dedicated clusters for tests that break them (outages, compaction);
  stopped at the end of the test.
* ``reader_kubeconfigs``: for each shared cluster, a kubeconfig holding a TokenRequest token of the
  least-privilege ServiceAccount of deploy/member-cluster/rbac.yaml.

Every process is stopped in order when the fixture ends, also when the test fails or the run is
interrupted; a failure report gets the tail of each component's log.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from datapath.netns import Topology
from realkube.binaries import ROOT, kube_bin
from realkube.cluster import RealCluster
from realkube.node import Node

RBAC = ROOT / "deploy" / "member-cluster" / "rbac.yaml"
READER_NAMESPACE, READER = "isthmus-system", "isthmus-reader"
_namespaces = itertools.count(1)


def start_all(clusters: list[RealCluster]) -> None:
    """Start several clusters at once (their API servers start in parallel); stop all on failure."""
    errors: list[BaseException] = []

    def etcd_and_apiserver(cluster: RealCluster) -> None:
        try:
            cluster.wait_ready_blocking()
        except BaseException as exc:
            errors.append(exc)

    try:
        for cluster in clusters:  # spawned from this (the main) thread: see cluster.Process
            cluster.etcd.start()
            cluster.start_apiserver()
        waiters = [threading.Thread(target=etcd_and_apiserver, args=(c,)) for c in clusters]
        for waiter in waiters:
            waiter.start()
        for waiter in waiters:
            waiter.join()
        if errors:
            raise errors[0]
        for cluster in clusters:
            cluster.controller_manager.start()
    except BaseException:
        for cluster in clusters:
            cluster.stop()
        raise


def rbac_objects() -> list[dict[str, object]]:
    return [doc for doc in yaml.safe_load_all(RBAC.read_text()) if doc]


@pytest.fixture(scope="session")
def real_clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RealCluster]]:
    binaries = kube_bin("control")
    base = tmp_path_factory.mktemp("realkube")
    clusters = {name: RealCluster(name, base / name, binaries) for name in ("a", "b", "c")}
    start_all(list(clusters.values()))
    try:
        yield clusters
    finally:
        for cluster in clusters.values():
            cluster.stop()


@pytest.fixture
def _dedicated_clusters() -> Iterator[list[RealCluster]]:
    started: list[RealCluster] = []
    try:
        yield started
    finally:
        for cluster in started:
            cluster.stop()


@pytest.fixture
def real_cluster_factory(
    tmp_path: Path, _dedicated_clusters: list[RealCluster]
) -> Callable[..., list[RealCluster]]:
    """``make("d")`` or ``make("east", "west")``: clusters of this test only, started in parallel."""

    def make(*names: str, **kwargs: Any) -> list[RealCluster]:
        clusters = [RealCluster(n, tmp_path / f"cluster-{n}", kube_bin("control"), **kwargs) for n in names]
        _dedicated_clusters.extend(clusters)
        start_all(clusters)
        return clusters

    return make


@pytest.fixture
async def namespace(real_clusters: dict[str, RealCluster]) -> AsyncIterator[str]:
    """A namespace of its own for this test, in every shared cluster; deleted afterwards."""
    name = f"t{next(_namespaces)}"
    for cluster in real_clusters.values():
        await cluster.admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    for cluster in real_clusters.values():
        await cluster.admin.delete("Namespace", None, name)


async def install_reader(cluster: RealCluster) -> None:
    await cluster.admin.apply_all(rbac_objects())


async def reader_kubeconfig(cluster: RealCluster, path: Path, seconds: int = 3600) -> Path:
    """A kubeconfig with a TokenRequest token of the least-privilege reader ServiceAccount."""
    await install_reader(cluster)
    token = await cluster.admin.service_account_token(READER_NAMESPACE, READER, cluster.audience, seconds)
    return cluster.kubeconfig(path, token)


def log_sections(item: pytest.Item) -> list[tuple[str, str]]:
    """The tails of the real clusters' logs, for the failure report of a test that used them."""
    funcargs = getattr(item, "funcargs", {})
    clusters: list[RealCluster] = list((funcargs.get("real_clusters") or {}).values())
    clusters += funcargs.get("_dedicated_clusters") or []
    return [(f"real cluster {c.name}", c.logs()) for c in clusters]


@contextlib.contextmanager
def clusters_with_nodes(
    names: tuple[str, ...],
    base: Path,
    binaries: Path,
    prepare: Callable[[Node], None] = lambda node: None,
    kube_binaries: Mapping[str, Path] | None = None,
    apiserver_args: Sequence[str] = (),
) -> Iterator[tuple[Topology, dict[str, Node]]]:
    """Real clusters ``names`` (in ``base``), each with a scheduler and a real node in its own
    namespace of a data-path Topology, joined only by its transit bridge; ``prepare`` runs on each
    started node (images to import, ...). ``kube_binaries``: a cluster's own directory of the API
    server, controller manager, scheduler, kubelet and kube-proxy (e.g. the previous version's;
    etcd and the images' testapp still come from ``binaries``); ``apiserver_args``: more flags for
    every kube-apiserver. Everything is removed afterwards, each step even when one before it fails
    (the first failure is raised at the end), and the nodes' logs are printed."""
    own = kube_binaries or {}
    clusters = [
        RealCluster(
            name, base / name, binaries, kube_binaries=own.get(name), extra_apiserver_args=apiserver_args
        )
        for name in names
    ]
    topology = Topology(list(names), mode="netns").create()
    made: dict[str, Node] = {}
    try:
        start_all(clusters)
        for cluster in clusters:
            net = topology[cluster.name]
            cluster.start_scheduler()
            made[cluster.name] = Node(
                cluster,
                net.index,
                binaries,
                netns=net.netns,
                address=net.transit_address,
                kube_binaries=own.get(cluster.name),
            )
            made[cluster.name].start()
            prepare(made[cluster.name])
        yield topology, made
    finally:
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(topology.close)
            for cluster in clusters:
                cleanup.callback(cluster.stop)
            for node in made.values():
                print(f"--- node {node.name}\n{node.logs()}")
                cleanup.callback(node.stop)
