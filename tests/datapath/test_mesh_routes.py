"""Gateway API mesh routing (GAMMA) with real Envoys: HTTPRoutes whose parentRef is the Service
``web`` (no endpoints of its own), read from the mesh file's ``routes``, route an east client's
requests to ``web-v1`` (in east) and ``web-v2`` (only in west, reached through west's east-west
gateway): a header match, weights across clusters, a redirect, a request timeout, header edits, a
URL rewrite and the 404 of a request no rule matches."""

from __future__ import annotations

from typing import Any

import pytest

from datapath.harness import DataPath, NsEnvoy, eventually
from datapath.scenario import answered_by, meshed, pods, start_sidecars

pytestmark = [pytest.mark.envoy, pytest.mark.datapath]

REQUESTS = 400
TOLERANCE = 0.07  # observed share within 7 points of the weight (binomial sd at n=400, p=0.2: 2 points)
WEB_V1 = {"name": "web-v1", "port": 80}
WEB_V2 = {"name": "web-v2", "port": 80}


def http_route(name: str, *rules: dict[str, Any]) -> dict[str, Any]:
    """An HTTPRoute on the Service web (port 80), as Kubernetes holds it."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
            "rules": list(rules),
        },
    }


def prefix(path: str) -> dict[str, Any]:
    return {"path": {"type": "PathPrefix", "value": path}}


async def routed(dp: DataPath, *routes: dict[str, Any], probe: str = "/") -> NsEnvoy:
    """web-v1 in east, web-v2 in west (each with its sidecar), the routes on web, west's gateway and
    a client sidecar in east; returns the client once both backends answer it by name, and the
    route table it holds answers ``probe`` on web.shop (its routes are in place)."""
    for route in routes:
        dp.mesh.route(route)
    p = await pods(dp, ("east", "web-v1"), ("west", "web-v2"))
    await dp.control_plane(
        dp.mesh.service("web"),  # the parent: no endpoints of its own
        dp.mesh.service("web-v1", meshed(dp, p["web-v1"], "web-v1")),
        dp.mesh.service("web-v2", meshed(dp, p["web-v2"], "web-v2")),
    )
    await start_sidecars(dp, {"web-v1": "web-v1", "web-v2": "web-v2"}, p)
    await dp.gateway("west")
    client = await dp.sidecar("east", "client")

    async def ready() -> None:
        assert await answered_by(client, "web-v1.shop", count=2) == {"web-v1": 2}
        assert await answered_by(client, "web-v2.shop", count=2) == {"web-v2": 2}
        got = await client.request("web.shop", probe, follow_redirects=False)
        assert got.results[0].status not in (None, 503), got.summary()

    await eventually(ready, what="both backends reachable and web's routes in place", within=20)
    # web-v2 lives in west only: east's client reaches it through west's gateway, never directly.
    hosts = await client.admin.cluster_hosts()
    assert set(hosts["outbound|80||web-v2.shop.svc.cluster.local"]) == {
        f"{dp['west'].gateway_address}:15443"
    }, hosts
    return client


async def test_a_header_match_sends_matching_requests_to_the_other_cluster(dp: DataPath) -> None:
    client = await routed(
        dp,
        http_route(
            "web-by-version",
            {"matches": [{"headers": [{"name": "x-version", "value": "v2"}]}], "backendRefs": [WEB_V2]},
            {"backendRefs": [WEB_V1]},
        ),
    )
    matching = await client.request("web.shop", "/", count=30, headers={"x-version": "v2"})
    assert matching.all_ok, matching.summary()
    assert {(r.app, r.cluster) for r in matching.results} == {("web-v2", "west")}, matching.summary()
    others = await client.request("web.shop", "/", count=30)
    other_version = await client.request("web.shop", "/a/b", count=30, headers={"x-version": "v1"})
    for got in (others, other_version):
        assert got.all_ok, got.summary()
        assert {(r.app, r.cluster) for r in got.results} == {("web-v1", "east")}, got.summary()


async def test_weights_80_20_across_clusters_within_tolerance(dp: DataPath) -> None:
    client = await routed(
        dp, http_route("web-weighted", {"backendRefs": [{**WEB_V1, "weight": 80}, {**WEB_V2, "weight": 20}]})
    )
    got = await client.request("web.shop", "/", count=REQUESTS, concurrency=4)
    assert got.all_ok, got.summary()
    assert set(got.by_app) == {"web-v1", "web-v2"}, got.by_app
    assert {r.cluster for r in got.results if r.app == "web-v2"} == {"west"}, got.summary()
    share = got.by_app.get("web-v2", 0) / REQUESTS
    print(f"\nHTTPRoute 80/20: observed {got.by_app} over {REQUESTS} requests (web-v2 {share:.1%})")
    assert abs(share - 0.20) <= TOLERANCE, got.by_app


async def test_a_request_redirect_answers_with_its_status_and_location(dp: DataPath) -> None:
    redirect = {
        "type": "RequestRedirect",
        "requestRedirect": {
            "hostname": "web-new.example",
            "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"},
            "statusCode": 301,
        },
    }
    client = await routed(
        dp,
        http_route(
            "web-moved",
            {"matches": [prefix("/old")], "filters": [redirect]},
            {"backendRefs": [WEB_V1]},
        ),
    )
    got = await client.request("web.shop", "/old/page", count=5, follow_redirects=False)
    for r in got.results:
        assert r.status == 301, got.summary()
        assert r.headers.get("Location") == "http://web-new.example/new/page", r.headers
        assert r.app is None, "a redirect is answered by the client's sidecar, not by a backend"
    # A path-separated prefix: /older is not under /old.
    for path in ("/", "/older"):
        kept = await client.request("web.shop", path, count=5, follow_redirects=False)
        assert kept.all_ok, kept.summary()
        assert kept.by_app == {"web-v1": 5}, kept.summary()
    apps = await dp.agent("east").apps()
    assert apps["web-v1"]["hits"] >= 10, apps


async def test_a_request_timeout_answers_504_within_about_the_timeout(dp: DataPath) -> None:
    client = await routed(
        dp,
        http_route(
            "web-quick",
            {"matches": [prefix("/slow")], "backendRefs": [WEB_V2], "timeouts": {"request": "500ms"}},
            {"backendRefs": [WEB_V2]},
        ),
    )
    slow = await client.request("web.shop", "/slow?delay=3", count=3, timeout=6)
    for r in slow.results:
        assert r.status == 504, slow.summary()
        assert 0.45 <= r.elapsed <= 1.5, f"504 after {r.elapsed}s (timeout 500ms)"
    fast = await client.request("web.shop", "/slow", count=5)
    assert fast.all_ok, fast.summary()
    assert fast.by_app == {"web-v2": 5}, fast.summary()
    # The other rule has no such timeout: the same delay is waited for.
    patient = await client.request("web.shop", "/other?delay=1", timeout=6)
    assert patient.all_ok, patient.summary()
    assert patient.results[0].elapsed >= 1.0, patient.results[0].elapsed


async def test_header_edits_rewrites_and_no_matching_rule(dp: DataPath) -> None:
    edits = {
        "type": "RequestHeaderModifier",
        "requestHeaderModifier": {
            "set": [{"name": "x-route", "value": "api"}],
            "add": [{"name": "x-added", "value": "yes"}],
            "remove": ["x-secret"],
        },
    }
    answer = {
        "type": "ResponseHeaderModifier",
        "responseHeaderModifier": {"set": [{"name": "x-answered-by-route", "value": "web-api"}]},
    }
    rewrite = {
        "type": "URLRewrite",
        "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v1"}},
    }
    client = await routed(
        dp,
        http_route(
            "web-api",
            {"matches": [prefix("/api")], "filters": [edits, answer, rewrite], "backendRefs": [WEB_V2]},
            {"matches": [{"path": {"type": "Exact", "value": "/health"}}], "backendRefs": [WEB_V1]},
        ),
        probe="/api",
    )
    got = await client.request(
        "web.shop", "/api/items?x=1", count=3, headers={"x-route": "mine", "x-secret": "s3cret"}
    )
    assert got.all_ok, got.summary()
    for r in got.results:
        assert (r.app, r.cluster) == ("web-v2", "west"), r.describe()
        assert r.request_header("x-route") == "api", r.body
        assert r.request_header("x-added") == "yes", r.body
        assert r.request_header("x-secret") is None, r.body
        assert r.body is not None
        assert r.body["path"] == "/v1/items", r.body
        assert r.body["query"] == "x=1", r.body
        assert r.headers.get("x-answered-by-route") == "web-api", r.headers
    health = await client.request("web.shop", "/health", count=3)
    assert health.all_ok, health.summary()
    assert health.by_app == {"web-v1": 3}, health.summary()
    for r in health.results:
        assert r.request_header("x-route") is None, r.body
        assert r.body is not None
        assert r.body["path"] == "/health", r.body
    for path in ("/", "/health/x", "/apiary"):
        unmatched = await client.request("web.shop", path, count=3)
        assert unmatched.by_status == {"404": 3}, f"{path}: {unmatched.summary()}"
        assert not unmatched.apps, unmatched.summary()


def replace_prefix(filter_type: str, to: str) -> dict[str, Any]:
    spec = {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": to}}
    key = "urlRewrite" if filter_type == "URLRewrite" else "requestRedirect"
    return {"type": filter_type, key: spec}


async def test_replace_prefix_match_replaces_path_elements(dp: DataPath) -> None:
    """Gateway API ReplacePrefixMatch (HTTPPathModifier): the matched prefix's path elements are
    replaced, with one slash between the replacement and the rest of the path."""
    client = await routed(
        dp,
        http_route(
            "web-prefixes",
            {
                "matches": [prefix("/strip")],
                "filters": [replace_prefix("URLRewrite", "/")],
                "backendRefs": [WEB_V1],
            },
            {
                "matches": [prefix("/to")],
                "filters": [replace_prefix("URLRewrite", "/y/")],
                "backendRefs": [WEB_V1],
            },
            {"matches": [prefix("/moved")], "filters": [replace_prefix("RequestRedirect", "/")]},
            {"backendRefs": [WEB_V1]},
        ),
    )
    forwarded = {"/strip/three?q=1": ("/three", "q=1"), "/strip": ("/", ""), "/to/b": ("/y/b", "")}
    for path, (want, query) in forwarded.items():
        got = (await client.request("web.shop", path)).results[0]
        assert got.ok, got.describe()
        assert got.body is not None
        assert (got.body["path"], got.body["query"]) == (want, query), f"{path}: {got.body}"
    moved = (await client.request("web.shop", "/moved/z", follow_redirects=False)).results[0]
    assert moved.status == 302, moved.describe()
    assert moved.headers.get("Location") == "http://web.shop/z", moved.headers
