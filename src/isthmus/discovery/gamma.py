"""Gateway API routes for the mesh (GAMMA): HTTPRoute and GRPCRoute objects whose parentRef is a
Service, read into the routing model (discovery.model.ServiceRoute).

One reader for both sources: discovery.kube hands it the objects its watches hold, the file source
the ones a mesh file lists, in the same shape (gateway.networking.k8s.io/v1). A parentRef that is
not a Service (a Gateway: north-south, not ours) is ignored. What the model cannot carry is refused
here, with the Gateway API's reason, so that it never reaches Envoy: a route with a regular
expression RE2 rejects, a filter isthmus does not implement, or a malformed field is not Accepted
(the whole route, as the specification asks). A backend that does not exist is not known here: the
generator gives its share of requests 500, and the route status says so (ResolvedRefs).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import re2

from isthmus.discovery.model import (
    Backend,
    HeaderEdits,
    PathType,
    Redirect,
    Retry,
    Rewrite,
    RouteMatch,
    RouteRule,
    ServiceKey,
    ServiceRoute,
    ValueMatch,
)

KINDS = ("HTTPRoute", "GRPCRoute")
_RE2 = re2.Options()
_RE2.log_errors = False  # the route's status says what is wrong
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?$")


class RouteError(ValueError):
    """Why a route is not Accepted: the Gateway API reason and a message for its status."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Parent:
    """A parentRef to a Service: the service, and the port it names (0: every port)."""

    service: ServiceKey
    port: int = 0
    section: str = ""


@dataclass(frozen=True, slots=True)
class ReadRoute:
    """One route object as read: the routes it attaches (one per Service parent), its Service
    parents, and why it is not Accepted ("" when it is; then ``routes`` is empty)."""

    kind: str
    namespace: str
    name: str
    parents: tuple[Parent, ...]
    routes: tuple[ServiceRoute, ...]
    reason: str = ""
    message: str = ""
    generation: int = 0


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RouteError("UnsupportedValue", f"{where} must be a list")
    return value


def _map(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RouteError("UnsupportedValue", f"{where} must be an object")
    return value


def _regex(value: str, where: str) -> str:
    try:
        re2.compile(value, options=_RE2)
    except re2.error as exc:
        why = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise RouteError(
            "UnsupportedValue", f"{where}: {value!r} is not an RE2 regular expression: {why}"
        ) from exc
    return value


def duration_ms(value: Any, where: str) -> int:
    """A Gateway API duration ("1h", "2m30s", "500ms"; GEP-2257) in milliseconds."""
    found = _DURATION.match(value) if isinstance(value, str) and value else None
    if found is None or not any(found.groups()):
        raise RouteError("UnsupportedValue", f"{where}: {value!r} is not a duration such as 10s or 500ms")
    h, m, s, ms = (int(g) if g else 0 for g in found.groups())
    return ((h * 60 + m) * 60 + s) * 1000 + ms


def _values(raw: Any, where: str, header: bool = False) -> tuple[ValueMatch, ...]:
    """Header (names case-insensitive, kept lower-case) or query parameter matches."""
    out = []
    for i, item in enumerate(_list(raw, where)):
        item = _map(item, f"{where}[{i}]")
        name, value, kind = item.get("name"), item.get("value"), item.get("type", "Exact")
        if not isinstance(name, str) or not name or not isinstance(value, str):
            raise RouteError("UnsupportedValue", f"{where}[{i}] needs a name and a value")
        if kind not in ("Exact", "RegularExpression"):
            raise RouteError("UnsupportedValue", f"{where}[{i}].type {kind!r} is not supported")
        regex = kind == "RegularExpression"
        value = _regex(value, f"{where}[{i}].value") if regex else value
        out.append(ValueMatch(name.lower() if header else name, value, regex))
    return tuple(out)


def _http_match(raw: Mapping[str, Any], where: str) -> RouteMatch:
    path = _map(raw.get("path"), f"{where}.path")
    kind, value = path.get("type", "PathPrefix"), path.get("value", "/")
    try:
        path_type = PathType(kind)
    except ValueError:
        raise RouteError("UnsupportedValue", f"{where}.path.type {kind!r} is not supported") from None
    if not isinstance(value, str) or (path_type is not PathType.REGEX and not value.startswith("/")):
        raise RouteError("UnsupportedValue", f"{where}.path.value must be a path starting with /")
    if path_type is PathType.REGEX:
        _regex(value, f"{where}.path")
    method = raw.get("method", "")
    if not isinstance(method, str):
        raise RouteError("UnsupportedValue", f"{where}.method must be a string")
    return RouteMatch(
        value,
        path_type,
        _values(raw.get("headers"), f"{where}.headers", header=True),
        _values(raw.get("queryParams"), f"{where}.queryParams"),
        method.upper(),
    )


def _grpc_match(raw: Mapping[str, Any], where: str) -> RouteMatch:
    """GRPCRoute's method match, as the path gRPC requests carry (/package.Service/Method)."""
    method = _map(raw.get("method"), f"{where}.method")
    kind, service, name = method.get("type", "Exact"), method.get("service", ""), method.get("method", "")
    headers = _values(raw.get("headers"), f"{where}.headers", header=True)
    if kind == "RegularExpression":
        service_re = _regex(service, f"{where}.method.service") if service else "[^/]+"
        name_re = _regex(name, f"{where}.method.method") if name else "[^/]+"
        return RouteMatch(f"/{service_re}/{name_re}", PathType.REGEX, headers)
    if kind != "Exact":
        raise RouteError("UnsupportedValue", f"{where}.method.type {kind!r} is not supported")
    if service and name:
        return RouteMatch(f"/{service}/{name}", PathType.EXACT, headers)
    if service:
        return RouteMatch(f"/{service}", PathType.PREFIX, headers)
    if name:
        return RouteMatch(f"/[^/]+/{re2.escape(name)}", PathType.REGEX, headers)
    return RouteMatch("/", PathType.PREFIX, headers)


def _backend(
    raw: Any, namespace: str, where: str, parents: frozenset[ServiceKey] = frozenset()
) -> tuple[Backend, str]:
    """A backendRef and why it cannot be used ("" if it can, as far as this object tells). A
    service of another namespace may be named only if it is one of the route's parents (a consumer
    route sending its namespace's calls on to the service they were for: GEP-1294); any other needs
    a ReferenceGrant, which isthmus does not read."""
    raw = _map(raw, where)
    name, port, weight = raw.get("name"), raw.get("port", 0), raw.get("weight", 1)
    if not isinstance(name, str) or not name:
        raise RouteError("UnsupportedValue", f"{where} needs a name")
    if not isinstance(port, int) or not isinstance(weight, int) or weight < 0:
        raise RouteError("UnsupportedValue", f"{where}: port and weight must be numbers (weight >= 0)")
    target = raw.get("namespace", namespace)
    backend = Backend(ServiceKey(str(target), name), port, weight)
    if raw.get("group", "") not in ("", "core") or raw.get("kind", "Service") != "Service":
        return backend, f"InvalidKind: {where} is not a Service"
    if target != namespace and backend.service not in parents:
        return backend, f"RefNotPermitted: {where} is in namespace {target!r}"
    return backend, ""


def _edits(raw: Any, where: str) -> HeaderEdits:
    raw = _map(raw, where)

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for i, item in enumerate(_list(raw.get(key), f"{where}.{key}")):
            item = _map(item, f"{where}.{key}[{i}]")
            if not isinstance(item.get("name"), str) or not isinstance(item.get("value"), str):
                raise RouteError("UnsupportedValue", f"{where}.{key}[{i}] needs a name and a value")
            out.append((item["name"], item["value"]))
        return tuple(out)

    remove = _list(raw.get("remove"), f"{where}.remove")
    if not all(isinstance(r, str) for r in remove):
        raise RouteError("UnsupportedValue", f"{where}.remove must list header names")
    return HeaderEdits(pairs("set"), pairs("add"), tuple(remove))


def _path_modifier(raw: Any, where: str) -> tuple[str | None, bool]:
    raw = _map(raw, where)
    if not raw:
        return None, False
    kind = raw.get("type")
    if kind == "ReplaceFullPath" and isinstance(raw.get("replaceFullPath"), str):
        return raw["replaceFullPath"], False
    if kind == "ReplacePrefixMatch" and isinstance(raw.get("replacePrefixMatch"), str):
        return raw["replacePrefixMatch"], True
    raise RouteError("UnsupportedValue", f"{where}: {kind!r} with its value is needed")


def _rule(
    kind: str,
    raw: Mapping[str, Any],
    namespace: str,
    where: str,
    parents: frozenset[ServiceKey] = frozenset(),
) -> RouteRule:
    matches = tuple(
        (_grpc_match if kind == "GRPCRoute" else _http_match)(
            _map(m, f"{where}.matches[{i}]"), f"{where}.matches[{i}]"
        )
        for i, m in enumerate(_list(raw.get("matches"), f"{where}.matches"))
    ) or (RouteMatch(),)
    backends, broken = [], []
    for i, ref in enumerate(_list(raw.get("backendRefs"), f"{where}.backendRefs")):
        backend, why = _backend(ref, namespace, f"{where}.backendRefs[{i}]", parents)
        if _list(_map(ref, "").get("filters"), f"{where}.backendRefs[{i}].filters"):
            raise RouteError("UnsupportedValue", f"{where}.backendRefs[{i}].filters are not supported")
        backends.append(backend)
        if why:
            broken.append(why)
    fields: dict[str, Any] = {}
    mirrors: list[tuple[Backend, float]] = []
    for i, raw_filter in enumerate(_list(raw.get("filters"), f"{where}.filters")):
        here = f"{where}.filters[{i}]"
        item = _map(raw_filter, here)
        ftype = item.get("type")
        if ftype == "RequestHeaderModifier":
            fields["request_headers"] = _edits(item.get("requestHeaderModifier"), here)
        elif ftype == "ResponseHeaderModifier":
            fields["response_headers"] = _edits(item.get("responseHeaderModifier"), here)
        elif ftype == "RequestRedirect" and kind == "HTTPRoute":
            spec = _map(item.get("requestRedirect"), here)
            path, prefix = _path_modifier(spec.get("path"), f"{here}.path")
            status = spec.get("statusCode", 302)
            if status not in (301, 302, 303, 307, 308):
                raise RouteError("UnsupportedValue", f"{here}.statusCode {status!r} is not a redirect")
            fields["redirect"] = Redirect(
                str(spec.get("scheme", "") or ""),
                str(spec.get("hostname", "") or ""),
                int(spec.get("port", 0) or 0),
                path,
                prefix,
                status,
            )
        elif ftype == "URLRewrite" and kind == "HTTPRoute":
            spec = _map(item.get("urlRewrite"), here)
            path, prefix = _path_modifier(spec.get("path"), f"{here}.path")
            fields["rewrite"] = Rewrite(str(spec.get("hostname", "") or ""), path, prefix)
        elif ftype == "RequestMirror":
            spec = _map(item.get("requestMirror"), here)
            backend, why = _backend(spec.get("backendRef"), namespace, f"{here}.backendRef", parents)
            if why:
                raise RouteError(why.split(":", 1)[0], why.split(": ", 1)[1])
            percent = 100.0
            if "percent" in spec:
                percent = float(spec["percent"])
            elif "fraction" in spec:
                fraction = _map(spec["fraction"], f"{here}.fraction")
                percent = (
                    100.0
                    * float(fraction.get("numerator", 0))
                    / float(fraction.get("denominator", 100) or 100)
                )
            mirrors.append((backend, max(0.0, min(100.0, percent))))
        else:
            raise RouteError("UnsupportedValue", f"{here}: filter {ftype!r} is not supported by isthmus")
    timeouts = _map(raw.get("timeouts"), f"{where}.timeouts")
    if "request" in timeouts:
        fields["timeout_ms"] = duration_ms(timeouts["request"], f"{where}.timeouts.request")
    if "backendRequest" in timeouts:
        fields["backend_timeout_ms"] = duration_ms(
            timeouts["backendRequest"], f"{where}.timeouts.backendRequest"
        )
    retry = _map(raw.get("retry"), f"{where}.retry")
    if retry:
        attempts, codes = retry.get("attempts", 1), _list(retry.get("codes"), f"{where}.retry.codes")
        if not isinstance(attempts, int) or attempts < 0 or not all(isinstance(c, int) for c in codes):
            raise RouteError("UnsupportedValue", f"{where}.retry: attempts and codes must be numbers")
        backoff = duration_ms(retry["backoff"], f"{where}.retry.backoff") if "backoff" in retry else 0
        fields["retry"] = Retry(attempts, tuple(codes), backoff)
    prefixed = [
        f for f in ("redirect", "rewrite") if f in fields and fields[f].path is not None and fields[f].prefix
    ]
    if prefixed and any(m.path_type is not PathType.PREFIX for m in matches):
        raise RouteError("UnsupportedValue", f"{where}: ReplacePrefixMatch needs PathPrefix matches")
    if "redirect" in fields and backends:
        raise RouteError("UnsupportedValue", f"{where}: a redirect rule has no backendRefs")
    return RouteRule(matches, tuple(backends), mirrors=tuple(mirrors), broken="; ".join(broken), **fields)


def parents(obj: Mapping[str, Any]) -> tuple[Parent, ...]:
    """The object's parentRefs that are Services (kind Service, core group)."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    namespace = str(meta.get("namespace") or "default")
    out = []
    for ref in spec.get("parentRefs") or () if isinstance(spec, Mapping) else ():
        if (
            not isinstance(ref, Mapping)
            or ref.get("kind") != "Service"
            or ref.get("group", "") not in ("", "core")
        ):
            continue
        if not isinstance(ref.get("name"), str):
            continue
        port = ref.get("port", 0)
        out.append(
            Parent(
                ServiceKey(str(ref.get("namespace") or namespace), ref["name"]),
                port if isinstance(port, int) else 0,
                str(ref.get("sectionName", "") or ""),
            )
        )
    return tuple(out)


def read(obj: Mapping[str, Any], cluster: str = "") -> ReadRoute:
    """One HTTPRoute or GRPCRoute, as the routes it attaches to Services (none if it has no
    Service parent, or is not Accepted)."""
    kind = str(obj.get("kind", "HTTPRoute"))
    meta = _map(obj.get("metadata"), "metadata")
    namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
    generation = meta.get("generation", 0)
    found = parents(obj)
    services = frozenset(p.service for p in found)
    generation = generation if isinstance(generation, int) else 0
    try:
        if kind not in KINDS:
            raise RouteError("UnsupportedValue", f"kind {kind!r} is not a mesh route")
        spec = _map(obj.get("spec"), "spec")
        rules = tuple(
            _rule(kind, _map(r, f"spec.rules[{i}]"), namespace, f"spec.rules[{i}]", services)
            for i, r in enumerate(_list(spec.get("rules"), "spec.rules"))
        ) or (_rule(kind, {}, namespace, "spec.rules[0]", services),)
        if any(p.section for p in found):
            raise RouteError("UnsupportedValue", "parentRefs[].sectionName is not supported for Services")
    except RouteError as exc:
        return ReadRoute(kind, namespace, name, found, (), exc.reason, str(exc), generation)
    created = str(meta.get("creationTimestamp") or "")
    routes = tuple(
        ServiceRoute(kind, namespace, name, p.service, p.port, rules, created, cluster) for p in found
    )
    return ReadRoute(kind, namespace, name, found, routes, generation=generation)


def read_all(objects: Sequence[Mapping[str, Any]], cluster: str = "") -> tuple[ReadRoute, ...]:
    return tuple(read(obj, cluster) for obj in objects)
