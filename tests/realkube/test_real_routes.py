"""GAMMA routes from a real kube-apiserver with the Gateway API's own CRDs (tests/realkube/gateway_api.py
fetches them from the Go module proxy), read with the member reader role (deploy/member-cluster/rbac.yaml,
the rules the Helm chart's member mode renders: tests/realkube/test_real_chart.py checks they are the
same), in a cluster of this test (the CRDs are cluster-scoped: no other test sees them).

* The HTTPRoute and GRPCRoute CRDs are accepted and serve; an HTTPRoute and a GRPCRoute whose
  parentRef is the Service web, valid by the CRDs' schemas and rules, are read into the mesh view
  from that cluster, with their matches and weighted backends; an HTTPRoute the CRD accepts and
  Envoy would reject (a lookahead RE2 has not) is refused with the Gateway API reason (logged with
  its generation), the others unaffected. A change and a deletion follow.
* The reader account is refused nothing (the API server's audit log: no 401 or 403 of it), and it
  listed and watched both kinds (200s), but may not write them (403).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.kube.members import Members
from isthmus.discovery.kube.reflector import Timing
from isthmus.discovery.model import ClusterState, MeshView, ServiceKey, ServiceRoute
from realkube.cluster import RealCluster
from realkube.fixtures import READER, READER_NAMESPACE, reader_kubeconfig
from realkube.gateway_api import route_crds
from realkube.objects import endpoint_slice, service_without_selector
from realkube.rest import ApiError, Rest, forbidden
from realkube.wait import until

pytestmark = [pytest.mark.realkube, pytest.mark.timeout(300)]

TIMING = Timing(
    watch_timeout=20, idle_timeout=90.0, request_timeout=5.0, backoff_initial=0.2, backoff_max=2.0
)
GROUP = "/apis/gateway.networking.k8s.io/v1"
WEB = ServiceKey("shop", "web")
READER_USER = f"system:serviceaccount:{READER_NAMESPACE}:{READER}"
WEB_PARENT = {"group": "", "kind": "Service", "name": "web", "port": 80}


def http_route(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"parentRefs": [WEB_PARENT], "rules": rules},
    }


CANARY = http_route(
    "web-canary",
    [
        {
            "matches": [
                {
                    "path": {"type": "PathPrefix", "value": "/api"},
                    "headers": [{"name": "x-canary", "value": "yes"}],
                }
            ],
            "backendRefs": [
                {"name": "web-v1", "port": 80, "weight": 80},
                {"name": "web-v2", "port": 80, "weight": 20},
            ],
        }
    ],
)
BAD_REGEX = http_route(
    "web-lookahead",
    [
        {
            "matches": [{"path": {"type": "RegularExpression", "value": "/(?=v2).*"}}],
            "backendRefs": [{"name": "web-v2", "port": 80}],
        }
    ],
)
GRPC = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "GRPCRoute",
    "metadata": {"name": "web-grpc", "namespace": "shop"},
    "spec": {
        "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 9090}],
        "rules": [
            {
                "matches": [{"method": {"type": "Exact", "service": "shop.Web", "method": "Get"}}],
                "backendRefs": [{"name": "web-v2", "port": 9090}],
            }
        ],
    },
}


class Views:
    def __init__(self) -> None:
        self.view = MeshView.build((), ())
        self.changed = asyncio.Event()

    def on_view(self, view: MeshView) -> None:
        self.view = view
        self.changed.set()

    async def until(self, check: Callable[[MeshView], bool], timeout: float = 30.0) -> MeshView:
        try:
            async with asyncio.timeout(timeout):
                while not check(self.view):
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"no view satisfied the check; last: {self.view.routes}") from None
        return self.view


def web_routes(view: MeshView) -> dict[str, ServiceRoute]:
    return {r.name: r for r in view.routes.get(WEB, ()) if r.kind != "TrafficSplit"}


@contextlib.asynccontextmanager
async def running(*tasks: Callable[[], Any]) -> AsyncIterator[None]:
    started = [asyncio.create_task(t()) for t in tasks]
    try:
        yield
    finally:
        for task in started:
            task.cancel()
        for task in started:
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
def routes_cluster(real_cluster_factory: Callable[..., list[RealCluster]]) -> RealCluster:
    [cluster] = real_cluster_factory("routes")
    return cluster


async def test_real_gateway_api_routes_are_read_with_the_reader_role(
    routes_cluster: RealCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cluster, admin = routes_cluster, routes_cluster.admin
    crds = route_crds()
    assert {c["spec"]["names"]["kind"] for c in crds} == {"HTTPRoute", "GRPCRoute"}
    for definition in crds:
        await admin.create(definition)
    await admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    grpc_service = service_without_selector()
    grpc_service["spec"]["ports"].append({"name": "grpc", "port": 9090, "targetPort": 9090})
    await admin.create(grpc_service)
    await admin.create(endpoint_slice(["10.9.0.1"]))
    for route in (CANARY, BAD_REGEX):  # the CRD's schema and CEL rules accept both
        await until(
            lambda route=route: admin.request("POST", f"{GROUP}/namespaces/shop/httproutes", route),
            f"the HTTPRoute CRD to accept {route['metadata']['name']}",
            retry_on=(ApiError,),
        )
    await until(
        lambda: admin.request("POST", f"{GROUP}/namespaces/shop/grpcroutes", GRPC),
        "the GRPCRoute CRD to accept web-grpc",
        retry_on=(ApiError,),
    )

    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    await reader_kubeconfig(cluster, directory / "east.yaml")
    views = Views()
    aggregator = Aggregator(views.on_view, quiet=0.02, max_delay=0.2)
    members = Members(aggregator, directory=directory, timing=TIMING, poll_interval=0.2)
    caplog.set_level(logging.INFO, logger="isthmus.discovery.kube")
    async with running(aggregator.run, members.run):
        view = await views.until(lambda v: {"web-canary", "web-grpc"} <= set(web_routes(v)), timeout=60)
        assert view.clusters["east"].state is ClusterState.SYNCED
        assert {e.address for e in view.services[WEB].endpoints} == {"10.9.0.1"}
        routes = web_routes(view)
        assert set(routes) == {"web-canary", "web-grpc"}  # not the one Envoy would reject
        canary = routes["web-canary"]
        assert (canary.kind, canary.cluster, canary.port) == ("HTTPRoute", "east", 80)
        assert canary.created  # the server's creationTimestamp
        (rule,) = canary.rules
        (match,) = rule.matches
        assert (match.path, [(h.name, h.value) for h in match.headers]) == ("/api", [("x-canary", "yes")])
        assert [(b.service.name, b.weight) for b in rule.backends] == [("web-v1", 80), ("web-v2", 20)]
        grpc = routes["web-grpc"]
        assert (grpc.kind, grpc.port) == ("GRPCRoute", 9090)
        assert [m.path for m in grpc.rules[0].matches] == ["/shop.Web/Get"]
        refusals = [
            r.getMessage() for r in caplog.records if "HTTPRoute shop/web-lookahead" in r.getMessage()
        ]
        assert len(refusals) == 1, refusals
        assert "(generation 1)" in refusals[0]  # the real server's generation
        assert "UnsupportedValue" in refusals[0]
        status = members.status()["east"]
        assert not status.get("degraded"), status

        # A change (the weights) and a deletion follow.
        path = f"{GROUP}/namespaces/shop/httproutes/web-canary"
        stored = await admin.request("GET", path)
        stored["spec"]["rules"][0]["backendRefs"][1]["weight"] = 80
        await admin.request("PUT", path, stored)
        await views.until(
            lambda v: [b.weight for b in web_routes(v)["web-canary"].rules[0].backends] == [80, 80]
        )
        await admin.request("DELETE", path)
        view = await views.until(lambda v: "web-canary" not in web_routes(v))
        assert set(web_routes(view)) == {"web-grpc"}

    events = cluster.audit()
    mine = [e for e in events if e["user"]["username"] == READER_USER]
    refused = [f"{e['verb']} {e['requestURI']}" for e in mine if e["responseStatus"]["code"] in (401, 403)]
    assert refused == []
    answered = {
        (e["verb"], e["objectRef"].get("resource", ""))
        for e in mine
        if e["responseStatus"]["code"] == 200 and "objectRef" in e
    }
    for resource in ("httproutes", "grpcroutes"):
        assert ("list", resource) in answered, answered
        assert ("watch", resource) in answered, answered
    token = await admin.service_account_token(READER_NAMESPACE, READER, cluster.audience)
    reader = Rest(cluster.url, str(cluster.pki.ca_cert), token)
    assert await forbidden(reader, "POST", f"{GROUP}/namespaces/shop/httproutes", http_route("x", []))
    assert await forbidden(reader, "DELETE", f"{GROUP}/namespaces/shop/grpcroutes/web-grpc")
