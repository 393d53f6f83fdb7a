"""Route status written by isthmus into a real kube-apiserver with the Gateway API's own CRDs (their
``status`` subresource, which the fake API server does not have), with the member roles of
deploy/member-cluster/rbac.yaml (the reader, and isthmus-route-status for the one write), in a
cluster of this test (the CRDs are cluster-scoped).

* An HTTPRoute whose backend is a service of the mesh gets ``status.parents[]`` for its Service
  parent with ``controllerName: isthmus.io/mesh``, Accepted True and ResolvedRefs True; one whose
  backend is unknown ResolvedRefs False (BackendNotFound); one with a regular expression RE2
  rejects Accepted False (UnsupportedValue). A parent entry of another controller, written
  before isthmus started, is kept as it was.
* Without the route-status role the writer's error says 403 clearly (``Members.status()``), and
  discovery goes on (a route created then is read into the mesh view, the cluster stays synced and
  is not degraded); with the role back, the status is written again.
* The audit log: isthmus's only writes are updates of the routes' status subresource.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.kube.members import Members
from isthmus.discovery.kube.route_status import CONTROLLER
from isthmus.discovery.model import ClusterState, MeshView
from realkube.cluster import RealCluster
from realkube.fixtures import rbac_objects, reader_kubeconfig
from realkube.gateway_api import route_crds
from realkube.objects import endpoint_slice, service_without_selector
from realkube.rest import ApiError
from realkube.test_real_routes import (
    GROUP,
    READER_USER,
    TIMING,
    WEB_PARENT,
    Views,
    http_route,
    running,
    web_routes,
)
from realkube.wait import until

pytestmark = [pytest.mark.realkube, pytest.mark.timeout(300)]

ROUTES = f"{GROUP}/namespaces/shop/httproutes"
OTHER = "example.com/gateway-controller"


def to(backend: str, **match: Any) -> list[dict[str, Any]]:
    rule: dict[str, Any] = {"backendRefs": [{"name": backend, "port": 80}]}
    if match:
        rule["matches"] = [match]
    return [rule]


GOOD = http_route("web-good", to("web-v1"))
GHOST = http_route("web-ghost", to("ghost", path={"type": "PathPrefix", "value": "/ghost"}))
LOOKAHEAD = http_route(
    "web-lookahead", to("web-v1", path={"type": "RegularExpression", "value": "/(?=v2).*"})
)
LATE = http_route("web-late", to("web-v1", path={"type": "PathPrefix", "value": "/late"}))
# Another controller's entry (a north-south Gateway's, say) on the route, written before isthmus runs.
FOREIGN = {
    "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"},
    "controllerName": OTHER,
    "conditions": [
        {
            "type": "Accepted",
            "status": "True",
            "reason": "Accepted",
            "message": "theirs",
            "observedGeneration": 1,
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }
    ],
}
ROUTE_STATUS_BINDING = "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/isthmus-route-status"


def ours(route: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """isthmus's conditions of a stored route, by type (empty: no entry of isthmus)."""
    parents = ((route or {}).get("status") or {}).get("parents") or []
    mine = [p for p in parents if p.get("controllerName") == CONTROLLER]
    assert len(mine) <= 1, parents
    return {c["type"]: c for c in mine[0]["conditions"]} if mine else {}


def summary(route: dict[str, Any] | None) -> dict[str, tuple[str, str]]:
    return {kind: (c["status"], c["reason"]) for kind, c in ours(route).items()}


@pytest.fixture
def status_cluster(real_cluster_factory: Callable[..., list[RealCluster]]) -> RealCluster:
    [cluster] = real_cluster_factory("status")
    return cluster


async def test_real_route_status_written_with_the_route_status_role_only(
    status_cluster: RealCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cluster, admin = status_cluster, status_cluster.admin
    for definition in route_crds():
        await admin.create(definition)
    await admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    for name, address in (("web", "10.9.0.1"), ("web-v1", "10.9.0.2")):
        await admin.create(service_without_selector(name))
        await admin.create(endpoint_slice([address], service=name))
    for route in (GOOD, GHOST, LOOKAHEAD):  # the CRD's schema and CEL rules accept all three
        await until(
            lambda route=route: admin.request("POST", ROUTES, route),
            f"the HTTPRoute CRD to accept {route['metadata']['name']}",
            retry_on=(ApiError,),
        )
    good_path = f"{ROUTES}/web-good"
    stored = await admin.request("GET", good_path)
    stored["status"] = {"parents": [FOREIGN]}
    await admin.request("PUT", f"{good_path}/status", stored)

    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    await reader_kubeconfig(cluster, directory / "east.yaml")
    audit_start = len(cluster.audit())
    views = Views()
    aggregator = Aggregator(views.on_view, quiet=0.02, max_delay=0.2)
    members = Members(aggregator, directory=directory, timing=TIMING, poll_interval=0.2, route_status=True)

    # What the app does with each complete view, here with every view (also those before the cluster
    # synced): the writer must still judge the routes by a view that holds them (3 writes, not 5).
    def on_view(view: MeshView) -> None:
        views.on_view(view)
        members.write_route_status(view)

    aggregator.on_view = on_view
    caplog.set_level(logging.INFO, logger="isthmus.discovery.kube")

    async def get(name: str) -> dict[str, Any]:
        found: dict[str, Any] = await admin.request("GET", f"{ROUTES}/{name}")
        return found

    async def written(name: str, want: dict[str, tuple[str, str]]) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            route = await get(name)
            return route if summary(route) == want else None

        found: dict[str, Any] = await until(check, f"{name}'s status {want}", state=members.status)
        return found

    async with running(aggregator.run, members.run):
        await views.until(lambda v: {"web-good", "web-ghost"} <= set(web_routes(v)), timeout=60)
        good = await written(
            "web-good", {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")}
        )
        parents = good["status"]["parents"]
        assert parents[0] == FOREIGN, parents  # theirs, untouched
        (mine,) = [p for p in parents if p["controllerName"] == CONTROLLER]
        assert mine["parentRef"] == WEB_PARENT
        conditions = ours(good)
        assert {c["observedGeneration"] for c in conditions.values()} == {good["metadata"]["generation"]}
        assert all(c["lastTransitionTime"] and c["message"] for c in conditions.values())
        ghost = await written(
            "web-ghost", {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("False", "BackendNotFound")}
        )
        assert "shop/ghost" in ours(ghost)["ResolvedRefs"]["message"]
        lookahead = await written("web-lookahead", {"Accepted": ("False", "UnsupportedValue")})
        assert ours(lookahead)["Accepted"]["message"]
        status = members.status()["east"]["route_status"]
        assert status["error"] == "", status  # type: ignore[index]
        writes = status["writes"]  # type: ignore[index]
        assert writes == 3, status
        # Nothing changes: nothing is written again (the writer compares before it writes).
        await asyncio.sleep(1.0)
        assert members.status()["east"]["route_status"]["writes"] == writes  # type: ignore[index]

        # The route-status role taken away: the write of a new route's status is refused, and says so.
        refused_from = len(cluster.audit())
        await admin.request("DELETE", ROUTE_STATUS_BINDING)
        await asyncio.sleep(1.0)  # the authorizer's informer hears of it
        await until(lambda: admin.request("POST", ROUTES, LATE), "web-late created", retry_on=(ApiError,))

        async def refused() -> bool:
            error = str(members.status()["east"]["route_status"]["error"])  # type: ignore[index]
            return "403" in error and "httproutes/status" in error

        await until(refused, "the writer to report the 403", state=members.status)
        error = str(members.status()["east"]["route_status"]["error"])  # type: ignore[index]
        assert "deploy/member-cluster/rbac.yaml" in error, error
        warnings = [r.getMessage() for r in caplog.records if "writing route status failed" in r.getMessage()]
        assert len(warnings) == 1, warnings  # once, not at every retry
        # Discovery is unaffected: the new route is in the mesh, the cluster synced and not degraded.
        view = await views.until(lambda v: "web-late" in web_routes(v))
        assert view.clusters["east"].state is ClusterState.SYNCED
        east = members.status()["east"]
        assert east["state"] == "synced", east
        assert not east.get("degraded"), east
        assert ours(await get("web-late")) == {}

        # The role back: the writer (retrying with backoff) writes the new route's status.
        binding = next(
            o
            for o in rbac_objects()
            if o["kind"] == "ClusterRoleBinding" and o["metadata"]["name"] == "isthmus-route-status"  # type: ignore[index]
        )
        await admin.create(binding)
        await written(
            "web-late", {"Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")}
        )

        async def cleared() -> bool:
            return members.status()["east"]["route_status"]["error"] == ""  # type: ignore[index]

        await until(cleared, "the error to clear", state=members.status)

    events = cluster.audit()
    mine_events = [e for e in events[audit_start:] if e["user"]["username"] == READER_USER]
    before_removal = [e for e in events[audit_start:refused_from] if e["user"]["username"] == READER_USER]

    def what(e: dict[str, Any]) -> tuple[str, str, str]:
        ref = e.get("objectRef") or {}
        return e["verb"], ref.get("resource", ""), ref.get("subresource", "")

    writes_seen = {what(e) for e in mine_events if e["verb"] not in ("get", "list", "watch")}
    assert writes_seen == {("update", "httproutes", "status")}, writes_seen
    assert [what(e) for e in before_removal if e["responseStatus"]["code"] in (401, 403)] == []
    denied = {what(e) for e in mine_events if e["responseStatus"]["code"] in (401, 403)}
    assert denied == {("update", "httproutes", "status")}, denied  # only while the role was gone
    # The status writes changed no route's spec (a spec change would have raised its generation).
    for route in (GOOD, GHOST, LOOKAHEAD, LATE):
        assert (await get(route["metadata"]["name"]))["metadata"]["generation"] == 1
