"""Authorization policies read into the model (discovery.model.AuthorizationPolicy): isthmus's own
AuthorizationPolicy (isthmus.io/v1alpha1, api/protos/isthmus/api/v1alpha1/authorization.proto) and
SMI's TrafficTarget (access.smi-spec.io/v1alpha3, with the HTTPRouteGroups and TCPRoutes its
rules name), translated. One reader for both sources: discovery.kube hands it the objects its
watches hold, the file source its ``authorization_policies`` (the spec's fields, in either JSON
case). A policy that is malformed is refused whole, with the reason; it is never half applied.

Semantics (docs/authorization.md): no policy selecting a workload allows every mesh identity; a
policy allows only what its rules say. A TrafficTarget allows its sources (service accounts) to
call its destination's workloads on what its rules' HTTPRouteGroup matches (methods, path regular
expressions) and TCPRoute ports list; a rule naming something that does not exist allows nothing.
A refused policy fails closed where its selector still reads (``denying``): its workloads may be
called by nobody until it is mended.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import re2
from google.protobuf import json_format

from isthmus.api.v1alpha1 import authorization_pb2
from isthmus.discovery.model import AllowRule, AuthorizationPolicy, Caller

KIND = "AuthorizationPolicy"
TRAFFIC_TARGET = "TrafficTarget"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")  # Kubernetes object names (RFC 1123)
_RE2 = re2.Options()
_RE2.log_errors = False


class PolicyError(ValueError):
    """Why a policy is refused (its log line says so)."""


def _name(value: str, where: str, wildcard: bool = False) -> str:
    if wildcard and value in ("", "*"):
        return "*"
    if not _NAME.match(value):
        raise PolicyError(f"{where}: {value!r} is not a Kubernetes name" + (" (or *)" if wildcard else ""))
    return value


def policy(namespace: str, name: str, spec: Mapping[str, Any]) -> AuthorizationPolicy:
    """An AuthorizationPolicy's spec (as its CRD holds it, or a mesh file lists it)."""
    try:
        message = json_format.ParseDict(dict(spec), authorization_pb2.AuthorizationPolicySpec())
    except json_format.ParseError as exc:
        raise PolicyError(f"AuthorizationPolicy {namespace}/{name}: {exc}") from None
    where = f"AuthorizationPolicy {namespace}/{name}"
    if not message.HasField("selector"):
        raise PolicyError(f"{where}: spec.selector.serviceAccount is required")
    account = _name(message.selector.service_account, f"{where}: spec.selector.serviceAccount")
    rules = []
    for i, rule in enumerate(message.rules):
        here = f"{where}: spec.rules[{i}]"
        callers = tuple(
            Caller(
                _name(c.namespace, f"{here}.callers[{j}].namespace", wildcard=True),
                _name(c.service_account, f"{here}.callers[{j}].serviceAccount", wildcard=True),
            )
            for j, c in enumerate(rule.callers)
        )
        if any(not 1 <= p <= 65535 for p in rule.to.ports):
            raise PolicyError(f"{here}.to.ports: a port is 1 to 65535")
        if any(not p.startswith("/") for p in rule.to.paths):
            raise PolicyError(f"{here}.to.paths: each path starts with / (a prefix ends with *)")
        if any(not m.isalpha() for m in rule.to.methods):
            raise PolicyError(f"{here}.to.methods: {list(rule.to.methods)} are not HTTP methods")
        methods = tuple(m.upper() for m in rule.to.methods)
        rules.append(AllowRule(callers, tuple(rule.to.ports), tuple(rule.to.paths), methods))
    return AuthorizationPolicy(KIND, namespace, name, account, tuple(rules))


def policy_object(obj: Mapping[str, Any]) -> AuthorizationPolicy:
    meta = obj.get("metadata") or {}
    return policy(str(meta.get("namespace") or "default"), str(meta.get("name") or ""), obj.get("spec") or {})


def denying(kind: str, obj: Mapping[str, Any]) -> AuthorizationPolicy | None:
    """What a refused policy still says, failing closed: the workloads it selects (if that much of
    it reads) may be called by nobody until it is mended. A malformed policy must not open up a
    workload that it alone protected."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
    if not isinstance(spec, Mapping):
        return None
    if kind == KIND:
        selector = spec.get("selector") or {}
        account = (
            selector.get("serviceAccount", selector.get("service_account"))
            if isinstance(selector, Mapping)
            else None
        )
    else:
        destination = spec.get("destination") or {}
        account = destination.get("name") if isinstance(destination, Mapping) else None
        if isinstance(destination, Mapping) and destination.get("namespace", namespace) != namespace:
            return None
    if not isinstance(account, str) or not _NAME.match(account):
        return None
    return AuthorizationPolicy(kind, namespace, name, account, ())


def _regex(value: str, where: str) -> str:
    try:
        re2.compile(value, options=_RE2)
    except re2.error:
        raise PolicyError(f"{where}: {value!r} is not an RE2 regular expression") from None
    return value


def traffic_target(
    obj: Mapping[str, Any],
    route_groups: Mapping[tuple[str, str], Mapping[str, Any]],
    tcp_routes: Mapping[tuple[str, str], Mapping[str, Any]],
) -> AuthorizationPolicy:
    """An SMI TrafficTarget (v1alpha3), with the HTTPRouteGroups and TCPRoutes of its cluster by
    (namespace, name), as a policy selecting its destination's service account."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
    where = f"TrafficTarget {namespace}/{name}"
    destination = spec.get("destination") or {}
    if destination.get("kind") != "ServiceAccount" or destination.get("namespace", namespace) != namespace:
        raise PolicyError(f"{where}: spec.destination must be a ServiceAccount of namespace {namespace}")
    account = _name(str(destination.get("name", "")), f"{where}: spec.destination.name")
    callers = []
    for i, source in enumerate(spec.get("sources") or ()):
        if not isinstance(source, Mapping) or source.get("kind") != "ServiceAccount":
            raise PolicyError(f"{where}: spec.sources[{i}] must be a ServiceAccount")
        callers.append(
            Caller(
                _name(str(source.get("namespace", namespace)), f"{where}: spec.sources[{i}].namespace"),
                _name(str(source.get("name", "")), f"{where}: spec.sources[{i}].name"),
            )
        )
    if not callers:
        raise PolicyError(f"{where}: spec.sources lists no ServiceAccount")
    port = destination.get("port")
    ports = (port,) if isinstance(port, int) and port > 0 else ()
    rules: list[AllowRule] = []
    for i, rule in enumerate(spec.get("rules") or ()):
        here = f"{where}: spec.rules[{i}]"
        kind, ref = rule.get("kind"), (namespace, str(rule.get("name", "")))
        if kind == "HTTPRouteGroup":
            group = route_groups.get(ref)
            if group is None:
                continue  # allows nothing until it exists
            wanted = set(rule.get("matches") or ())
            for match in (group.get("spec") or {}).get("matches") or ():
                if wanted and match.get("name") not in wanted:
                    continue
                methods = tuple(str(m).upper() for m in match.get("methods") or () if m != "*")
                regex = match.get("pathRegex")
                paths = (_regex(str(regex), f"{here}: {ref[1]}.pathRegex"),) if regex else ()
                rules.append(AllowRule(tuple(callers), ports, paths, methods, regex=bool(regex)))
        elif kind == "TCPRoute":
            route = tcp_routes.get(ref)
            if route is None:
                continue
            listed = ((route.get("spec") or {}).get("matches") or {}).get("ports") or ()
            rules.append(AllowRule(tuple(callers), tuple(int(p) for p in listed) or ports))
        else:
            raise PolicyError(f"{here}: kind {kind!r} is not HTTPRouteGroup or TCPRoute")
    return AuthorizationPolicy(TRAFFIC_TARGET, namespace, name, account, tuple(rules))
