"""What discovery keeps of each watched Kubernetes object: only the fields its consumers read.

A Reflector stores every object it lists or hears of through its kind's trim function (as
client-go's informer transform functions do): a new small dict with only the fields that the
converters and writers read, and none of what they do not (``managedFields``, other labels and
annotations, most of ``spec`` and ``status``). Of a real cluster's Pod (containers, volumes,
status, managedFields: several KiB) a name, a uid, an annotation and a service account are left;
of a Node, its locality labels and addresses. The W1 benchmark's objects are nearly bare already;
there the trims take the member clusters' stores from 76 to 53 MiB (docs/benchmarks.md, "W1 memory").

This module owns the list of fields read per kind; a consumer that starts reading a field must
add it here (tests/unit/test_kube_trim.py checks, per kind, that every consumer's result on the
trimmed object equals its result on the whole one, for objects that set every field read):

* Service (convert, gateway): ``metadata.name``/``namespace``/``creationTimestamp``, the label
  ``isthmus.io/gateway``; ``spec.type``/``clusterIP``/``clusterIPs`` and of each port ``name``,
  ``port``, ``protocol``, ``targetPort``, ``appProtocol``, ``nodePort``;
  ``status.loadBalancer.ingress[].ip``/``hostname``.
* EndpointSlice (convert, gateway): ``metadata.name``/``namespace``, the label
  ``kubernetes.io/service-name``; ``addressType``; of each port ``name``, ``port``; of each
  endpoint ``addresses``, ``conditions.ready``/``serving``/``terminating``, ``nodeName``,
  ``zone``, ``targetRef.namespace``/``name`` (not ``hints``: topology-aware hints are not used).
* Node (convert, gateway): ``metadata.name``, the labels ``topology.kubernetes.io/region`` and
  ``zone``; of each ``status.addresses[]`` its ``type`` and ``address``.
* Pod (convert, gateway, pod-bound tokens): ``metadata.name``/``namespace``/``uid``, the
  annotation ``isthmus.io/inbound-port``; ``spec.serviceAccountName``.
* Namespace (convert): ``metadata.name``, the label ``isthmus.io/mesh``.
* ServiceExport (convert; mcs writes its status back): ``apiVersion``, ``kind``,
  ``metadata.name``/``namespace``/``uid``/``resourceVersion``/``creationTimestamp``, ``status``
  whole (the write keeps its other fields; the resourceVersion makes a write over a newer object a
  409, as before). Its ``spec`` is not kept: the status subresource ignores everything but status.
* TrafficSplit (convert): ``metadata.name``/``namespace``; ``spec.service``, of each backend
  ``service`` and ``weight``.
* HTTPRoute, GRPCRoute (convert, through discovery.gamma): ``kind``,
  ``metadata.name``/``namespace``/``creationTimestamp``/``generation``; of each
  ``spec.parentRefs[]`` its ``group``, ``kind``, ``namespace``, ``name``, ``port``, ``sectionName``;
  of each ``spec.rules[]`` its ``matches``, ``backendRefs``, ``filters``, ``timeouts`` and
  ``retry``, each whole (the reader refuses what it does not implement inside them, so all of it
  is read). Not ``status`` (the parents' conditions other controllers write), nor a rule's other
  fields (``name``, ``sessionPersistence``: not read), nor ``spec.hostnames`` (not read for a
  Service parent).
* AuthorizationPolicy (convert, through discovery.authorization):
  ``metadata.name``/``namespace``/``creationTimestamp``/``generation``; ``spec`` whole (it is
  parsed strictly, as the config API's objects: an unknown field must stay an error).
* TrafficTarget (convert, through discovery.authorization): ``metadata`` as an
  AuthorizationPolicy's; ``spec.destination``'s ``kind``, ``namespace``, ``name``, ``port``; of
  each ``spec.sources[]`` its ``kind``, ``namespace``, ``name``; of each ``spec.rules[]`` its
  ``kind``, ``name``, ``matches``.
* HTTPRouteGroup, TCPRoute (convert: what a TrafficTarget's rules name): ``metadata.name``/
  ``namespace``; of each ``spec.matches[]`` of a group its ``name``, ``methods``, ``pathRegex``
  (not ``headers``: not read); of a TCPRoute ``spec.matches.ports``.
* Secret (membership): ``metadata.name``/``namespace``; ``data`` whole.
* MemberCluster, MeshConfig (config_api; status written back): ``apiVersion``, ``kind``,
  ``metadata.name``/``namespace``/``uid``/``resourceVersion``/``generation``; ``spec`` and
  ``status`` whole (the spec is parsed strictly: an unknown field must stay an error).

A value of an unexpected type (a ``spec`` that is a string) is kept as it is, so that a consumer
sees what it would have seen in the whole object. The trim functions are pure and never change
their argument. The strings of the fields they pick are interned (not uids and resourceVersions,
nor what is kept whole: a ``status``, a Secret's ``data``, an endpoint's ``addresses``): the JSON
decoder makes a new string object for every value, and a namespace, a node name, a service
account, a pod's name (also in its endpoint's targetRef) repeat across thousands of objects (at
W1, 300,000 strings held, 73,000 distinct).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from isthmus.discovery.kube.convert import MESH_LABEL, REGION_LABEL, SERVICE_NAME_LABEL, ZONE_LABEL
from isthmus.discovery.kube.gateway import GATEWAY_LABEL, INBOUND_PORT_ANNOTATION

Obj = dict[str, Any]
Trim = Callable[[Obj], Obj]

_NAMED = ("name", "namespace")
# Fields whose values are (nearly) all distinct: not worth a place in the interned strings.
_UNIQUE = frozenset({"uid", "resourceVersion"})
_WRITTEN_BACK = (*_NAMED, "uid", "resourceVersion")  # what a replace (of status) needs


def _shared(key: str, value: Any) -> Any:
    """One string object for all equal values of a field that repeats (sys.intern)."""
    return sys.intern(value) if type(value) is str and key not in _UNIQUE else value


def _keep(value: Any, keys: tuple[str, ...]) -> Any:
    """A dict's entries for ``keys`` (in a new dict, strings shared); a value of another type as it is."""
    if not isinstance(value, dict):
        return value
    return {key: _shared(key, value[key]) for key in keys if key in value}


def _each(value: Any, keys: tuple[str, ...]) -> Any:
    """Each dict of a list trimmed to ``keys``; a value of another type as it is."""
    if not isinstance(value, list):
        return value
    return [_keep(item, keys) for item in value]


def _metadata(
    obj: Obj, keys: tuple[str, ...], labels: tuple[str, ...] = (), annotations: tuple[str, ...] = ()
) -> Obj:
    """``obj`` with its metadata only (trimmed to ``keys`` and the named labels and annotations)."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return {"metadata": meta} if "metadata" in obj else {}
    out = _keep(meta, keys)
    if labels and "labels" in meta:
        out["labels"] = _keep(meta["labels"], labels)
    if annotations and "annotations" in meta:
        out["annotations"] = _keep(meta["annotations"], annotations)
    return {"metadata": out}


def _copy(out: Obj, obj: Obj, keys: tuple[str, ...]) -> Obj:
    """``out`` with ``obj``'s entries for ``keys`` (whole, shared: the trimmed object is read only)."""
    for key in keys:
        if key in obj:
            out[key] = obj[key]
    return out


_SERVICE_PORT = ("name", "port", "protocol", "targetPort", "appProtocol", "nodePort")


def service(obj: Obj) -> Obj:
    out = _metadata(obj, (*_NAMED, "creationTimestamp"), labels=(GATEWAY_LABEL,))
    spec = obj.get("spec")
    if "spec" in obj:
        out["spec"] = spec = _keep(spec, ("type", "clusterIP", "clusterIPs", "ports"))
        if isinstance(spec, dict) and "ports" in spec:
            spec["ports"] = _each(spec["ports"], _SERVICE_PORT)
    if "status" in obj:
        out["status"] = status = _keep(obj["status"], ("loadBalancer",))
        if isinstance(status, dict) and "loadBalancer" in status:
            status["loadBalancer"] = balancer = _keep(status["loadBalancer"], ("ingress",))
            if isinstance(balancer, dict) and "ingress" in balancer:
                balancer["ingress"] = _each(balancer["ingress"], ("ip", "hostname"))
    return out


_ENDPOINT = ("addresses", "conditions", "nodeName", "zone", "targetRef")
_CONDITIONS = ("ready", "serving", "terminating")
# A targetRef's kind and uid are not read. One without a name names no pod (the consumers' lookup
# of pod "namespace/None" finds none: pod names are lowercase), with or without its other fields.
_TARGET_REF = ("namespace", "name")


def _endpoint(item: Any) -> Any:
    item = _keep(item, _ENDPOINT)
    if isinstance(item, dict):
        if "conditions" in item:
            item["conditions"] = _keep(item["conditions"], _CONDITIONS)
        if "targetRef" in item:
            item["targetRef"] = _keep(item["targetRef"], _TARGET_REF)
    return item


def endpoint_slice(obj: Obj) -> Obj:
    out = _copy(_metadata(obj, _NAMED, labels=(SERVICE_NAME_LABEL,)), obj, ("addressType",))
    if "ports" in obj:
        out["ports"] = _each(obj["ports"], ("name", "port"))
    if "endpoints" in obj:
        endpoints = obj["endpoints"]
        out["endpoints"] = [_endpoint(e) for e in endpoints] if isinstance(endpoints, list) else endpoints
    return out


def node(obj: Obj) -> Obj:
    out = _metadata(obj, ("name",), labels=(REGION_LABEL, ZONE_LABEL))
    if "status" in obj:
        out["status"] = status = _keep(obj["status"], ("addresses",))
        if isinstance(status, dict) and "addresses" in status:
            status["addresses"] = _each(status["addresses"], ("type", "address"))
    return out


def pod(obj: Obj) -> Obj:
    out = _metadata(obj, (*_NAMED, "uid"), annotations=(INBOUND_PORT_ANNOTATION,))
    if "spec" in obj:
        out["spec"] = _keep(obj["spec"], ("serviceAccountName",))
    return out


def namespace(obj: Obj) -> Obj:
    return _metadata(obj, ("name",), labels=(MESH_LABEL,))


def service_export(obj: Obj) -> Obj:
    head = _copy({}, obj, ("apiVersion", "kind"))
    return _copy(head | _metadata(obj, (*_WRITTEN_BACK, "creationTimestamp")), obj, ("status",))


def traffic_split(obj: Obj) -> Obj:
    out = _metadata(obj, _NAMED)
    if "spec" in obj:
        out["spec"] = spec = _keep(obj["spec"], ("service", "backends"))
        if isinstance(spec, dict) and "backends" in spec:
            spec["backends"] = _each(spec["backends"], ("service", "weight"))
    return out


_PARENT_REF = ("group", "kind", "namespace", "name", "port", "sectionName")
_RULE = ("matches", "backendRefs", "filters", "timeouts", "retry")


def _route(obj: Obj) -> Obj:
    out = _metadata(obj, (*_NAMED, "creationTimestamp", "generation"))
    if "kind" in obj:
        out["kind"] = _shared("kind", obj["kind"])
    if "spec" in obj:
        out["spec"] = spec = _keep(obj["spec"], ("parentRefs", "rules"))
        if isinstance(spec, dict):
            if "parentRefs" in spec:
                spec["parentRefs"] = _each(spec["parentRefs"], _PARENT_REF)
            if "rules" in spec:
                rules = spec["rules"]
                spec["rules"] = (
                    [_copy({}, r, _RULE) if isinstance(r, dict) else r for r in rules]
                    if isinstance(rules, list)
                    else rules
                )
    return out


def http_route(obj: Obj) -> Obj:
    """An HTTPRoute (gateway.networking.k8s.io/v1)."""
    return _route(obj)


def grpc_route(obj: Obj) -> Obj:
    """A GRPCRoute (gateway.networking.k8s.io/v1)."""
    return _route(obj)


_POLICY_META = (*_NAMED, "creationTimestamp", "generation")


def authorization_policy(obj: Obj) -> Obj:
    """isthmus's AuthorizationPolicy (isthmus.io/v1alpha1)."""
    return _copy(_metadata(obj, _POLICY_META), obj, ("spec",))


_SOURCE = ("kind", "namespace", "name")


def traffic_target(obj: Obj) -> Obj:
    """An SMI TrafficTarget (access.smi-spec.io/v1alpha3)."""
    out = _metadata(obj, _POLICY_META)
    if "spec" in obj:
        out["spec"] = spec = _keep(obj["spec"], ("destination", "sources", "rules"))
        if isinstance(spec, dict):
            if "destination" in spec:
                spec["destination"] = _keep(spec["destination"], (*_SOURCE, "port"))
            if "sources" in spec:
                spec["sources"] = _each(spec["sources"], _SOURCE)
            if "rules" in spec:
                spec["rules"] = _each(spec["rules"], ("kind", "name", "matches"))
    return out


def http_route_group(obj: Obj) -> Obj:
    """An SMI HTTPRouteGroup (specs.smi-spec.io/v1alpha4)."""
    out = _metadata(obj, _NAMED)
    if "spec" in obj:
        out["spec"] = spec = _keep(obj["spec"], ("matches",))
        if isinstance(spec, dict) and "matches" in spec:
            spec["matches"] = _each(spec["matches"], ("name", "methods", "pathRegex"))
    return out


def tcp_route(obj: Obj) -> Obj:
    """An SMI TCPRoute (specs.smi-spec.io/v1alpha4)."""
    out = _metadata(obj, _NAMED)
    if "spec" in obj:
        out["spec"] = spec = _keep(obj["spec"], ("matches",))
        if isinstance(spec, dict) and "matches" in spec:
            spec["matches"] = _keep(spec["matches"], ("ports",))
    return out


def secret(obj: Obj) -> Obj:
    return _copy(_metadata(obj, _NAMED), obj, ("data",))


def config_object(obj: Obj) -> Obj:
    """A MemberCluster or a MeshConfig."""
    head = _copy({}, obj, ("apiVersion", "kind"))
    return _copy(head | _metadata(obj, (*_WRITTEN_BACK, "generation")), obj, ("spec", "status"))
