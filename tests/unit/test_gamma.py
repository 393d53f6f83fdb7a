"""Gateway API routes read into the routing model (discovery.gamma), and what RDS makes of the
cases the golden features do not show: what is refused (with the Gateway API's reason, so it never
reaches Envoy), backends that cannot be used (their share gets 500), and conflicts across member
clusters (aggregate.merge_routes)."""

from __future__ import annotations

from typing import Any

import pytest

from isthmus.discovery import gamma
from isthmus.discovery.aggregate import Shard, merge_routes
from isthmus.discovery.file import MeshFileError, parse_mesh
from isthmus.discovery.model import (
    Backend,
    Locality,
    MemberCluster,
    MeshView,
    PathType,
    RouteRule,
    ServiceKey,
    ServicePort,
    ServiceRoute,
)
from isthmus.xds import naming, types
from isthmus.xds.generate import GENERATORS
from isthmus.xds.generate.routes import service_routes
from isthmus.xds.proxy import Proxy, Role

WEB = ServiceKey("shop", "web")


def route(rules: list[Any], kind: str = "HTTPRoute", **meta: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "metadata": {"name": "r", "namespace": "shop", **meta},
        "spec": {"parentRefs": [{"kind": "Service", "name": "web", "port": 80}], "rules": rules},
    }


@pytest.mark.parametrize(
    ("rules", "reason", "says"),
    [
        (
            [{"matches": [{"path": {"type": "RegularExpression", "value": "(?=lookahead)"}}]}],
            "UnsupportedValue",
            "RE2",
        ),
        (
            [{"matches": [{"headers": [{"name": "x", "type": "RegularExpression", "value": "a(b"}]}]}],
            "UnsupportedValue",
            "missing )",
        ),
        (
            [{"matches": [{"path": {"type": "Exact", "value": "no-slash"}}]}],
            "UnsupportedValue",
            "starting with /",
        ),
        (
            [{"filters": [{"type": "ExtensionRef", "extensionRef": {"name": "x"}}]}],
            "UnsupportedValue",
            "ExtensionRef",
        ),
        ([{"timeouts": {"request": "ten seconds"}}], "UnsupportedValue", "duration"),
        (
            [{"filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 200}}]}],
            "UnsupportedValue",
            "not a redirect",
        ),
        ([{"backendRefs": [{"name": "web", "weight": -1}]}], "UnsupportedValue", "weight"),
    ],
)
def test_what_envoy_would_reject_is_not_accepted(rules: list[Any], reason: str, says: str) -> None:
    read = gamma.read(route(rules))
    assert (read.reason, read.routes) == (reason, ())
    assert says in read.message
    assert read.parents == (gamma.Parent(WEB, 80),), "its parents are known, for its status"


def test_a_route_attaches_to_each_service_parent_and_ignores_gateways() -> None:
    obj = route([{"backendRefs": [{"name": "web-v1", "port": 80}]}])
    obj["spec"]["parentRefs"] += [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "ingress"},
        {"kind": "Service", "name": "api", "namespace": "other"},
    ]
    read = gamma.read(obj, "east")
    assert [(r.service, r.port, r.consumer, r.cluster) for r in read.routes] == [
        (WEB, 80, False, "east"),
        (ServiceKey("other", "api"), 0, True, "east"),
    ]
    assert read.routes[0].rules[0].backends == (Backend(ServiceKey("shop", "web-v1"), 80, 1),)


def test_gateway_durations() -> None:
    assert [gamma.duration_ms(v, "t") for v in ("1h", "2m30s", "500ms", "1s250ms", "0s")] == [
        3_600_000,
        150_000,
        500,
        1_250,
        0,
    ]
    for bad in ("", "1d", "5", "1.5s", "m"):
        with pytest.raises(gamma.RouteError):
            gamma.duration_ms(bad, "t")


def test_grpc_method_matches_are_paths() -> None:
    rules = [
        {"matches": [{"method": {"service": "a.B", "method": "C"}}]},
        {"matches": [{"method": {"service": "a.B"}}]},
    ]
    read = gamma.read(route(rules, kind="GRPCRoute"))
    got = [(m.path, m.path_type) for rule in read.routes[0].rules for m in rule.matches]
    assert got == [("/a.B/C", PathType.EXACT), ("/a.B", PathType.PREFIX)]


def test_a_backend_in_another_namespace_or_of_another_kind_is_broken_not_routed() -> None:
    read = gamma.read(
        route(
            [
                {
                    "backendRefs": [
                        {"name": "x", "namespace": "other", "port": 80},
                        {"name": "y", "kind": "Bucket"},
                    ]
                }
            ]
        )
    )
    [rule] = read.routes[0].rules
    assert "RefNotPermitted" in rule.broken
    assert "InvalidKind" in rule.broken


HTTP = ServicePort("http", 80, 80)


def view_with(rule: RouteRule, *services: str) -> MeshView:
    mesh = "services:\n" + "".join(
        f"  - {{name: {name}, namespace: shop, ports: [{{name: http, port: 80}}]}}\n"
        for name in ("web", *services)
    )
    base = parse_mesh(mesh)
    return MeshView.of(base.services, (), (), [ServiceRoute("HTTPRoute", "shop", "r", WEB, 80, (rule,))])


def actions(view: MeshView) -> Any:
    [r] = service_routes(view, view.services[WEB], HTTP, view.routes[WEB])
    return r.route


def test_an_unknown_backend_gets_its_share_of_requests_500() -> None:
    rule = RouteRule(
        backends=(Backend(ServiceKey("shop", "v1"), 80, 3), Backend(ServiceKey("shop", "ghost"), 80, 1))
    )
    action = actions(view_with(rule, "v1"))
    assert [(c.name, c.weight.value) for c in action.weighted_clusters.clusters] == [
        ("outbound|80||v1.shop.svc.cluster.local", 3),
        (naming.NO_CLUSTER, 1),
    ]
    assert action.cluster_not_found_response_code == action.INTERNAL_SERVER_ERROR
    # A backend without the port named, or a broken rule: everything 500.
    assert actions(
        view_with(RouteRule(backends=(Backend(ServiceKey("shop", "v1"), 8080),)), "v1")
    ).cluster == (naming.NO_CLUSTER)
    broken = RouteRule(backends=(Backend(ServiceKey("shop", "v1"), 80),), broken="RefNotPermitted: ...")
    assert actions(view_with(broken, "v1")).cluster == naming.NO_CLUSTER


def test_the_same_route_in_several_clusters_is_one_the_oldest() -> None:
    def shard(cluster: str, created: str, backend: str) -> Shard:
        rule = RouteRule(backends=(Backend(ServiceKey("shop", backend), 80),))
        r = ServiceRoute("HTTPRoute", "shop", "r", WEB, 80, (rule,), created, cluster)
        return Shard(MemberCluster(cluster), routes=(r,))

    merged = merge_routes(
        [shard("a", "2026-11-02T00:00:00Z", "v-a"), shard("b", "2026-11-01T00:00:00Z", "v-b")]
    )
    assert [(r.cluster, r.rules[0].backends[0].service.name) for r in merged] == [("b", "v-b")]
    tie = merge_routes([shard("b", "2026-11-01T00:00:00Z", "v-b"), shard("a", "2026-11-01T00:00:00Z", "v-a")])
    assert [r.cluster for r in tie] == ["a"], "equal age: the first cluster by name"


def test_the_file_source_refuses_a_route_it_cannot_accept() -> None:
    mesh = """
services: [{name: web, namespace: shop, ports: [{name: http, port: 80}]}]
routes:
  - kind: HTTPRoute
    metadata: {name: r, namespace: shop}
    spec:
      parentRefs: [{kind: Service, name: web}]
      rules: [{backendRefs: [{name: ghost, port: 80}]}]
"""
    with pytest.raises(MeshFileError, match="shop/ghost is not declared"):
        parse_mesh(mesh)
    with pytest.raises(MeshFileError, match="RE2"):
        parse_mesh(
            mesh.replace(
                "rules: [", "rules: [{matches: [{path: {type: RegularExpression, value: '(?!x)'}}]}, "
            )
        )


def test_routes_change_rds_only_when_they_change() -> None:
    """The cache's inputs check (generate.INPUTS ``routes``): a new route regenerates RDS."""
    from isthmus.xds.cache import ConfigCache

    plain = view_with(RouteRule(backends=(Backend(ServiceKey("shop", "v1"), 80),)), "v1")
    cache = ConfigCache(MeshView.of(plain.services, ()))
    proxy = Proxy("p", Role.SIDECAR, "shop", "client", "client", Locality("", "", "a"))
    before = cache.resources(types.ROUTE, proxy)
    cache.set_view(plain)
    after = cache.resources(types.ROUTE, proxy)
    assert after is not before
    direct = GENERATORS[types.ROUTE](plain, proxy, cache._identity_for(types.ROUTE, proxy))
    assert {n: r.body for n, r in after.items()} == {
        n: m.SerializeToString(deterministic=True) for n, m in direct.items()
    }


def test_replace_prefix_match_needs_a_path_prefix_match() -> None:
    rewrite = {
        "type": "URLRewrite",
        "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}},
    }
    read = gamma.read(
        route([{"matches": [{"path": {"type": "Exact", "value": "/a"}}], "filters": [rewrite]}])
    )
    assert read.reason == "UnsupportedValue"
    assert "PathPrefix" in read.message


def test_a_consumer_route_may_send_to_the_service_it_is_attached_to() -> None:
    """A consumer route (namespace blog, parent shop/web) may name its parent as a backend, as the
    mesh conformance's consumer route does; any other service of shop is RefNotPermitted."""
    obj = {
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "blog"},
        "spec": {
            "parentRefs": [{"kind": "Service", "name": "web", "namespace": "shop"}],
            "rules": [
                {"backendRefs": [{"name": "web", "namespace": "shop", "port": 80}]},
                {"backendRefs": [{"name": "db", "namespace": "shop", "port": 80}]},
            ],
        },
    }
    [read] = gamma.read(obj).routes
    parent, other = read.rules
    assert parent.broken == ""
    assert parent.backends == (Backend(WEB, 80, 1),)
    assert other.broken.startswith("RefNotPermitted")
