"""Generators: pure functions of (MeshView, Proxy). Whole outputs are pinned by golden files
(tests/golden/*.json; regenerate with `make golden` and review the diff), rules by focused tests."""

from __future__ import annotations

import datetime
from dataclasses import replace
from pathlib import Path

import pytest
from google.protobuf import json_format

from goldens import golden
from isthmus.discovery import clusterset
from isthmus.discovery.file import MeshFileError, example_mesh_text, parse_mesh
from isthmus.discovery.model import ClusterState, Locality, MeshView
from isthmus.xds import types
from isthmus.xds.generate import GENERATORS
from isthmus.xds.generate.endpoints import priority_class
from isthmus.xds.generate.identity import PLAINTEXT, MeshIdentity, WorkloadCert
from isthmus.xds.proxy import Proxy, Role

GOLDEN = Path(__file__).parent.parent / "golden"

TWO_NAMESPACES = """
clusters:
  - {name: a, region: r1, zone: z1}
  - {name: b, region: r1, zone: z2}
  - {name: c, region: r2, zone: z9}
services:
  - name: web
    namespace: shop
    ports: [{name: http, port: 80}, {name: admin, port: 8081}]
    endpoints:
      - {cluster: a, address: 127.0.1.1}
      - {cluster: b, address: 127.0.2.1}
      - {cluster: c, address: 127.0.3.1}
      - {cluster: c, address: 127.0.3.2, health: draining}
  - name: web
    namespace: blog
    ports: [{name: http, port: 80}]
    endpoints: [{cluster: c, address: 127.0.3.9}]
  - name: api
    namespace: shop
    ports: [{name: grpc, port: 9090, protocol: grpc}, {name: tcp, port: 5000, protocol: tcp}]
"""


EASTWEST = """
clusters:
  - {name: a, region: r1, zone: z1, gateway: {address: 10.250.0.1}}
  - {name: b, region: r1, zone: z2, gateway: {address: 10.250.0.2, port: 15443}}
  - {name: c, region: r2, zone: z9}
services:
  - name: web
    namespace: shop
    ports: [{name: http, port: 80, target_port: 8080}]
    endpoints:
      - {cluster: a, address: 10.1.0.1, sidecar_port: 15006, service_account: web}
      - {cluster: b, address: 10.2.0.1, sidecar_port: 15006, service_account: web}
      - {cluster: b, address: 10.2.0.2, sidecar_port: 15006, service_account: web}
      - {cluster: b, address: 10.2.0.3, sidecar_port: 15006, service_account: web, health: unhealthy}
      - {cluster: c, address: 10.3.0.1, sidecar_port: 15006, service_account: web}
  - name: db
    namespace: shop
    ports: [{name: tcp, port: 5432, protocol: tcp}]
    endpoints:
      - {cluster: b, address: 10.2.0.9, sidecar_port: 15006, service_account: db}
      - {cluster: b, address: 10.2.0.10}
  - name: client
    namespace: shop
    ports: [{name: http, port: 80, target_port: 9090}]
    endpoints:
      - {cluster: a, address: 10.1.0.7, sidecar_port: 15006, service_account: client}
"""


def sidecar(cluster: str, region: str, zone: str, namespace: str = "shop") -> Proxy:
    return Proxy(
        node_id=f"sidecar-{cluster}",
        role=Role.SIDECAR,
        namespace=namespace,
        service="client",
        service_account="client",
        locality=Locality(region, zone, cluster),
        listen_address="127.0.0.1",
        outbound_port=15001,
    )


CASES = {
    "example-sidecar-east": (example_mesh_text(), sidecar("east", "us-east1", "us-east1-b")),
    "example-gateway-west": (
        example_mesh_text(),
        Proxy("gw", Role.GATEWAY, "istio-system", "gw", "gw", Locality("us-west1", "us-west1-a", "west")),
    ),
    "two-namespaces-sidecar-a": (TWO_NAMESPACES, sidecar("a", "r1", "z1")),
    "two-namespaces-sidecar-blog-c": (TWO_NAMESPACES, sidecar("c", "r2", "z9", namespace="blog")),
    "eastwest-mtls-sidecar-a": (EASTWEST, sidecar("a", "r1", "z1", namespace="shop")),
    "eastwest-mtls-gateway-b": (
        EASTWEST,
        Proxy("gw-b", Role.GATEWAY, "isthmus-system", "eastwest", "eastwest", Locality("r1", "z2", "b")),
    ),
    "eastwest-mtls-captured-sidecar-a": (EASTWEST, replace(sidecar("a", "r1", "z1"), capture=True)),
}
MTLS_CASES = {"eastwest-mtls-sidecar-a", "eastwest-mtls-gateway-b", "eastwest-mtls-captured-sidecar-a"}
# ClusterIPs as Kubernetes would give them: clusters' service ranges overlap (web has 10.96.0.10 in
# both a and b), db exists only in b, client only in a.
CLUSTER_IPS = {
    "shop/web": (("a", ("10.96.0.10",)), ("b", ("10.96.0.10",))),
    "shop/db": (("b", ("10.96.0.20",)),),
    "shop/client": (("a", ("10.96.0.30", "fd00::30")),),
}


def addressed(view: MeshView) -> MeshView:
    """``view`` with CLUSTER_IPS and clusterset IPs from the default range (as the aggregator does)."""
    vips = clusterset.allocate(view.services, clusterset.DEFAULT_NETWORK)
    services = [
        replace(s, addresses=CLUSTER_IPS.get(str(s.key), ()), vip=vips[s.key]) for s in view.services.values()
    ]
    return MeshView.build(services, view.clusters.values(), view.splits.values())


# Fixed strings stand in for PEM: generators only place them, so golden files stay stable.
TEST_IDENTITY = MeshIdentity(
    "mesh.test",
    "ROOT-PEM",
    WorkloadCert(
        "spiffe://mesh.test/ns/shop/sa/client",
        "CHAIN-PEM",
        "KEY-PEM",
        datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC),
    ),
)


def render(mesh: str, proxy: Proxy, identity: MeshIdentity = PLAINTEXT) -> dict[str, dict[str, object]]:
    view = addressed(parse_mesh(mesh)) if proxy.capture else parse_mesh(mesh)
    out: dict[str, dict[str, object]] = {}
    for type_url in types.PUSH_ORDER:
        resources = GENERATORS[type_url](view, proxy, identity)
        out[types.short(type_url)] = {
            name: json_format.MessageToDict(msg, preserving_proto_field_name=True)
            for name, msg in sorted(resources.items())
        }
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    mesh, proxy = CASES[case]
    got = render(mesh, proxy, TEST_IDENTITY if case in MTLS_CASES else PLAINTEXT)
    path = GOLDEN / f"{case}.json"
    assert got == golden(path, got), f"{case} differs from {path}; if intended, run `make golden`"


def test_generators_are_deterministic_and_do_not_mutate() -> None:
    view = parse_mesh(TWO_NAMESPACES)
    proxy = sidecar("a", "r1", "z1")
    before = view.version
    for type_url, generate in GENERATORS.items():
        first = {n: m.SerializeToString(deterministic=True) for n, m in generate(view, proxy).items()}
        second = {n: m.SerializeToString(deterministic=True) for n, m in generate(view, proxy).items()}
        assert first == second, types.short(type_url)
    assert view.version == before


@pytest.mark.parametrize(
    ("proxy", "endpoint", "expected"),
    [
        (Locality("r1", "z1", "a"), Locality("r1", "z1", "a"), 0),
        (Locality("r1", "", "a"), Locality("r1", "z2", "a"), 0),  # the proxy's zone is unknown
        (Locality("r1", "z1", "a"), Locality("r1", "z2", "a"), 1),
        (Locality("r1", "z1", "a"), Locality("r1", "z1", "b"), 2),
        (Locality("r1", "z1", "a"), Locality("r1", "z2", "b"), 2),
        (Locality("r1", "z1", "a"), Locality("r2", "z9", "c"), 3),
        (Locality("", "", ""), Locality("r1", "z1", "a"), 3),
    ],
)
def test_priority_class(proxy: Locality, endpoint: Locality, expected: int) -> None:
    assert priority_class(proxy, endpoint) == expected


def test_priorities_are_contiguous_and_weighted_by_healthy_endpoints() -> None:
    view = parse_mesh(TWO_NAMESPACES)
    # From c: own cluster c first; a and b are both "elsewhere" -> priority 1, no gap.
    cla = GENERATORS[types.ENDPOINT](view, sidecar("c", "r2", "z9"))[
        "outbound|80||web.shop.svc.cluster.local"
    ]
    by_cluster = {le.locality.sub_zone: le for le in cla.endpoints}
    assert by_cluster["c"].priority == 0
    assert by_cluster["a"].priority == by_cluster["b"].priority == 1
    assert by_cluster["c"].load_balancing_weight.value == 1  # one healthy, one draining


def test_short_host_names_only_in_own_namespace() -> None:
    view = parse_mesh(TWO_NAMESPACES)
    routes = GENERATORS[types.ROUTE](view, sidecar("a", "r1", "z1", namespace="blog"))["outbound_http"]
    domains = {d: vh.name for vh in routes.virtual_hosts for d in vh.domains}
    assert domains["web"].startswith("web.blog.")
    assert domains["web.shop"].startswith("web.shop.")
    assert domains["web.shop:8081"] == "web.shop.svc.cluster.local:8081"
    assert "web.shop.svc.clusterset.local:80" in domains
    all_domains = [d for vh in routes.virtual_hosts for d in vh.domains]
    assert len(all_domains) == len(set(all_domains)), "Envoy rejects duplicate domains"
    # TCP ports get no virtual host.
    assert not any(d.endswith(":5000") for d in all_domains)


def test_stale_member_cluster_is_demoted_below_every_fresh_one() -> None:
    view = parse_mesh(TWO_NAMESPACES)
    stale_a = MeshView.build(
        view.services.values(),
        [replace(c, state=ClusterState.STALE) if c.name == "a" else c for c in view.clusters.values()],
    )
    name = "outbound|80||web.shop.svc.cluster.local"
    proxy = sidecar("a", "r1", "z1")
    fresh = {
        le.locality.sub_zone: le.priority for le in GENERATORS[types.ENDPOINT](view, proxy)[name].endpoints
    }
    assert fresh == {"a": 0, "b": 1, "c": 2}
    demoted = GENERATORS[types.ENDPOINT](stale_a, proxy)[name].endpoints
    # Even the proxy's own cluster goes last once its API server is stale; priorities stay contiguous.
    assert {le.locality.sub_zone: le.priority for le in demoted} == {"b": 0, "c": 1, "a": 2}


@pytest.mark.parametrize(
    ("weight", "expected"),
    [
        # (sub_zone -> (priority, locality weight)) seen from a proxy in a
        (100, {"a": (0, 1), "b": (1, 1), "c": (2, 1)}),
        (75, {"a": (0, 75), "b": (0, 25), "c": (1, 1)}),
        (25, {"a": (0, 25), "b": (0, 75), "c": (1, 1)}),
        (0, {"b": (0, 1), "c": (1, 1), "a": (2, 1)}),
    ],
)
def test_a_drained_cluster_shares_its_fallbacks_priority_then_goes_last(weight: int, expected: dict) -> None:
    view = parse_mesh(TWO_NAMESPACES)
    draining = MeshView.build(
        view.services.values(),
        [replace(c, weight=weight) if c.name == "a" else c for c in view.clusters.values()],
    )
    cla = GENERATORS[types.ENDPOINT](draining, sidecar("a", "r1", "z1"), PLAINTEXT)[
        "outbound|80||web.shop.svc.cluster.local"
    ]
    # c has one healthy and one draining endpoint: weight 1.
    got = {le.locality.sub_zone: (le.priority, le.load_balancing_weight.value) for le in cla.endpoints}
    assert got == expected


SPLIT_MESH = """
clusters: [{name: a}, {name: b}]
services:
  - {name: web, namespace: shop, ports: [{name: http, port: 80}]}
  - name: web-v1
    namespace: shop
    ports: [{name: http, port: 80}]
    endpoints: [{cluster: a, address: 10.1.0.1}]
  - name: web-v2
    namespace: shop
    ports: [{name: http, port: 8080}]
    endpoints: [{cluster: b, address: 10.2.0.1}]
traffic_splits:
  - namespace: shop
    service: web
    backends: [{service: web-v1, weight: 80}, {service: web-v2, weight: 20}, {service: web, weight: 0}]
"""


def test_traffic_split_routes_the_root_service_to_weighted_backends() -> None:
    view = parse_mesh(SPLIT_MESH)
    routes = GENERATORS[types.ROUTE](view, sidecar("a", "r1", "z1"), PLAINTEXT)["outbound_http"]
    [root] = [vh for vh in routes.virtual_hosts if vh.name == "web.shop.svc.cluster.local:80"]
    weighted = root.routes[0].route.weighted_clusters.clusters
    assert [(c.name, c.weight.value) for c in weighted] == [
        ("outbound|80||web-v1.shop.svc.cluster.local", 80),
        # web-v2 has no port 80: its first HTTP port; the zero-weight backend is left out.
        ("outbound|8080||web-v2.shop.svc.cluster.local", 20),
    ]
    [v1] = [vh for vh in routes.virtual_hosts if vh.name == "web-v1.shop.svc.cluster.local:80"]
    assert v1.routes[0].route.cluster == "outbound|80||web-v1.shop.svc.cluster.local", (
        "backends stay callable"
    )


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ("{namespace: shop, service: nope, backends: [{service: web-v1}]}", "root service"),
        (
            "{namespace: shop, service: web, backends: [{service: ghost, weight: 1}]}",
            "backend service 'ghost'",
        ),
        ("{namespace: shop, service: web, backends: [{service: web-v1, weight: -1}]}", "non-negative"),
        ("{namespace: shop, service: web, backends: [{service: web-v1, weight: 0}]}", "weight above 0"),
    ],
)
def test_bad_traffic_splits_are_refused(split: str, message: str) -> None:
    mesh = SPLIT_MESH[: SPLIT_MESH.index("traffic_splits:")] + f"traffic_splits: [{split}]\n"
    with pytest.raises(MeshFileError, match=message):
        parse_mesh(mesh)


PREFIX_REWRITES = """
clusters: [{name: a, region: r1, zone: z1}]
services:
  - name: web
    namespace: shop
    ports: [{name: http, port: 80}]
    endpoints: [{cluster: a, address: 127.0.1.1}]
routes:
  - kind: HTTPRoute
    metadata: {name: prefixes, namespace: shop}
    spec:
      parentRefs: [{kind: Service, name: web, port: 80}]
      rules:
        - matches: [{path: {type: PathPrefix, value: /strip}}]
          filters:
            - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}
          backendRefs: [{name: web, port: 80}]
        - matches: [{path: {type: PathPrefix, value: /a/}}]
          filters:
            - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b/}}}
          backendRefs: [{name: web, port: 80}]
        - matches: [{path: {type: PathPrefix, value: /moved}}]
          filters:
            - type: RequestRedirect
              requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
        - filters:
            - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v1}}}
          backendRefs: [{name: web, port: 80}]
"""


def test_replace_prefix_match_replaces_path_elements_not_characters() -> None:
    """Gateway API ReplacePrefixMatch: /strip/three with "/" is /three (not //three), /a/x with
    /b/ is /b/x (not /b//x), and a match of / with /v1 makes /items /v1/items (not /v1items)."""
    view = parse_mesh(PREFIX_REWRITES)
    routes = GENERATORS[types.ROUTE](view, sidecar("a", "r1", "z1"))["outbound_http"]
    web = next(vh for vh in routes.virtual_hosts if "web.shop" in vh.domains)
    by_prefix = {r.match.path_separated_prefix or r.match.prefix: r for r in web.routes}
    strip = by_prefix["/strip"].route
    assert not strip.prefix_rewrite
    assert (strip.regex_rewrite.pattern.regex, strip.regex_rewrite.substitution) == ("^/strip/*", "/")
    assert by_prefix["/a"].route.prefix_rewrite == "/b"
    moved = by_prefix["/moved"].redirect
    assert (moved.regex_rewrite.pattern.regex, moved.regex_rewrite.substitution) == ("^/moved/*", "/")
    root = by_prefix["/"].route
    assert (root.regex_rewrite.pattern.regex, root.regex_rewrite.substitution) == ("^/*", "/v1/")


def test_an_http2_or_grpc_port_is_served_as_http2_on_the_inbound_side() -> None:
    """The calling sidecar speaks HTTP/2 to a grpc or http2 port (its cluster's protocol options);
    the far sidecar's connection manager must too: AUTO would go by the mesh ALPN and read HTTP/1."""
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

    mesh = """
services:
  - name: api
    namespace: shop
    ports: [{name: grpc, port: 7070, protocol: grpc}, {name: http, port: 80}]
    endpoints: [{cluster: a, address: 127.0.1.1, sidecar_port: 15006, service_account: api}]
clusters: [{name: a, region: r1, zone: z1}]
"""
    proxy = replace(sidecar("a", "r1", "z1"), service="api", service_account="api")
    listeners = GENERATORS[types.LISTENER](parse_mesh(mesh), proxy, TEST_IDENTITY)
    [inbound] = [lst for name, lst in listeners.items() if name.startswith("inbound")]
    codecs = {}
    for chain in inbound.filter_chains:
        manager = hcm.HttpConnectionManager()
        chain.filters[0].typed_config.Unpack(manager)
        codecs[chain.name] = manager.codec_type
    assert codecs == {
        "inbound_7070": hcm.HttpConnectionManager.HTTP2,
        "inbound_80": hcm.HttpConnectionManager.AUTO,
    }
