"""Authorization semantics (xds/generate/http_filters/authorization.py), asserted on the RBAC that
LDS gives a workload: who matches a Caller (the SPIFFE ID's namespace and service account, any
member cluster), deny by default once a policy selects the workload, HTTP conditions on TCP ports,
the file source's checks, and LDS regenerated when policies change."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import re2
import yaml
from test_authorization_golden import BASE, IDENTITY, WEB

from isthmus.discovery import authorization
from isthmus.discovery.file import MeshFileError, parse_mesh
from isthmus.discovery.model import AllowRule, AuthorizationPolicy, Caller, MeshView, Protocol, ServicePort
from isthmus.xds import types
from isthmus.xds.cache import ConfigCache
from isthmus.xds.generate import GENERATORS
from isthmus.xds.generate.http_filters.authorization import principal, rbac

IDS = [
    "spiffe://mesh.test/ns/shop/sa/client",
    "spiffe://mesh.test/ns/shop/sa/client-2",
    "spiffe://mesh.test/ns/blog/sa/client",
    "spiffe://mesh.test/ns/blog/sa/backup",
    "spiffe://other.test/ns/shop/sa/client",
]


def matches(matcher: Any, value: str) -> bool:
    """Envoy's StringMatcher, for the three forms the generator uses."""
    kind = matcher.WhichOneof("match_pattern")
    if kind == "exact":
        return bool(value == matcher.exact)
    if kind == "prefix":
        return value.startswith(matcher.prefix)
    assert kind == "safe_regex"
    return re2.fullmatch(matcher.safe_regex.regex, value) is not None


@pytest.mark.parametrize(
    ("caller", "allowed"),
    [
        (Caller("shop", "client"), {IDS[0]}),
        (Caller("blog", "*"), {IDS[2], IDS[3]}),
        (Caller("*", "client"), {IDS[0], IDS[2]}),
        (Caller("*", "*"), set(IDS[:4])),
    ],
)
def test_a_caller_is_a_namespace_and_account_of_the_trust_domain_in_any_cluster(
    caller: Caller, allowed: set[str]
) -> None:
    found = principal(caller, "mesh.test").authenticated.principal_name
    assert {i for i in IDS if matches(found, i)} == allowed


HTTP, TCP = ServicePort("http", 80, 8080), ServicePort("pg", 5432, 5432, Protocol.TCP)


def view(*rules: AllowRule, account: str = "web") -> MeshView:
    base = parse_mesh(BASE)
    return MeshView.of(
        base.services, (), policies=[AuthorizationPolicy("AuthorizationPolicy", "shop", "p", account, rules)]
    )


def test_no_policy_no_filter_and_a_policy_denies_what_it_does_not_allow() -> None:
    assert rbac(view(account="db"), WEB, HTTP, IDENTITY) is None, "a policy for another account"
    config = rbac(view(AllowRule(ports=(5432,))), WEB, HTTP, IDENTITY)
    assert config is not None
    assert list(config.policies) == [], "the only rule is for another port: nothing is allowed on 80"


def test_http_conditions_never_allow_a_tcp_connection() -> None:
    config = rbac(
        view(AllowRule(paths=("/api/*",)), AllowRule(callers=(Caller("shop", "db"),))), WEB, TCP, IDENTITY
    )
    assert config is not None
    assert list(config.policies) == ["AuthorizationPolicy/shop/p[1]"]


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"name": "p", "namespace": "shop", "rules": []}, "selector"),
        (
            {
                "name": "p",
                "selector": {"service_account": "web"},
                "rules": [{"callers": [{"namespace": "Bad_NS"}]}],
            },
            "not a Kubernetes name",
        ),
        (
            {"name": "p", "selector": {"service_account": "web"}, "rules": [{"to": {"paths": ["api"]}}]},
            "starts with /",
        ),
        (
            {"name": "p", "selector": {"service_account": "web"}, "rules": [{"to": {"ports": [70000]}}]},
            "port",
        ),
    ],
)
def test_the_file_source_refuses_malformed_policies(policy: dict[str, Any], message: str) -> None:
    mesh = yaml.safe_load(BASE)
    mesh["authorization_policies"] = [policy]
    with pytest.raises(MeshFileError, match=message):
        parse_mesh(yaml.safe_dump(mesh))


def test_a_policy_change_regenerates_the_workloads_listeners() -> None:
    """The cache's inputs check (generate.INPUTS ``policies``) and LDS grouping by service account."""
    open_view, closed = parse_mesh(BASE), view(AllowRule(callers=(Caller("shop", "client"),)))
    cache = ConfigCache(open_view)
    cache._identity = IDENTITY  # the workload's certificate: its inbound listener exists
    before = cache.resources(types.LISTENER, WEB)
    cache.set_view(closed)
    after = cache.resources(types.LISTENER, WEB)
    assert after is not before
    direct = GENERATORS[types.LISTENER](closed, WEB, IDENTITY)
    assert {n: r.body for n, r in after.items()} == {
        n: m.SerializeToString(deterministic=True) for n, m in direct.items()
    }
    assert WEB.for_type(types.LISTENER).service_account == "web"


TARGET = {
    "kind": "TrafficTarget",
    "metadata": {"name": "web-readers", "namespace": "shop"},
    "spec": {
        "destination": {"kind": "ServiceAccount", "name": "web", "namespace": "shop"},
        "sources": [
            {"kind": "ServiceAccount", "name": "client", "namespace": "shop"},
            {"kind": "ServiceAccount", "name": "reporter", "namespace": "blog"},
        ],
        "rules": [
            {"kind": "HTTPRouteGroup", "name": "web-routes", "matches": ["reads"]},
            {"kind": "TCPRoute", "name": "pg"},
            {"kind": "HTTPRouteGroup", "name": "not-there"},
        ],
    },
}
GROUPS = {
    ("shop", "web-routes"): {
        "spec": {
            "matches": [
                {"name": "reads", "methods": ["GET", "HEAD"], "pathRegex": "/api/.*"},
                {"name": "writes", "methods": ["POST"], "pathRegex": "/api/.*"},
            ]
        }
    }
}
TCP_ROUTES = {("shop", "pg"): {"spec": {"matches": {"ports": [5432]}}}}


def test_an_smi_traffic_target_is_a_policy_of_its_destination() -> None:
    policy = authorization.traffic_target(TARGET, GROUPS, TCP_ROUTES)
    assert (policy.kind, policy.namespace, policy.service_account) == ("TrafficTarget", "shop", "web")
    callers = (Caller("shop", "client"), Caller("blog", "reporter"))
    assert policy.rules == (
        AllowRule(callers, (), ("/api/.*",), ("GET", "HEAD"), regex=True),  # only the match named
        AllowRule(callers, (5432,)),
    ), "a rule naming a group that does not exist allows nothing"
    config = rbac(MeshView.of(parse_mesh(BASE).services, (), policies=[policy]), WEB, HTTP, IDENTITY)
    assert config is not None
    [http] = [p for p in config.policies.values() if p.permissions[0].WhichOneof("rule") == "and_rules"]
    path = http.permissions[0].and_rules.rules[0].url_path.path
    assert path.safe_regex.regex == "/api/.*"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["destination"].update(kind="Service"), "ServiceAccount"),
        (lambda s: s["destination"].update(namespace="other"), "namespace shop"),
        (lambda s: s.update(sources=[]), "no ServiceAccount"),
        (lambda s: s["rules"].append({"kind": "UDPRoute", "name": "x"}), "UDPRoute"),
    ],
)
def test_a_malformed_traffic_target_is_refused(change: Any, message: str) -> None:
    target = copy.deepcopy(TARGET)
    change(target["spec"])
    with pytest.raises(authorization.PolicyError, match=message):
        authorization.traffic_target(target, GROUPS, TCP_ROUTES)
    bad_regex = copy.deepcopy(GROUPS)
    bad_regex["shop", "web-routes"]["spec"]["matches"][0]["pathRegex"] = "(?<=x)"
    with pytest.raises(authorization.PolicyError, match="RE2"):
        authorization.traffic_target(TARGET, bad_regex, TCP_ROUTES)


def test_policies_survive_the_aggregate_and_the_oldest_wins_across_clusters() -> None:
    """The file source's policies reach the served view (shards_of_view -> merge), and a policy
    read in two member clusters is one: the oldest (aggregate.merge_policies)."""
    from isthmus.discovery.aggregate import Shard, merge, merge_policies, shards_of_view
    from isthmus.discovery.model import MemberCluster

    mesh = yaml.safe_load(BASE)
    mesh["authorization_policies"] = [
        {"name": "p", "namespace": "shop", "selector": {"service_account": "web"}}
    ]
    read = parse_mesh(yaml.safe_dump(mesh))
    assert merge(shards_of_view(read)).policies == read.policies
    newer = AuthorizationPolicy("AuthorizationPolicy", "shop", "p", "web", (AllowRule(),))
    older = AuthorizationPolicy("AuthorizationPolicy", "shop", "p", "web", ())
    shards = [
        Shard(MemberCluster("a"), policies=((newer, "2026-11-02T00:00:00Z"),)),
        Shard(MemberCluster("b"), policies=((older, "2026-11-01T00:00:00Z"),)),
    ]
    [chosen] = merge_policies(shards)
    assert chosen.rules == ()


def test_a_policy_edited_in_place_regenerates_the_listeners_and_an_edited_route_the_routes() -> None:
    """Found by the data-path test: the model's equality leaves a policy's (and a route's) rules
    out, so a policy whose callers changed, same name, kept the old RBAC (and a route's new rules
    the old routes) until something else changed."""
    allowed = [{"namespace": "shop", "service_account": "client"}]
    mesh = yaml.safe_load(BASE)
    mesh["authorization_policies"] = [
        {
            "name": "p",
            "namespace": "shop",
            "selector": {"service_account": "web"},
            "rules": [{"callers": allowed}],
        }
    ]
    route = {
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "shop"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/a"}}],
                    "backendRefs": [{"name": "web", "port": 80}],
                }
            ],
        },
    }
    mesh["routes"] = [route]
    before = parse_mesh(yaml.safe_dump(mesh))
    allowed.append({"namespace": "shop", "service_account": "reporter"})
    route["spec"]["rules"][0]["matches"][0]["path"]["value"] = "/b"
    after = parse_mesh(yaml.safe_dump(mesh))
    cache = ConfigCache(before)
    cache._identity = IDENTITY
    notified: list[str] = []
    for type_url in (types.LISTENER, types.ROUTE):
        cache.follow(type_url, WEB, notified.append)
        cache.resources(type_url, WEB)
    assert cache.set_view(after)
    assert sorted(notified) == sorted([types.LISTENER, types.ROUTE])
    for type_url in (types.LISTENER, types.ROUTE):
        direct = GENERATORS[type_url](after, WEB, IDENTITY)
        assert {n: r.body for n, r in cache.resources(type_url, WEB).items()} == {
            n: m.SerializeToString(deterministic=True) for n, m in direct.items()
        }
    inbound = cache.resources(types.LISTENER, WEB)["inbound_15006"].body
    assert b"spiffe://mesh.test/ns/shop/sa/reporter" in inbound


def test_a_tcp_ports_handshake_accepts_only_the_allowed_callers_and_connects_the_app_after_it() -> None:
    """Found by the data-path test: network RBAC decides at the first bytes, after tcp_proxy has
    connected the app, so a server-first app greeted denied callers. With a policy, a TCP port's
    TLS handshake accepts only the allowed callers (none allowed: no identity at all) and tcp_proxy
    connects once it is done; without one, any identity of the trust domain, connected at once."""
    from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

    def tcp_chain(view: MeshView) -> tuple[list[Any], Any]:
        inbound = GENERATORS[types.LISTENER](view, WEB, IDENTITY)["inbound_15006"]
        chain = next(c for c in inbound.filter_chains if c.name == "inbound_5432")
        context = tls_pb2.DownstreamTlsContext()
        chain.transport_socket.typed_config.Unpack(context)
        validation = context.common_tls_context.combined_validation_context.default_validation_context
        proxy = tcp_proxy_pb2.TcpProxy()
        chain.filters[-1].typed_config.Unpack(proxy)
        return [m.matcher for m in validation.match_typed_subject_alt_names], proxy

    peers, proxy = tcp_chain(view(AllowRule(callers=(Caller("shop", "db"), Caller("blog", "*")))))
    assert proxy.upstream_connect_mode == tcp_proxy_pb2.ON_DOWNSTREAM_TLS_HANDSHAKE
    assert proxy.HasField("max_early_data_bytes"), "Envoy refuses a delayed connect without it"
    ids = [*IDS, "spiffe://mesh.test/ns/shop/sa/db"]
    assert {i for i in ids if any(matches(m, i) for m in peers)} == {
        "spiffe://mesh.test/ns/shop/sa/db",
        "spiffe://mesh.test/ns/blog/sa/client",
        "spiffe://mesh.test/ns/blog/sa/backup",
    }
    peers, _ = tcp_chain(view(AllowRule(ports=(80,))))  # nothing allowed on 5432
    assert peers
    assert not any(matches(m, i) for m in peers for i in ids)
    re2.compile(peers[0].safe_regex.regex)  # Envoy compiles it with RE2
    peers, proxy = tcp_chain(parse_mesh(BASE))  # no policy
    assert proxy.upstream_connect_mode == tcp_proxy_pb2.IMMEDIATE
    assert [m.prefix for m in peers] == ["spiffe://mesh.test/"]


def test_a_refused_policy_fails_closed_where_its_selector_reads() -> None:
    bad_rule = {
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": {"selector": {"serviceAccount": "web"}, "rules": [{"callers": "x"}]},
    }
    with pytest.raises(authorization.PolicyError):
        authorization.policy_object(bad_rule)
    closed = authorization.denying(authorization.KIND, bad_rule)
    assert closed is not None
    assert (closed.namespace, closed.service_account, closed.rules) == ("shop", "web", ())
    no_selector = {
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": {"selector": {"serviceAccount": "Bad_SA"}},
    }
    assert authorization.denying(authorization.KIND, no_selector) is None, "nothing it selects can be known"
    target = copy.deepcopy(TARGET)
    target["spec"]["rules"] = [{"kind": "UDPRoute", "name": "x"}]
    denied = authorization.denying(authorization.TRAFFIC_TARGET, target)
    assert denied is not None
    assert (denied.service_account, denied.rules) == ("web", ())
    config = rbac(MeshView.of(parse_mesh(BASE).services, (), policies=[denied]), WEB, HTTP, IDENTITY)
    assert config is not None
    assert list(config.policies) == [], "an ALLOW filter with no policy: every call to web is denied"


def test_an_http_ports_policy_is_in_its_inbound_routes_not_in_the_listener() -> None:
    """A policy change on an HTTP-only workload changes its inbound RDS, not its LDS: Envoy applies
    an RDS update to the next request on every connection, a listener change only to new ones."""
    http_only = BASE.replace(", {name: pg, port: 5432, protocol: tcp}", "")
    open_view = parse_mesh(http_only)
    closed = MeshView.of(
        open_view.services,
        (),
        policies=[
            AuthorizationPolicy(
                "AuthorizationPolicy", "shop", "p", "web", (AllowRule(callers=(Caller("shop", "a"),)),)
            )
        ],
    )
    cache = ConfigCache(open_view)
    cache._identity = IDENTITY
    before = {t: cache.resources(t, WEB) for t in (types.LISTENER, types.ROUTE)}
    cache.set_view(closed)
    after = {t: cache.resources(t, WEB) for t in (types.LISTENER, types.ROUTE)}
    assert after[types.LISTENER].version == before[types.LISTENER].version
    assert after[types.ROUTE].version != before[types.ROUTE].version
    [name] = [n for n in after[types.ROUTE] if n.startswith("inbound|")]
    assert after[types.ROUTE][name] is not before[types.ROUTE][name]
    direct = GENERATORS[types.ROUTE](closed, WEB, IDENTITY)
    assert {n: r.body for n, r in after[types.ROUTE].items()} == {
        n: m.SerializeToString(deterministic=True) for n, m in direct.items()
    }
