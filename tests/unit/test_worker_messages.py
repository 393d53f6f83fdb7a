"""The xDS workers' messages and the main process's reading of their reports (isthmus.workers)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from isthmus import metrics
from isthmus.discovery.file import example_mesh_text, parse_mesh
from isthmus.discovery.model import MemberCluster, MeshView
from isthmus.workers.messages import Summary, ViewDelta, WorkerConfig, frame
from isthmus.workers.pool import WorkerPool
from isthmus.xds import types


def variants(seed: int, n: int) -> list[MeshView]:
    """Views one after another, each sharing the Service objects it did not change (as the
    aggregator's do)."""
    rng = random.Random(seed)
    view = parse_mesh(example_mesh_text())
    out = [view]
    for step in range(n):
        services = dict(view.services)
        key = rng.choice(sorted(services))
        action = rng.choice(["move", "drop", "cluster"])
        clusters = list(view.clusters.values())
        if action == "move":
            service = services[key]
            moved = replace(service.endpoints[0], address=f"127.10.9.{step}")
            services[key] = replace(service, endpoints=(moved, *service.endpoints[1:]))
        elif action == "drop" and len(services) > 1:
            del services[key]
        else:
            clusters.append(MemberCluster(f"extra-{step}"))
        view = MeshView.of(services, clusters, view.splits.values())
        out.append(view)
    return out


def test_a_view_travels_as_what_changed_and_is_rebuilt_the_same() -> None:
    views = variants(3, 30)
    held: MeshView | None = None
    for before, after in zip([None, *views], views, strict=False):
        delta = ViewDelta.between(before, after)
        if before is not None:
            assert not delta.full
            assert len(delta.services) <= 1, "only the changed service travels"
            assert (delta.clusters is None) == (before.clusters == after.clusters)
        held = delta.apply(held)
        assert held.version == after.version
        assert dict(held.services) == dict(after.services)
    # A worker that restarts gets the whole view.
    assert ViewDelta.between(None, views[-1]).full
    assert len(frame(ViewDelta.between(views[-2], views[-1]))) < len(
        frame(ViewDelta.between(None, views[-1]))
    )


def test_a_delta_applied_to_the_wrong_view_is_refused() -> None:
    views = variants(5, 3)
    delta = ViewDelta.between(views[1], views[2])
    assert views[0].version != views[1].version
    with pytest.raises(ValueError, match="is not"):
        delta.apply(views[0])


def config(index: int) -> WorkerConfig:
    return WorkerConfig(index, "127.0.0.1", 1, 30.0, 1 << 20, 1.0, 3600.0)


def test_the_pool_counts_a_worker_behind_the_current_view_as_lagging() -> None:
    view = parse_mesh(example_mesh_text())
    pool = WorkerPool()
    pool.configure([config(1), config(2)])
    pool.set_view(view)
    one, two = pool._workers
    # No report yet: both lag as a whole (a drain waits for them).
    assert len(pool.lagging(types.ENDPOINT)) == 2
    one.summary = Summary(1, view.version, 3, {types.ENDPOINT: ("a", "b")}, {("east", "gateway", "delta"): 1})
    two.summary = Summary(2, "older", 2, {}, {("west", "gateway", "sotw"): 1})
    lagging = pool.lagging(types.ENDPOINT)
    assert lagging[:2] == ["a", "b"]
    assert len(lagging) == 3
    assert "worker 2" in lagging[2]
    two.summary = replace(two.summary, view_version=view.version)
    assert pool.lagging(types.ENDPOINT) == ["a", "b"]
    assert pool.lagging(types.CLUSTER) == []
    assert pool.streams() == 5
    # Only running workers count as connected, in /metrics too (beside the main process's).
    assert pool.connected() == {}
    key = ("east", "gateway", "delta")
    before = metrics.CONNECTED_PROXIES.values().get(key, 0)
    one.process = two.process = object()  # type: ignore[assignment]
    assert pool.connected() == {key: 1, ("west", "gateway", "sotw"): 1}
    assert metrics.CONNECTED_PROXIES.values().get(key, 0) == before + 1


def test_a_worker_locates_an_injected_sidecar_by_its_node_as_the_main_process_does() -> None:
    from isthmus.discovery.model import Locality
    from isthmus.workers.messages import Localities
    from isthmus.workers.worker import Worker
    from isthmus.xds.proxy import Proxy, Role

    worker = Worker(config(1))
    injected = Proxy("p", Role.SIDECAR, "shop", "web", "web", Locality("", "", "east"), node_name="node-a")
    assert worker._locate(injected) is injected, "nothing known yet: as it came"
    worker.apply(Localities({("east", "node-a"): ("us-east1", "us-east1-b")}))
    assert worker._locate(injected).locality == Locality("us-east1", "us-east1-b", "east")
    other = replace(injected, locality=Locality("", "", "west"))
    assert worker._locate(other) is other, "a node of another cluster is not this one"
    placed = replace(injected, locality=Locality("r", "z", "east"))
    assert worker._locate(placed) is placed, "a bootstrap's own locality wins"


def test_a_delta_is_framed_once_for_every_worker_that_holds_the_same_view() -> None:
    views = variants(7, 2)
    pool = WorkerPool()
    first = pool._delta(views[0], views[1])
    assert pool._delta(views[0], views[1]) is first, "the second worker gets the same bytes"
    assert pool._delta(None, views[1]) is not first, "a restarted worker gets the whole view"
    assert pool._delta(views[1], views[2]) is not first
