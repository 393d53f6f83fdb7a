"""The status isthmus writes on GAMMA routes (discovery.kube.route_status): Accepted and
ResolvedRefs per Service parent with the Gateway API's reasons, other controllers' entries kept,
transition times kept while a condition's status holds."""

from __future__ import annotations

from typing import Any

from isthmus.discovery import gamma
from isthmus.discovery.aggregate import Shard, merge
from isthmus.discovery.file import parse_mesh
from isthmus.discovery.kube.route_status import CONTROLLER, merged, parent_statuses, unchanged
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
