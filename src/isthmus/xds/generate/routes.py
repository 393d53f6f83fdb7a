"""RDS: the sidecar's outbound route table, one virtual host per HTTP service port, matched by Host.

A service with routes attached (discovery.model.ServiceRoute: GAMMA HTTPRoutes and GRPCRoutes, and
SMI TrafficSplits translated) routes by their rules, in Gateway API precedence order: matches on
path, headers, query and method; weighted backends (each balanced by its own EDS, so backends may
live in any member cluster); header edits, redirects, rewrites, mirrors, timeouts and retries. A
request no rule matches gets 404; a backend that cannot be used gets its share 500. A service with
no route sends everything to itself.

Short names (``web``) resolve in the proxy's own namespace only, as Kubernetes DNS
does. For a captured proxy, a service's ClusterIPs in its member cluster and its clusterset IP are
names too (a captured client that calls an address sends it as Host); an uncaptured one reaches
services by name only, and its route table is the same in every member cluster. A Host without a
port means port 80 if the service has it, else its first HTTP port.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import previous_priorities_config_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from isthmus.discovery.model import (
    Backend,
    HeaderEdits,
    MeshView,
    PathType,
    Redirect,
    RouteMatch,
    RouteRule,
    Service,
    ServicePort,
    ServiceRoute,
)
from isthmus.xds import naming
from isthmus.xds.generate.http_filters import authorization
from isthmus.xds.generate.identity import PLAINTEXT, MeshIdentity
from isthmus.xds.generate.tls import pack
from isthmus.xds.proxy import Proxy, Role

REQUEST_TIMEOUT_S = 15
# Retries (docs/resilience.md): failures where the request most likely never reached an application
# (connect failure, reset, refused stream, and 503 from the far sidecar when its app is gone) are
# retried on another host, and preferably in another priority, so a failing locality costs few
# requests while outlier detection ejects it.
RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,reset,retriable-status-codes"
RETRIABLE_STATUS_CODES = (503,)
NUM_RETRIES = 2
HOST_SELECTION_ATTEMPTS = 5


def empty(name: str) -> Any:
    return route_pb2.RouteConfiguration(name=name)


def _portless_port(service: Service) -> ServicePort | None:
    http = [p for p in service.ports if p.protocol.is_http]
    if not http:
        return None
    return next((p for p in http if p.port == 80), http[0])


def retry_policy() -> Any:
    return route_components_pb2.RetryPolicy(
        retry_on=RETRY_ON,
        num_retries=wrappers_pb2.UInt32Value(value=NUM_RETRIES),
        retriable_status_codes=RETRIABLE_STATUS_CODES,
        retry_host_predicate=[
            route_components_pb2.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate()),
            )
        ],
        host_selection_retry_max_attempts=HOST_SELECTION_ATTEMPTS,
        retry_priority=route_components_pb2.RetryPolicy.RetryPriority(
            name="envoy.retry_priorities.previous_priorities",
            typed_config=pack(previous_priorities_config_pb2.PreviousPrioritiesConfig(update_frequency=2)),
        ),
    )


# ---- the routing model (discovery.model.ServiceRoute) -> Envoy routes -----------------------

REDIRECT_CODES = {
    301: route_components_pb2.RedirectAction.MOVED_PERMANENTLY,
    302: route_components_pb2.RedirectAction.FOUND,
    303: route_components_pb2.RedirectAction.SEE_OTHER,
    307: route_components_pb2.RedirectAction.TEMPORARY_REDIRECT,
    308: route_components_pb2.RedirectAction.PERMANENT_REDIRECT,
}
_PATH_RANK = {PathType.EXACT: 0, PathType.REGEX: 1, PathType.PREFIX: 2}


def attached(view: MeshView, proxy: Proxy, service: Service) -> tuple[ServiceRoute, ...]:
    """The routes of ``service`` that apply to ``proxy``'s requests: the consumer routes of the
    proxy's namespace if there are any, else the producer routes (GEP-1294)."""
    routes = view.routes.get(service.key, ())
    mine = tuple(r for r in routes if r.consumer and r.namespace == proxy.namespace)
    return mine or tuple(r for r in routes if not r.consumer)


def backend_cluster(view: MeshView, backend: Backend, parent: ServicePort) -> str | None:
    """The Envoy cluster of a backendRef: the backend service's port of that number (of the
    parent's number if none is given, else its first HTTP port); None if there is no such port."""
    service = view.services.get(backend.service)
    if service is None:
        return None
    number = backend.port or parent.port
    same = next((p for p in service.ports if p.port == number and p.protocol.is_http), None)
    chosen = same or (_portless_port(service) if not backend.port else None)
    return naming.outbound_cluster(service, chosen) if chosen is not None else None


def _string(value: str, regex: bool) -> Any:
    if regex:
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=value))
    return string_pb2.StringMatcher(exact=value)


def route_match(match: RouteMatch) -> Any:
    out = route_components_pb2.RouteMatch()
    if match.path_type is PathType.EXACT:
        out.path = match.path
    elif match.path_type is PathType.REGEX:
        out.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=match.path))
    elif match.path.rstrip("/"):
        out.path_separated_prefix = match.path.rstrip("/")
    else:
        out.prefix = "/"
    for header in match.headers:
        out.headers.append(
            route_components_pb2.HeaderMatcher(
                name=header.name, string_match=_string(header.value, header.regex)
            )
        )
    if match.method:
        out.headers.append(
            route_components_pb2.HeaderMatcher(name=":method", string_match=_string(match.method, False))
        )
    for param in match.query:
        out.query_parameters.append(
            route_components_pb2.QueryParameterMatcher(
                name=param.name, string_match=_string(param.value, param.regex)
            )
        )
    return out


def _header_options(edits: HeaderEdits) -> list[Any]:
    keep = base_pb2.HeaderValueOption
    return [
        keep(header=base_pb2.HeaderValue(key=k, value=v), append_action=keep.OVERWRITE_IF_EXISTS_OR_ADD)
        for k, v in edits.set
    ] + [
        keep(header=base_pb2.HeaderValue(key=k, value=v), append_action=keep.APPEND_IF_EXISTS_OR_ADD)
        for k, v in edits.add
    ]


def _replace_prefix(out: Any, match: RouteMatch, replacement: str) -> None:
    """Gateway API ReplacePrefixMatch on ``out`` (a RouteAction or RedirectAction): the matched
    prefix's path elements are replaced, one slash between the replacement and the rest (prefix
    /foo, replacement /xyz or /xyz/: /foo/bar -> /xyz/bar; replacement /: /foo/bar -> /bar, /foo
    -> /). Envoy's prefix_rewrite replaces characters, which is that only when the replacement
    does not end in a slash and the prefix is not /."""
    prefix, base = match.path.rstrip("/"), replacement.rstrip("/")
    if base and prefix:
        out.prefix_rewrite = base
        return
    # The prefix and the slashes after it, replaced by the base and one slash.
    out.regex_rewrite.CopyFrom(
        regex_pb2.RegexMatchAndSubstitute(
            pattern=regex_pb2.RegexMatcher(regex=f"^{re.escape(prefix)}/*"), substitution=f"{base}/"
        )
    )


def _redirect(redirect: Redirect, match: RouteMatch) -> Any:
    out = route_components_pb2.RedirectAction(response_code=REDIRECT_CODES.get(redirect.status, 0))
    if redirect.scheme:
        out.scheme_redirect = redirect.scheme
    if redirect.hostname:
        out.host_redirect = redirect.hostname
    if redirect.port:
        out.port_redirect = redirect.port
    if redirect.path is not None:
        if redirect.prefix:
            _replace_prefix(out, match, redirect.path)
        else:
            out.path_redirect = redirect.path
    return out


def _millis(ms: int) -> Any:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def _action(view: MeshView, parent: ServicePort, match: RouteMatch, rule: RouteRule) -> Any:
    """Where a rule's requests go: its backends by weight (an unusable backend's share gets 500,
    or, for a lenient rule, it is left out), with the rule's rewrites, mirrors, timeouts, retries."""
    action = route_components_pb2.RouteAction(
        timeout=duration_pb2.Duration(seconds=REQUEST_TIMEOUT_S), retry_policy=retry_policy()
    )
    weighted: list[tuple[str, int]] = []
    for backend in rule.backends:
        cluster = backend_cluster(view, backend, parent)
        if cluster is None and rule.lenient:
            continue
        weighted.append((cluster or naming.NO_CLUSTER, backend.weight))
    weighted = [(c, w) for c, w in weighted if w > 0]
    action.cluster_not_found_response_code = route_components_pb2.RouteAction.INTERNAL_SERVER_ERROR
    if not weighted or rule.broken:
        action.cluster = naming.NO_CLUSTER  # no usable backend: 500
    elif len(weighted) == 1 and not rule.lenient:
        action.cluster = weighted[0][0]
    else:
        action.weighted_clusters.CopyFrom(
            route_components_pb2.WeightedCluster(
                clusters=[
                    route_components_pb2.WeightedCluster.ClusterWeight(
                        name=cluster, weight=wrappers_pb2.UInt32Value(value=weight)
                    )
                    for cluster, weight in weighted
                ]
            )
        )
    if rule.rewrite is not None:
        if rule.rewrite.hostname:
            action.host_rewrite_literal = rule.rewrite.hostname
        if rule.rewrite.path is not None:
            if rule.rewrite.prefix:
                _replace_prefix(action, match, rule.rewrite.path)
            else:
                action.regex_rewrite.CopyFrom(
                    regex_pb2.RegexMatchAndSubstitute(
                        pattern=regex_pb2.RegexMatcher(regex="^/.*$"), substitution=rule.rewrite.path
                    )
                )
    for backend, percent in rule.mirrors:
        cluster = backend_cluster(view, backend, parent)
        if cluster is None:
            continue
        mirror = route_components_pb2.RouteAction.RequestMirrorPolicy(cluster=cluster)
        if percent < 100:
            mirror.runtime_fraction.default_value.CopyFrom(
                percent_pb2.FractionalPercent(
                    numerator=round(percent * 10_000), denominator=percent_pb2.FractionalPercent.MILLION
                )
            )
        action.request_mirror_policies.append(mirror)
    if rule.timeout_ms is not None:
        action.timeout.CopyFrom(_millis(rule.timeout_ms))
    if rule.retry is not None:
        action.retry_policy.num_retries.value = rule.retry.attempts
        if rule.retry.codes:
            action.retry_policy.retriable_status_codes[:] = rule.retry.codes
        if rule.retry.backoff_ms:
            action.retry_policy.retry_back_off.base_interval.CopyFrom(_millis(rule.retry.backoff_ms))
    if rule.backend_timeout_ms is not None:
        action.retry_policy.per_try_timeout.CopyFrom(_millis(rule.backend_timeout_ms))
    return action


def envoy_route(view: MeshView, parent: ServicePort, match: RouteMatch, rule: RouteRule) -> Any:
    route = route_components_pb2.Route(match=route_match(match))
    if rule.redirect is not None:
        route.redirect.CopyFrom(_redirect(rule.redirect, match))
    else:
        route.route.CopyFrom(_action(view, parent, match, rule))
    if rule.request_headers is not None:
        route.request_headers_to_add.extend(_header_options(rule.request_headers))
        route.request_headers_to_remove.extend(rule.request_headers.remove)
    if rule.response_headers is not None:
        route.response_headers_to_add.extend(_header_options(rule.response_headers))
        route.response_headers_to_remove.extend(rule.response_headers.remove)
    return route


def _order(match: RouteMatch, route: ServiceRoute, index: int) -> tuple[Any, ...]:
    """Gateway API precedence across every rule of a service's routes: an exact path, then a
    regular expression, then the longest prefix; then a method match; then the most header
    matches, the most query matches; then the oldest route, by namespace/name, and rule order."""
    length = -len(match.path.rstrip("/")) if match.path_type is PathType.PREFIX else 0
    return (
        _PATH_RANK[match.path_type],
        length,
        not match.method,
        -len(match.headers),
        -len(match.query),
        route.precedence,
        index,
    )


def service_routes(
    view: MeshView, service: Service, port: ServicePort, routes: tuple[ServiceRoute, ...]
) -> list[Any]:
    """The Envoy routes of one service port: its routes' rules in precedence order (a request
    no rule matches gets 404), or, with no route attached, everything to the service itself."""
    rules = [
        (_order(match, route, index), match, rule)
        for route in routes
        if route.port in (0, port.port)
        for index, rule in enumerate(route.rules)
        for match in rule.matches
    ]
    if not rules:
        action = route_components_pb2.RouteAction(
            cluster=naming.outbound_cluster(service, port),
            timeout=duration_pb2.Duration(seconds=REQUEST_TIMEOUT_S),
            retry_policy=retry_policy(),
        )
        return [route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix="/"), route=action)]
    rules.sort(key=lambda entry: entry[0])
    return [envoy_route(view, port, match, rule) for _, match, rule in rules]


def virtual_host(service: Service, port: ServicePort, domains: list[str], routes: list[Any]) -> Any:
    return route_components_pb2.VirtualHost(
        name=f"{naming.service_fqdn(service)}:{port.port}", domains=domains, routes=routes
    )


def outbound_routes(view: MeshView, proxy: Proxy) -> Any:
    config = route_pb2.RouteConfiguration(name=naming.OUTBOUND_HTTP_ROUTE)
    seen: set[str] = set()
    for service in view.services.values():
        portless = _portless_port(service)
        for port in service.ports:
            if not port.protocol.is_http:
                continue
            hosts = naming.host_names(
                service,
                port,
                short=service.namespace == proxy.namespace,
                portless=port is portless,
                addresses=service.reachable_at(proxy.cluster) if proxy.capture else (),
            )
            domains = [h for h in hosts if h not in seen]
            seen.update(domains)
            if domains:
                routes = service_routes(view, service, port, attached(view, proxy, service))
                config.virtual_hosts.append(virtual_host(service, port, domains, routes))
    return config


def generate_outbound(view: MeshView, proxy: Proxy, identity: MeshIdentity = PLAINTEXT) -> dict[str, Any]:
    """The outbound route table, alike for every sidecar of a namespace (and cluster, if captured)."""
    if proxy.role is not Role.SIDECAR:
        return {}
    config = outbound_routes(view, proxy)
    return {config.name: config}


def generate_inbound(view: MeshView, proxy: Proxy, identity: MeshIdentity = PLAINTEXT) -> dict[str, Any]:
    """With mTLS, a sidecar's inbound routes: one route table per HTTP port of its own service
    (named as its inbound cluster), everything to the application, with the authorization of the
    policies that select its service account as the RBAC filter's per-route configuration. Here,
    not in the listener, so that a policy change is an RDS update that applies to the next request
    on every connection, where a listener change would apply only to new connections (the old ones
    drain with the old filter chain)."""
    own = view.service(proxy.namespace, proxy.service)
    if proxy.role is not Role.SIDECAR or not identity.mtls or own is None:
        return {}
    out = {}
    for port in own.ports:
        if not port.protocol.is_http:
            continue
        name = naming.inbound_cluster(port)
        route = route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/"),
            route=route_components_pb2.RouteAction(cluster=name),
        )
        rules = authorization.rbac(view, proxy, port, identity)
        if rules is not None:
            route.typed_per_filter_config[authorization.HTTP_RBAC].CopyFrom(authorization.per_route(rules))
        host = route_components_pb2.VirtualHost(name=name, domains=["*"], routes=[route])
        out[name] = route_pb2.RouteConfiguration(name=name, virtual_hosts=[host])
    return out


def generate(view: MeshView, proxy: Proxy, identity: MeshIdentity = PLAINTEXT) -> dict[str, Any]:
    return {**generate_outbound(view, proxy, identity), **generate_inbound(view, proxy, identity)}


def inputs(service: Service | None) -> Hashable:
    """What outbound RDS reads of a service (see generate.INPUTS): that it exists, its ports and
    addresses."""
    return None if service is None else (service.ports, service.addresses, service.vip)


def own_inputs(service: Service | None, proxy: Proxy) -> Hashable:
    """What inbound RDS reads of the proxy's own service: its ports."""
    return None if service is None else service.ports
