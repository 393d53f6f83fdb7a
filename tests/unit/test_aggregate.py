"""The aggregate: shards per (source, cluster), namespace sameness, debouncing into MeshViews, and the
incremental merge (equal to merge() after random sequences of changes)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest

from isthmus.discovery import clusterset
from isthmus.discovery.aggregate import Aggregator, Shard, merge
from isthmus.discovery.model import (
    ClusterState,
    Endpoint,
    Health,
    Locality,
    MemberCluster,
    MeshView,
    Protocol,
    ServiceKey,
    ServicePort,
)

WEB = ServiceKey("shop", "web")
HTTP = (ServicePort("http", 80, 8080),)


def shard(cluster: str, *addresses: str, ports: tuple[ServicePort, ...] = HTTP) -> Shard:
    member = MemberCluster(cluster, region="r", zone="z")
    eps = tuple(Endpoint(a, Locality("r", "z", cluster)) for a in addresses)
    return Shard(member, {WEB: ports}, {WEB: eps})


def test_same_namespace_and_name_is_one_service() -> None:
    view = merge([shard("b", "127.0.2.1"), shard("a", "127.0.1.1", "127.0.1.2")])
    web = view.services[WEB]
    assert sorted(e.address for e in web.endpoints) == ["127.0.1.1", "127.0.1.2", "127.0.2.1"]
    assert web.clusters == {"a", "b"}
    assert sorted(view.clusters) == ["a", "b"]


def test_conflicting_ports_first_cluster_wins() -> None:
    other = (ServicePort("http", 8080, 8080),)
    view = merge([shard("b", "127.0.2.1", ports=other), shard("a", "127.0.1.1")])
    assert view.services[WEB].ports == HTTP


def test_replacing_a_shard_touches_only_that_cluster() -> None:
    views: list[MeshView] = []
    agg = Aggregator(views.append)
    agg.set_shard("kube", shard("a", "127.0.1.1"))
    agg.set_shard("kube", shard("b", "127.0.2.1"))
    agg.flush()
    agg.set_shard("kube", shard("a", "127.0.1.9"))
    agg.flush()
    addresses = sorted(e.address for e in views[-1].services[WEB].endpoints)
    assert addresses == ["127.0.1.9", "127.0.2.1"]
    agg.remove_shard("kube", "b")
    agg.flush()
    assert [e.address for e in views[-1].services[WEB].endpoints] == ["127.0.1.9"]
    assert "b" not in views[-1].clusters


def test_no_effective_change_no_new_view() -> None:
    views: list[MeshView] = []
    agg = Aggregator(views.append)
    agg.set_shard("kube", shard("a", "127.0.1.1"))
    agg.flush()
    agg.set_shard("kube", shard("a", "127.0.1.1"))  # same content
    agg.flush()
    assert len(views) == 1
    assert agg.flushes == 2


async def test_debounce_coalesces_a_burst() -> None:
    views: list[MeshView] = []
    agg = Aggregator(views.append, quiet=0.05, max_delay=5.0)
    task = asyncio.create_task(agg.run())
    try:
        for i in range(20):
            agg.set_shard("kube", shard("a", f"127.0.1.{i + 1}"))
        while not views:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
    finally:
        task.cancel()
    assert len(views) == 1, "a burst of changes within the quiet period is one view"
    assert [e.address for e in views[0].services[WEB].endpoints] == ["127.0.1.20"]


async def test_max_delay_bounds_a_steady_stream_of_changes() -> None:
    views: list[MeshView] = []
    agg = Aggregator(views.append, quiet=0.2, max_delay=0.3)
    task = asyncio.create_task(agg.run())
    try:
        for i in range(40):  # a change every 25 ms never leaves a 200 ms quiet period
            agg.set_shard("kube", shard("a", f"127.0.1.{i + 1}"))
            await asyncio.sleep(0.025)
    finally:
        task.cancel()
    assert len(views) >= 2, "max_delay forces views out while changes keep coming"


def test_error_text_alone_makes_no_new_version() -> None:
    base = MemberCluster("b", state=ClusterState.UNREACHABLE, detail="pods: 500 Internal Server Error")
    other = replace(base, detail="nodes: ClientConnectorError connection refused")
    assert MeshView.build((), [base]).version == MeshView.build((), [other]).version
    assert (
        MeshView.build((), [base]).version
        != MeshView.build((), [replace(base, state=ClusterState.STALE)]).version
    )


# ---- incremental merge == merge() ----------------------------------------------------------------

KEYS = [ServiceKey(ns, name) for ns in ("shop", "bank") for name in ("web", "api", "db")]
PORTS = [HTTP, (ServicePort("http", 8080, 8080),), (ServicePort("grpc", 9090, 9090, Protocol.GRPC),)]


def random_shard(rng: random.Random, cluster: str, previous: Shard | None) -> Shard:
    """A shard of ``cluster``: mostly the previous one with a few services changed (tuples reused)."""
    member = MemberCluster(cluster, region=rng.choice(["r1", "r2"]), state=rng.choice(list(ClusterState)))
    services = dict(previous.services) if previous else {}
    endpoints = dict(previous.endpoints) if previous else {}
    ips = dict(previous.addresses) if previous else {}
    since = dict(previous.exported_at) if previous else {}
    for key in rng.sample(KEYS, rng.randint(0, 3)):
        services.pop(key, None)
        endpoints.pop(key, None)
        ips.pop(key, None)
        since.pop(key, None)
        if rng.random() < 0.8:
            services[key] = rng.choice(PORTS)
            ips[key] = rng.choice([(), ("10.96.0.1",), ("10.96.0.2", "fd00::2")])
            if rng.random() < 0.7:
                since[key] = rng.choice(["2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"])
        if rng.random() < 0.8:
            addresses = rng.sample(range(1, 6), rng.randint(0, 3))
            health = rng.choice(list(Health))
            endpoints[key] = tuple(
                Endpoint(f"10.0.0.{a}", Locality("r", "z", cluster), health=health) for a in addresses
            )
    return Shard(member, services, endpoints, addresses=ips, exported_at=since)


def view_differences(view: MeshView, reference: MeshView) -> list[str]:
    """What differs between an incrementally merged view and the reference merge (nothing: [])."""
    problems = []
    if list(view.services.items()) != list(reference.services.items()):
        problems.append("services differ")
    if list(view.clusters.items()) != list(reference.clusters.items()):
        problems.append("clusters differ")
    if view.version != reference.version:
        problems.append(f"version {view.version} != {reference.version}")
    problems += [
        f"{s.key}: endpoints unsorted"
        for s in view.services.values()
        if list(s.endpoints) != sorted(s.endpoints)
    ]
    return problems


@pytest.mark.parametrize("seed", range(20))
def test_incremental_merge_equals_merge(seed: int) -> None:
    """Clusterset ranges with room, with exactly room for the six keys (probing), and too small."""
    rng = random.Random(seed)
    where = clusterset.network(["240.240.0.0/16", "10.0.0.0/29", "10.0.0.0/30"][seed % 3])
    agg = Aggregator(lambda view: None, clusterset_range=where)
    for _ in range(200):
        source, cluster = rng.choice(["kube", "file"]), rng.choice(["a", "b", "c", ""])
        op = rng.random()
        if op < 0.5:
            agg.set_shard(source, random_shard(rng, cluster, agg.shards.get((source, cluster))))
        elif op < 0.65:
            state = rng.choice(list(ClusterState))
            agg.update_cluster(source, MemberCluster(cluster, state=state, detail=str(rng.random())))
        elif op < 0.75:
            agg.remove_shard(source, cluster)
        elif op < 0.85:
            clusters = rng.sample(["a", "b", "c"], rng.randint(0, 3))
            agg.set_source(source, [random_shard(rng, c, agg.shards.get((source, c))) for c in clusters])
        elif op < 0.9:
            agg.remove_source(source)
        else:
            assert not view_differences(agg.flush(), merge(agg.shards.values(), clusterset_range=where))
    assert not view_differences(agg.flush(), merge(agg.shards.values(), clusterset_range=where))


def test_flush_reuses_unchanged_services() -> None:
    api = ServiceKey("shop", "api")
    first = Shard(MemberCluster("a"), {WEB: HTTP, api: HTTP}, {WEB: (), api: ()})
    agg = Aggregator(lambda view: None)
    agg.set_shard("kube", first)
    before = agg.flush()
    eps = (Endpoint("127.0.1.1", Locality("r", "z", "a")),)
    agg.set_shard("kube", replace(first, endpoints={**first.endpoints, WEB: eps}))
    after = agg.flush()
    assert after.services[api] is before.services[api]
    assert after.services[WEB].endpoints == eps
    assert after.version != before.version


def test_build_and_incremental_versions_agree() -> None:
    view = merge([shard("b", "127.0.2.1"), shard("a", "127.0.1.2", "127.0.1.1")])
    shuffled = [replace(s, endpoints=tuple(reversed(s.endpoints))) for s in view.services.values()]
    assert MeshView.build(shuffled, view.clusters.values()).version == view.version


def test_the_oldest_export_decides_the_ports() -> None:
    """MCS: when clusters export a service with different ports, the oldest export's win; without
    times (the file source) the first cluster's by name."""
    web = ServiceKey("shop", "web")
    alt = (ServicePort("http", 8080, 8080),)
    a = Shard(MemberCluster("a"), {web: HTTP}, exported_at={web: "2026-12-01T10:00:00Z"})
    b = Shard(MemberCluster("b"), {web: alt}, exported_at={web: "2026-11-30T09:00:00Z"})
    assert merge([a, b]).services[web].ports == alt
    agg = Aggregator(lambda view: None)
    agg.set_shard("kube", a)
    agg.set_shard("kube", b)
    assert agg.flush().services[web].ports == alt
    untimed = [Shard(MemberCluster("a"), {web: HTTP}), Shard(MemberCluster("b"), {web: alt})]
    assert merge(untimed).services[web].ports == HTTP


async def test_a_lone_change_after_a_quiet_period_is_pushed_at_once() -> None:
    views: list[MeshView] = []
    agg = Aggregator(views.append, quiet=30.0, max_delay=60.0)  # the old rule: 30 s before a push
    task = asyncio.create_task(agg.run())
    try:
        agg.set_shard("kube", shard("a", "127.0.1.1"))
        for _ in range(100):
            if views:
                break
            await asyncio.sleep(0.01)
        assert len(views) == 1, "the leading edge: a change after a quiet period is pushed at once"
        # The next change comes right after that push: part of a burst, so it waits for the quiet period.
        agg.set_shard("kube", shard("a", "127.0.1.2"))
        await asyncio.sleep(0.2)
        assert len(views) == 1
    finally:
        task.cancel()


async def test_a_burst_of_a_hundred_changes_in_a_second_is_a_handful_of_pushes() -> None:
    views: list[MeshView] = []
    agg = Aggregator(views.append, quiet=0.1, max_delay=0.5)
    task = asyncio.create_task(agg.run())
    try:
        for i in range(100):  # one change every 10 ms: never a quiet period
            agg.set_shard("kube", shard("a", f"127.0.{1 + i // 250}.{1 + i % 250}"))
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the trailing push
    finally:
        task.cancel()
    assert 2 <= len(views) <= 5, f"{len(views)} pushes for 100 changes"  # leading, every max_delay, trailing
    assert [e.address for e in views[-1].services[WEB].endpoints] == ["127.0.1.100"]
