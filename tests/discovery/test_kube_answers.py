"""How discovery takes what a healthy API server answers when it is not a plain success, on fake API
servers that answer as a real kube-apiserver does (tests/realkube checks the same against real ones):

* 429 TooManyRequests with Retry-After ("storage is (re)initializing", for a CRD just installed and
  for every kind right after a restart) is a wait, not an outage: the cluster stays synced and the
  kind is retried after Retry-After, not after a doubling backoff.
* 403 Forbidden for an optional kind (ServiceExport, TrafficSplit) that the cluster's role does not
  grant turns that feature off for that cluster, reported once per kind, and nothing else.
* After a restart the cluster is synced again within about a second of the server being back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_kube_members import Graph, addresses, endpoint_slice, service

from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.kube.members import Members
from isthmus.discovery.kube.reflector import Timing
from isthmus.discovery.model import ClusterState, MeshView
from kubeapi.kubeconfig import write_kubeconfig
from kubeapi.server import FakeKubeApi


# A production-like backoff (a retry doubles from seconds), so a test passes only if the server's
# own word (Retry-After, or its being back) is what ends a wait.
def backoff(initial: float, most: float, request_timeout: float = 2.0) -> Timing:
    return Timing(
        watch_timeout=30,
        idle_timeout=10.0,
        request_timeout=request_timeout,
        backoff_initial=initial,
        backoff_max=most,
    )


SLOW_BACKOFF = backoff(8.0, 30.0)


def synced(view: MeshView) -> bool:
    member = view.clusters.get("a")
    return member is not None and member.state is ClusterState.SYNCED


class States:
    """Every state cluster ``name`` had in the views published."""

    def __init__(self, graph: Graph, name: str) -> None:
        self.seen: list[ClusterState] = []
        inner = graph.on_view

        def on_view(view: MeshView) -> None:
            member = view.clusters.get(name)
            if member is not None and (not self.seen or self.seen[-1] is not member.state):
                self.seen.append(member.state)
            inner(view)

        graph.on_view = on_view  # type: ignore[method-assign]


@pytest.fixture
async def one_cluster(tmp_path: Path) -> AsyncIterator[tuple[FakeKubeApi, Graph, Aggregator, Path]]:
    api = FakeKubeApi(bookmark_interval=0.5)
    await api.start()
    api.create(service())
    api.create(endpoint_slice("web-a", ["127.0.1.1"]))
    graph = Graph()
    aggregator = Aggregator(lambda view: graph.on_view(view), quiet=0.02, max_delay=0.2)
    task = asyncio.create_task(aggregator.run())
    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    write_kubeconfig(directory / "a.yaml", api.url, api.token, "a")
    yield api, graph, aggregator, directory
    task.cancel()
    await api.stop()


async def test_429_is_a_wait_honoring_retry_after_not_an_outage(
    one_cluster: tuple[FakeKubeApi, Graph, Aggregator, Path],
) -> None:
    api, graph, aggregator, directory = one_cluster
    states = States(graph, "a")
    members = Members(aggregator, directory=directory, timing=SLOW_BACKOFF, poll_interval=0.1)
    task = asyncio.create_task(members.run())
    try:
        await graph.until(lambda v: addresses(v) == {("a", "127.0.1.1")})
        await graph.until(lambda v: v.clusters["a"].state is ClusterState.SYNCED)
        # The server restarts its storage: every request gets 429 with Retry-After: 1 for 2 s, and
        # every watch has to be made again.
        api.throttle("*", seconds=2.0, retry_after=1)
        throttled_at = time.monotonic()
        before = len(api.requests)
        api.drop_watches(abrupt=False)  # as each watch's timeout would
        api.update(endpoint_slice("web-a", ["127.0.1.9"]))
        await graph.until(lambda v: addresses(v) == {("a", "127.0.1.9")}, timeout=10)
        took = time.monotonic() - throttled_at
        assert ClusterState.UNREACHABLE not in states.seen, states.seen
        assert members.status()["a"]["state"] == "synced"
        # Retry-After was honored (no retry storm) and was what ended the wait (not the 4-8 s backoff).
        retries = [r for r in api.requests[before:] if r.query.get("watch")]
        per_kind = len(retries) / 7
        assert per_kind <= 5, f"{len(retries)} watch attempts for 7 kinds in {took:.1f}s"
        assert took < 4.0, f"the change arrived {took:.1f}s after the 2 s of 429s"
    finally:
        task.cancel()


async def test_a_crd_that_answers_429_after_install_keeps_the_cluster_synced(
    one_cluster: tuple[FakeKubeApi, Graph, Aggregator, Path],
) -> None:
    api, graph, aggregator, directory = one_cluster
    states = States(graph, "a")
    timing = backoff(0.2, 0.5)
    members = Members(aggregator, directory=directory, timing=timing, poll_interval=0.1)
    task = asyncio.create_task(members.run())
    try:
        await graph.until(synced)
        api.set_installed("trafficsplits", True)
        api.throttle("trafficsplits", seconds=1.5, retry_after=1)
        api.create(
            {
                "apiVersion": "split.smi-spec.io/v1alpha2",
                "kind": "TrafficSplit",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"service": "web", "backends": [{"service": "web", "weight": 100}]},
            }
        )
        await graph.until(lambda v: bool(v.splits), timeout=10)
        assert ClusterState.UNREACHABLE not in states.seen, states.seen
    finally:
        task.cancel()


async def test_forbidden_optional_kinds_turn_off_that_feature_only(
    one_cluster: tuple[FakeKubeApi, Graph, Aggregator, Path], caplog: pytest.LogCaptureFixture
) -> None:
    api, graph, aggregator, directory = one_cluster
    api.set_installed("trafficsplits", True)
    api.forbid("trafficsplits")
    api.forbid("serviceexports")
    states = States(graph, "a")
    timing = backoff(0.05, 0.2)
    members = Members(aggregator, directory=directory, timing=timing, poll_interval=0.1)
    caplog.set_level(logging.INFO, logger="isthmus.discovery.kube")
    task = asyncio.create_task(members.run())
    try:
        await graph.until(lambda v: addresses(v) == {("a", "127.0.1.1")})
        await graph.until(lambda v: v.clusters["a"].state is ClusterState.SYNCED)
        await asyncio.sleep(1.0)  # several retries of the forbidden kinds (backoff at most 0.2 s)
        status = members.status()["a"]
        assert status["state"] == "synced", status
        degraded = status["degraded"]
        assert set(degraded) == {"trafficsplits", "serviceexports"}, status  # type: ignore[arg-type]
        why = str(degraded["trafficsplits"])  # type: ignore[index]
        assert "403" in why
        assert "get, list, watch" in why
        assert ClusterState.UNREACHABLE not in states.seen, states.seen
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        splits = [w for w in warnings if "TrafficSplit" in w]
        assert len(splits) == 1, warnings  # reported once, not at every retry
        # The permission is granted: the feature comes back for this cluster.
        api.create(
            {
                "apiVersion": "split.smi-spec.io/v1alpha2",
                "kind": "TrafficSplit",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"service": "web", "backends": [{"service": "web", "weight": 100}]},
            }
        )
        api.allow("trafficsplits")
        await graph.until(lambda v: bool(v.splits), timeout=10)
        assert set(members.status()["a"].get("degraded", {})) == {"serviceexports"}  # type: ignore[arg-type]
    finally:
        task.cancel()


async def test_synced_again_within_about_a_second_of_a_restart(
    one_cluster: tuple[FakeKubeApi, Graph, Aggregator, Path],
) -> None:
    api, graph, aggregator, directory = one_cluster
    timing = backoff(0.5, 30.0, request_timeout=1.0)
    members = Members(aggregator, directory=directory, timing=timing, poll_interval=0.1)
    task = asyncio.create_task(members.run())
    try:
        await graph.until(synced)
        await api.stop()
        await graph.until(lambda v: v.clusters["a"].state is ClusterState.UNREACHABLE)
        api.update(endpoint_slice("web-a", ["127.0.1.7"]))  # written while the server is down
        await asyncio.sleep(6.0)  # the reflectors' backoff has grown to 4-8 s
        await api.start()
        api.throttle("*", seconds=0.5, retry_after=1)  # storage re-initializing, as a real server
        back = time.monotonic()
        await graph.until(
            lambda v: v.clusters["a"].state is ClusterState.SYNCED and addresses(v) == {("a", "127.0.1.7")},
            timeout=15,
        )
        took = time.monotonic() - back
        assert took < 3.0, f"synced {took:.1f}s after the server was back"
    finally:
        task.cancel()
