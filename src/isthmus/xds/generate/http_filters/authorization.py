"""Authorization: who may call a workload (discovery.model.AuthorizationPolicy), as Envoy RBAC on
the sidecar's inbound side, where the caller's identity is the URI SAN of the certificate it
presented in the mesh's mTLS (end to end, also through an east-west gateway's passthrough).

No policy selects the workload: every mesh identity may call (the listener already requires a
certificate of the trust domain). Policies select it: ALLOW rules, one Envoy policy per rule that
applies to the port; anything else is denied (HTTP 403; on a TCP port the connection is closed). A
rule naming paths or methods cannot apply to a TCP port.

On an HTTP port the RBAC filter sits in the inbound connection manager without rules of its own
(``http_filter``); the rules are the per-route configuration of the inbound route (``per_route``,
in RDS: xds.generate.routes.generate_inbound), so that a policy change reaches the next request on
every open connection. In the listener it would reach new connections only: Envoy drains the old
ones with the old filter chain, and a revoked caller kept its access on them (the data-path test
measured 23 s; up to the drain time, 600 s by default).

On a TCP port the network RBAC filter decides at the connection's first bytes, after tcp_proxy has
connected to the app: a server-first app (a greeting, as MySQL or SMTP send) would answer a denied
caller, and every app would see its connections. So a TCP port's TLS handshake itself accepts only
the allowed callers' certificates (``tcp_peers``), and its tcp_proxy connects to the app only once
the handshake is done: a denied caller never reaches the app (found by the data-path test).
"""

from __future__ import annotations

import re
from typing import Any

from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.type.matcher.v3 import path_pb2, regex_pb2, string_pb2

from isthmus.discovery.model import AllowRule, AuthorizationPolicy, Caller, MeshView, Service, ServicePort
from isthmus.xds.generate.identity import MeshIdentity
from isthmus.xds.generate.tls import pack
from isthmus.xds.proxy import Proxy

HTTP_RBAC = "envoy.filters.http.rbac"
NETWORK_RBAC = "envoy.filters.network.rbac"


def selecting(view: MeshView, proxy: Proxy) -> tuple[AuthorizationPolicy, ...]:
    return view.policies.get((proxy.namespace, proxy.service_account), ())


def caller_match(caller: Caller, trust_domain: str) -> Any:
    """The SPIFFE IDs a Caller stands for, as a StringMatcher of a URI SAN."""
    base = f"spiffe://{trust_domain}/"
    if caller.namespace == "*" and caller.service_account == "*":
        match = string_pb2.StringMatcher(prefix=base)
    elif caller.service_account == "*":
        match = string_pb2.StringMatcher(prefix=f"{base}ns/{caller.namespace}/sa/")
    elif caller.namespace == "*":
        pattern = f"^{re.escape(base)}ns/[^/]+/sa/{re.escape(caller.service_account)}$"
        match = string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=pattern))
    else:
        match = string_pb2.StringMatcher(exact=f"{base}ns/{caller.namespace}/sa/{caller.service_account}")
    return match


def principal(caller: Caller, trust_domain: str) -> Any:
    """The SPIFFE IDs a Caller stands for, as a match on the peer certificate's URI SAN."""
    match = caller_match(caller, trust_domain)
    return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(principal_name=match))


def _path(path: str, regex: bool) -> Any:
    if regex:
        match = string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=path))
    elif path.endswith("*"):
        match = string_pb2.StringMatcher(prefix=path[:-1])
    else:
        match = string_pb2.StringMatcher(exact=path)
    return rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=match))


def _method(method: str) -> Any:
    exact = string_pb2.StringMatcher(exact=method)
    header = route_components_pb2.HeaderMatcher(name=":method", string_match=exact)
    return rbac_pb2.Permission(header=header)


def _any_of(items: list[Any], wrap: str) -> Any:
    if len(items) == 1:
        return items[0]
    if wrap == "principal":
        return rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=items))
    return rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=items))


def permission(rule: AllowRule) -> Any:
    parts = []
    if rule.paths:
        parts.append(_any_of([_path(p, rule.regex) for p in rule.paths], "permission"))
    if rule.methods:
        parts.append(_any_of([_method(m.upper()) for m in rule.methods], "permission"))
    if not parts:
        return rbac_pb2.Permission(any=True)
    if len(parts) == 1:
        return parts[0]
    return rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=parts))


def _applying(
    policies: tuple[AuthorizationPolicy, ...], port: ServicePort
) -> list[tuple[AuthorizationPolicy, int, AllowRule]]:
    """The rules that apply to the port: (policy, index in its rules, rule)."""
    out = []
    for policy in policies:
        for i, rule in enumerate(policy.rules):
            if rule.ports and port.port not in rule.ports:
                continue
            if not port.protocol.is_http and (rule.paths or rule.methods):
                continue  # HTTP conditions cannot hold on a TCP connection
            out.append((policy, i, rule))
    return out


def tcp_peers(view: MeshView, proxy: Proxy, port: ServicePort, identity: MeshIdentity) -> list[Any] | None:
    """For a TCP port: the URI SAN matchers its TLS handshake accepts, one per allowed caller (a
    matcher of no identity when none is allowed), or None when no policy selects the workload."""
    policies = selecting(view, proxy)
    if not policies or port.protocol.is_http:
        return None
    found: dict[bytes, Any] = {}
    for _, _, rule in _applying(policies, port):
        for caller in rule.callers or (Caller(),):
            match = caller_match(caller, identity.trust_domain)
            found.setdefault(match.SerializeToString(deterministic=True), match)
    # RE2: a letter before the start of the text: no URI SAN matches.
    return list(found.values()) or [string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex="a^"))]


def rbac(view: MeshView, proxy: Proxy, port: ServicePort, identity: MeshIdentity) -> Any | None:
    """The RBAC of one inbound port, or None when no policy selects the workload."""
    policies = selecting(view, proxy)
    if not policies:
        return None
    out = rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW)
    http = port.protocol.is_http
    for policy, i, rule in _applying(policies, port):
        callers = [principal(c, identity.trust_domain) for c in rule.callers]
        who = _any_of(callers, "principal") if callers else principal(Caller(), identity.trust_domain)
        name = f"{policy.kind}/{policy.namespace}/{policy.name}[{i}]"
        what = permission(rule) if http else rbac_pb2.Permission(any=True)
        out.policies[name].CopyFrom(rbac_pb2.Policy(permissions=[what], principals=[who]))
    return out


def per_route(rules: Any) -> Any:
    """The RBAC filter's configuration of one inbound route (xds.generate.routes.generate_inbound)."""
    return pack(http_rbac_pb2.RBACPerRoute(rbac=http_rbac_pb2.RBAC(rules=rules)))


def http_filter(
    view: MeshView, proxy: Proxy, service: Service, port: ServicePort, identity: MeshIdentity
) -> Any | None:
    """On every inbound HTTP port, without rules of its own: the inbound route's per-route
    configuration (``per_route``) carries the policies, so the listener does not change with them."""
    return hcm.HttpFilter(name=HTTP_RBAC, typed_config=pack(http_rbac_pb2.RBAC()))


def network_filter(view: MeshView, proxy: Proxy, port: ServicePort, identity: MeshIdentity) -> Any | None:
    """For a TCP port: the connection is closed unless a rule allows its caller."""
    rules = rbac(view, proxy, port, identity)
    if rules is None:
        return None
    config = network_rbac_pb2.RBAC(rules=rules, stat_prefix=f"inbound_{port.port}_rbac")
    return listener_components_pb2.Filter(name=NETWORK_RBAC, typed_config=pack(config))
