"""The status isthmus writes on GAMMA routes (discovery.kube.route_status): Accepted and
ResolvedRefs per Service parent with the Gateway API's reasons, other controllers' entries kept,
transition times kept while a condition's status holds."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from isthmus.discovery import gamma
from isthmus.discovery.aggregate import Shard, merge
from isthmus.discovery.file import parse_mesh
from isthmus.discovery.kube.route_status import (
    CONTROLLER,
    RouteStatusWriter,
    merged,
    parent_statuses,
    unchanged,
)
from isthmus.discovery.model import MemberCluster, MeshView

MESH = """
clusters: [{name: east}, {name: west}]
services:
  - {name: web, namespace: shop, ports: [{name: http, port: 80}]}
  - {name: web-v1, namespace: shop, ports: [{name: http, port: 80}]}
"""
NOW, LATER = "2026-12-01T10:00:00Z", "2026-12-01T11:00:00Z"


def route(backend: str = "web-v1", parent: str = "web", **meta: Any) -> dict[str, Any]:
    return {
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "shop", "generation": 3, **meta},
        "spec": {
            "parentRefs": [{"kind": "Service", "name": parent, "port": 80}],
            "rules": [{"backendRefs": [{"name": backend, "port": 80}]}],
        },
    }


def view_with(*reads: tuple[str, gamma.ReadRoute]) -> MeshView:
    base = parse_mesh(MESH)
    return MeshView.of(
        base.services, base.clusters.values(), (), [r for _, read in reads for r in read.routes]
    )


def conditions(entry: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in entry["conditions"]}


def test_an_accepted_route_with_a_missing_backend() -> None:
    good, ghost = gamma.read(route(), "east"), gamma.read(route("ghost"), "east")
    [entry] = parent_statuses(view_with(("east", good)), good, "east", [], NOW)
    assert entry["parentRef"] == {"group": "", "kind": "Service", "name": "web", "port": 80}
    assert entry["controllerName"] == CONTROLLER
    assert conditions(entry) == {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")}
    assert {c["observedGeneration"] for c in entry["conditions"]} == {3}
    [entry] = parent_statuses(view_with(("east", ghost)), ghost, "east", [], NOW)
    assert conditions(entry) == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("False", "BackendNotFound"),
    }
    assert "shop/ghost" in entry["conditions"][1]["message"]


def test_refused_routes_and_parents_outside_the_mesh_are_not_accepted() -> None:
    bad = route()
    bad["spec"]["rules"][0]["matches"] = [{"path": {"type": "RegularExpression", "value": "(?=x)"}}]
    refused = gamma.read(bad, "east")
    [entry] = parent_statuses(view_with(), refused, "east", [], NOW)
    assert conditions(entry) == {"Accepted": ("False", "UnsupportedValue")}
    orphan = gamma.read(route(parent="nope"), "east")
    [entry] = parent_statuses(view_with(("east", orphan)), orphan, "east", [], NOW)
    assert conditions(entry)["Accepted"] == ("False", "NoMatchingParent")


def test_the_same_route_in_two_clusters() -> None:
    """The older one is in force; the other is Conflicted if it says something else, else Accepted."""
    older = gamma.read(route(creationTimestamp="2026-11-01T00:00:00Z"), "west")
    other = gamma.read(route("web", creationTimestamp="2026-11-02T00:00:00Z"), "east")
    same = gamma.read(route(creationTimestamp="2026-11-02T00:00:00Z"), "east")
    base = parse_mesh(MESH)
    for newer, expected in ((other, ("False", "Conflicted")), (same, ("True", "Accepted"))):
        shards = [
            Shard(MemberCluster("west"), {k: s.ports for k, s in base.services.items()}, routes=older.routes),
            Shard(MemberCluster("east"), routes=newer.routes),
        ]
        view = merge(shards)
        [entry] = parent_statuses(view, newer, "east", [], NOW)
        assert conditions(entry)["Accepted"] == expected
        [entry] = parent_statuses(view, older, "west", [], NOW)
        assert conditions(entry)["Accepted"] == ("True", "Accepted")


def test_others_entries_are_kept_and_times_move_only_with_a_status() -> None:
    read = gamma.read(route(), "east")
    view = view_with(("east", read))
    foreign = {
        "parentRef": {"kind": "Service", "name": "web"},
        "controllerName": "other.io/mesh",
        "conditions": [],
    }
    first = merged({"parents": [foreign]}, parent_statuses(view, read, "east", [], NOW))
    assert first["parents"][0] == foreign
    again = merged(first, parent_statuses(view, read, "east", first["parents"], LATER))
    assert unchanged(first, again)
    assert again == first, "the same status: the same transition times"
    ghost = gamma.read(route("ghost"), "east")
    moved = merged(first, parent_statuses(view_with(("east", ghost)), ghost, "east", first["parents"], LATER))
    assert not unchanged(first, moved)
    times = {c["type"]: c["lastTransitionTime"] for c in moved["parents"][1]["conditions"]}
    assert times == {"Accepted": NOW, "ResolvedRefs": LATER}


class FakeRoutes:
    """The two calls RouteStatusWriter makes (CustomObjectsApi's), on routes held in memory."""

    def __init__(self, *objs: dict[str, Any]) -> None:
        self.objs = {o["metadata"]["name"]: copy.deepcopy(o) for o in objs}
        self.written: list[dict[str, Any]] = []

    async def get_namespaced_custom_object(self, *args: Any, **kw: Any) -> dict[str, Any]:
        return copy.deepcopy(self.objs[args[4]])

    async def replace_namespaced_custom_object_status(self, *args: Any, **kw: Any) -> None:
        self.objs[args[4]] = copy.deepcopy(args[5])
        self.written.append(args[5]["status"])


async def test_a_change_of_the_routes_waits_for_the_view_that_holds_them() -> None:
    """The routes read change before the aggregator publishes the view with them: the writer waits
    for that view instead of writing what an older view makes of them (NoMatchingParent, then
    Accepted a moment later); a change that brings no view is written after ``settle``."""
    obj = route()
    read = gamma.read(obj, "east")
    reads: tuple[gamma.ReadRoute, ...] = ()
    writer = RouteStatusWriter("east", _no_connect, lambda: reads, settle=5.0)
    api = FakeRoutes(obj)
    writer.want(MeshView.build((), ()))  # a view before the cluster's services and routes
    await writer.write(api)
    assert api.written == []
    reads = (read,)
    writer.wake()
    write = asyncio.create_task(writer.write(api))
    await asyncio.sleep(0.05)
    assert not write.done(), "waits for the view"
    writer.want(view_with(("east", read)))
    await asyncio.wait_for(write, 1.0)
    [status] = api.written
    assert conditions(status["parents"][0]) == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("True", "ResolvedRefs"),
    }
    # An edit that changes no view (its generation only): written after settle, with the view held.
    writer.settle = 0.05
    reads = (gamma.read({**obj, "metadata": {**obj["metadata"], "generation": 4}}, "east"),)
    writer.wake()
    await asyncio.wait_for(writer.write(api), 1.0)
    assert len(api.written) == 2
    assert {c["observedGeneration"] for c in api.written[1]["parents"][0]["conditions"]} == {4}


async def _no_connect() -> Any:
    raise AssertionError("the test hands write() its API")
