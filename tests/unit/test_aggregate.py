"""The aggregate: shards per (source, cluster), namespace sameness, and debouncing into MeshViews."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from isthmus.discovery.aggregate import Aggregator, Shard, merge
from isthmus.discovery.model import (
    ClusterState,
    Endpoint,
    Locality,
    MemberCluster,
    MeshView,
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
