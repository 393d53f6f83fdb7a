"""A ClusterWatcher's incremental shard (per-service recomputation after watch events) equals the
shard converted from scratch, after random sequences of events of every kind, relists included."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

import pytest

from isthmus.discovery.aggregate import Aggregator, Shard
from isthmus.discovery.kube.cluster import COALESCE, MCS_PLURAL, SOURCE, ClusterPolicy, ClusterWatcher
from isthmus.discovery.kube.convert import REGION_LABEL, SERVICE_NAME_LABEL, ZONE_LABEL, ExportPolicy
from isthmus.discovery.kube.kubeconfig import Credentials
from isthmus.discovery.kube.reflector import Obj, Reflector, object_key
from isthmus.discovery.model import ServiceKey

KINDS = ["services", "endpointslices", "pods", "nodes", "namespaces", MCS_PLURAL]
NAMESPACES = ["shop", "bank"]
SERVICES = ["web", "api", "db"]


async def never(**kw: object) -> Any:
    raise AssertionError("the test drives the reflectors by hand")


def meta(name: str, ns: str | None = None, **labels: str) -> Obj:
    return {"name": name, **({"namespace": ns} if ns else {}), "labels": labels}


def random_service(rng: random.Random, ns: str, name: str) -> Obj:
    ports = rng.choice(
        [
            [{"name": "http", "port": 80, "targetPort": 8080}],
            [{"name": "grpc", "port": 9090}, {"name": "http", "port": 80}],
            [{"name": "dns", "port": 53, "protocol": "UDP"}],
        ]
    )
    kind = "ExternalName" if rng.random() < 0.1 else "ClusterIP"
    return {"metadata": meta(name, ns), "spec": {"type": kind, "ports": ports}}


def random_slice(rng: random.Random, ns: str, name: str) -> Obj:
    labels = {SERVICE_NAME_LABEL: rng.choice(SERVICES)} if rng.random() < 0.9 else {}
    endpoints = []
    for _ in range(rng.randint(0, 3)):
        item: Obj = {
            "addresses": [f"10.0.0.{rng.randint(1, 5)}"],
            "conditions": rng.choice(
                [{"ready": True}, {"ready": False}, {"serving": True, "terminating": True}]
            ),
            "nodeName": f"n{rng.randint(1, 3)}",
        }
        if rng.random() < 0.8:
            item["targetRef"] = {"kind": "Pod", "namespace": ns, "name": f"p{rng.randint(1, 4)}"}
        endpoints.append(item)
    return {
        "metadata": meta(name, ns, **labels),
        "addressType": "IPv4" if rng.random() < 0.95 else "FQDN",
        "ports": rng.choice([[{"name": "http", "port": 8080}], [{"port": 8081}], []]),
        "endpoints": endpoints,
    }


def random_object(rng: random.Random, kind: str) -> Obj:
    ns = rng.choice(NAMESPACES)
    if kind == "services":
        return random_service(rng, ns, rng.choice(SERVICES))
    if kind == "endpointslices":
        return random_slice(rng, ns, f"s{rng.randint(1, 5)}")
    if kind == "pods":
        account = rng.choice(["sa-1", "sa-2", ""])
        return {"metadata": meta(f"p{rng.randint(1, 4)}", ns), "spec": {"serviceAccountName": account}}
    if kind == "nodes":
        labels = rng.choice([{}, {REGION_LABEL: "eu"}, {REGION_LABEL: "eu", ZONE_LABEL: "eu-1"}])
        return {"metadata": meta(f"n{rng.randint(1, 3)}", **labels), "status": {"beat": rng.random()}}
    if kind == "namespaces":
        labels = rng.choice([{}, {"isthmus.io/mesh": "disabled"}, {"isthmus.io/mesh": "enabled"}])
        return {"metadata": meta(ns, **labels)}
    return {"metadata": meta(rng.choice(SERVICES), ns)}


def event(reflector: Reflector, rng: random.Random) -> None:
    """One watch event on ``reflector``'s kind, through the reflector's own event handling."""
    obj = random_object(rng, reflector.kind)
    kind = "DELETED" if rng.random() < 0.2 else "MODIFIED"
    reflector._apply({"type": kind, "object": obj})


def relist(reflector: Reflector, rng: random.Random) -> None:
    """What a (re)list does to the store, and its report."""
    objects = [random_object(rng, reflector.kind) for _ in range(rng.randint(0, 6))]
    reflector.store = {object_key(obj): obj for obj in objects}
    reflector.synced.set()  # as a real list does
    reflector._on_change(None)


def published(agg: Aggregator) -> Shard:
    return agg.shards[(SOURCE, "a")]


POLICIES = [
    ClusterPolicy(region="fallback"),
    ClusterPolicy(export=ExportPolicy.SERVICE_EXPORT, require_namespace_label=True, zone="z0"),
]


@pytest.mark.parametrize("policy", POLICIES, ids=["all", "serviceexport+label"])
@pytest.mark.parametrize("seed", range(15))
def test_incremental_shard_equals_full_conversion(seed: int, policy: ClusterPolicy) -> None:
    rng = random.Random(seed)
    agg = Aggregator(lambda view: None)
    watcher = ClusterWatcher(Credentials("a", {}, ""), agg, policy)
    reflectors = [watcher._reflector(kind, never) for kind in KINDS]
    for reflector in reflectors:
        relist(reflector, rng)
    watcher._publish()
    rebuilds = publishes = 0
    for _ in range(300):
        (reflector,) = rng.choices(reflectors, weights=[3, 4, 3, 1, 1, 1])
        if rng.random() < 0.03:
            relist(reflector, rng)
        else:
            event(reflector, rng)
        if rng.random() < 0.3:
            rebuilds += watcher._shard is None
            publishes += 1
            watcher._publish()
            full = watcher.build_shard()
            assert published(agg).services == full.services
            assert published(agg).endpoints == full.endpoints
            assert published(agg).cluster == full.cluster
    assert 0 < rebuilds < publishes / 2, "both paths are exercised, mostly the incremental one"


def test_slice_relabelled_moves_its_endpoints() -> None:
    agg = Aggregator(lambda view: None)
    watcher = ClusterWatcher(Credentials("a", {}, ""), agg)
    svc, slices = watcher._reflector("services", never), watcher._reflector("endpointslices", never)
    svc.synced.set()
    slices.synced.set()  # both listed
    for name in ("web", "api"):
        svc._apply({"type": "ADDED", "object": random_service(random.Random(0), "shop", name)})
    item = {"addresses": ["10.0.0.1"], "conditions": {"ready": True}}
    one = {"metadata": meta("s1", "shop", **{SERVICE_NAME_LABEL: "web"}), "endpoints": [item]}
    slices._apply({"type": "ADDED", "object": one})
    watcher._publish()
    web, api = ServiceKey("shop", "web"), ServiceKey("shop", "api")
    assert [e.address for e in published(agg).endpoints[web]] == ["10.0.0.1"]
    assert published(agg).endpoints[api] == ()
    moved = {**one, "metadata": meta("s1", "shop", **{SERVICE_NAME_LABEL: "api"})}
    slices._apply({"type": "MODIFIED", "object": moved})
    assert watcher._shard is not None, "a relabelled slice is an incremental change"
    watcher._publish()
    assert published(agg).endpoints == watcher.build_shard().endpoints
    assert (len(published(agg).endpoints[web]), len(published(agg).endpoints[api])) == (0, 1)


def test_node_status_update_rebuilds_nothing() -> None:
    agg = Aggregator(lambda view: None)
    watcher = ClusterWatcher(Credentials("a", {}, ""), agg)
    nodes = watcher._reflector("nodes", never)
    nodes._apply({"type": "ADDED", "object": {"metadata": meta("n1", **{ZONE_LABEL: "z1"})}})
    watcher._publish()
    nodes._apply({"type": "MODIFIED", "object": {"metadata": meta("n1", **{ZONE_LABEL: "z1"}), "status": {}}})
    assert watcher._shard is not None
    nodes._apply({"type": "MODIFIED", "object": {"metadata": meta("n1", **{ZONE_LABEL: "z2"})}})
    assert watcher._shard is None, "a locality label change rebuilds the shard"


def test_nothing_of_a_cluster_is_published_before_every_kind_is_listed() -> None:
    agg = Aggregator(lambda view: None)
    watcher = ClusterWatcher(Credentials("a", {}, ""), agg)
    svc, slices = watcher._reflector("services", never), watcher._reflector("endpointslices", never)
    svc._apply({"type": "ADDED", "object": random_service(random.Random(0), "shop", "web")})
    svc.synced.set()  # services listed, endpoint slices not yet
    watcher._publish()
    assert published(agg).services == {}, "a service without its endpoints would be pushed as empty"
    item = {"addresses": ["10.0.0.1"], "conditions": {"ready": True}}
    one = {"metadata": meta("s1", "shop", **{SERVICE_NAME_LABEL: "web"}), "endpoints": [item]}
    slices._apply({"type": "ADDED", "object": one})
    slices.synced.set()
    watcher._publish()
    assert [e.address for e in published(agg).endpoints[ServiceKey("shop", "web")]] == ["10.0.0.1"]


async def test_a_lone_watch_event_is_published_at_once_and_a_burst_in_one_rebuild() -> None:
    """The publisher coalesces watch events that keep coming (one loop turn after another) into
    one shard rebuild, for at most COALESCE; a lone event waits one loop turn, not COALESCE."""
    agg = Aggregator(lambda view: None)
    watcher = ClusterWatcher(Credentials("a", {}, ""), agg)
    rebuilds: list[float] = []
    watcher._publish = lambda: rebuilds.append(time.monotonic())  # type: ignore[method-assign]
    publisher = asyncio.create_task(watcher._publisher())
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        watcher._on_change("services", None)
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(rebuilds) == 1, "a lone event is published within a loop turn or two"
        assert rebuilds[0] - started < COALESCE / 2
        for _ in range(20):  # a burst: one event per loop turn
            watcher._on_change("services", None)
            await asyncio.sleep(0)
        await asyncio.sleep(2 * COALESCE)
        assert 2 <= len(rebuilds) <= 3, f"the burst of 20 cost {len(rebuilds) - 1} rebuilds"
    finally:
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher
