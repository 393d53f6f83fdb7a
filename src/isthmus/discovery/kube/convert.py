"""Conversion of one member cluster's Kubernetes objects (raw JSON dicts) into a Shard.

A service's entry (its ports and endpoints) depends only on its Service, its EndpointSlices
(found through a SliceIndex), the Pods and Nodes those reference, its Namespace and its
ServiceExport. ``shard_of`` converts a whole cluster; ``update_shard`` recomputes only some
services of a previous shard and reuses the others' tuples; both use the same per-service code,
so they agree. Pure functions, apart from the SliceIndex its owner keeps up to date.

Rules (documented in docs/discovery.md):
* a namespace is in the mesh unless labelled ``isthmus.io/mesh=disabled`` (or, with
  ``require_namespace_label``, only when labelled ``isthmus.io/mesh=enabled``);
* export policy ``all`` exports every Service; ``serviceexport`` only those with an MCS ServiceExport;
* ExternalName services are skipped;
* a port's protocol comes from ``appProtocol``, else its name prefix (``http``, ``http2``, ``grpc``,
  ``tcp``), else TCP;
* endpoint health from EndpointSlice conditions: ready -> healthy; serving and terminating ->
  draining; otherwise unhealthy; an address in several slices counts once (the healthiest; between
  equals, the one in the slice whose name sorts first);
* a service's addresses in the cluster: its ``clusterIPs`` (none when headless); when it was
  exported there: its ServiceExport's creation time, else its Service's (the oldest export's ports
  win across clusters);
* locality: region from the node's ``topology.kubernetes.io/region``, zone from the endpoint's zone
  (else the node's), the member cluster as sub-zone; identity from the Pod's service account;
* TrafficSplits and GAMMA routes (HTTPRoute, GRPCRoute) count in mesh namespaces only (the route's
  own namespace, as for a split); a route is read by discovery.gamma (which refuses what Envoy
  would reject), and one without a Service parent (a Gateway's: north-south) is not the mesh's;
* authorization policies (isthmus's AuthorizationPolicy, SMI's TrafficTarget with the
  HTTPRouteGroups and TCPRoutes of its namespace) count in mesh namespaces only (the policy's own
  namespace), read by discovery.authorization; a malformed one is refused whole.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from isthmus.discovery import authorization, gamma
from isthmus.discovery.aggregate import NEVER, Shard
from isthmus.discovery.kube.gateway import is_gateway_service, sidecar_port
from isthmus.discovery.model import (
    AuthorizationPolicy,
    Endpoint,
    Health,
    Locality,
    MemberCluster,
    Protocol,
    ServiceKey,
    ServicePort,
    TrafficSplit,
)

MESH_LABEL = "isthmus.io/mesh"
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

Obj = Mapping[str, Any]


class ExportPolicy(enum.StrEnum):
    ALL = "all"
    SERVICE_EXPORT = "serviceexport"


@dataclass(frozen=True, slots=True)
class ClusterObjects:
    """The raw objects of one member cluster, keyed by namespace/name (or name for cluster-scoped)."""

    services: Mapping[str, Obj]
    endpoint_slices: Mapping[str, Obj]
    nodes: Mapping[str, Obj]
    pods: Mapping[str, Obj]
    namespaces: Mapping[str, Obj]
    service_exports: Mapping[str, Obj]


def _meta(obj: Obj) -> Mapping[str, Any]:
    meta = obj.get("metadata") or {}
    return meta if isinstance(meta, Mapping) else {}


def _labels(obj: Obj) -> Mapping[str, str]:
    labels = _meta(obj).get("labels") or {}
    return labels if isinstance(labels, Mapping) else {}


def port_protocol(port: Obj) -> Protocol:
    hints = [str(port.get("appProtocol") or "").lower(), str(port.get("name") or "").lower()]
    for hint in hints:
        if not hint:
            continue
        head = hint.split("-", 1)[0].split("/")[-1]
        if head in ("http2", "h2c"):
            return Protocol.HTTP2
        if head in ("http", "https"):
            return Protocol.HTTP
        if head == "grpc":
            return Protocol.GRPC
        if head == "tcp":
            return Protocol.TCP
    return Protocol.TCP


def service_ports(service: Obj) -> tuple[ServicePort, ...]:
    ports = []
    for p in (service.get("spec") or {}).get("ports") or []:
        number = int(p.get("port", 0))
        if not 0 < number < 65536 or str(p.get("protocol", "TCP")).upper() != "TCP":
            continue
        target = p.get("targetPort", number)
        ports.append(
            ServicePort(
                name=str(p.get("name") or f"port-{number}"),
                port=number,
                target_port=int(target) if isinstance(target, int) or str(target).isdigit() else number,
                protocol=port_protocol(p),
            )
        )
    return tuple(ports)


def mesh_label(namespace: Obj | None) -> str:
    """The part of a Namespace that conversion reads."""
    return _labels(namespace).get(MESH_LABEL, "") if namespace is not None else ""


def node_locality(node: Obj | None) -> tuple[str | None, str | None]:
    """The part of a Node that conversion reads: its region and zone labels."""
    labels = _labels(node) if node is not None else {}
    return labels.get(REGION_LABEL), labels.get(ZONE_LABEL)


def in_mesh(namespace: Obj | None, require_label: bool) -> bool:
    value = mesh_label(namespace)
    if require_label:
        return value == "enabled"
    return value != "disabled"


def endpoint_health(conditions: Obj) -> Health:
    ready = conditions.get("ready")
    # An unknown (absent) ready condition means ready, as kube-proxy reads it.
    if (ready is None or ready is True) and not conditions.get("terminating", False):
        return Health.HEALTHY
    if conditions.get("serving") and conditions.get("terminating"):
        return Health.DRAINING
    return Health.UNHEALTHY


_RANK = {Health.HEALTHY: 0, Health.DRAINING: 1, Health.UNHEALTHY: 2}

# (ports, sorted endpoints, ClusterIPs, exported at)
ServiceEntry = tuple[tuple[ServicePort, ...], tuple[Endpoint, ...], tuple[str, ...], str]


def cluster_ips(service: Obj) -> tuple[str, ...]:
    """The Service's ClusterIPs (dual stack: both families); none for a headless one."""
    spec = service.get("spec") or {}
    found = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    return tuple(str(ip) for ip in found if ip and ip != "None")


def service_key(service: Obj) -> ServiceKey:
    meta = _meta(service)
    return ServiceKey(str(meta.get("namespace", "default")), str(meta.get("name", "")))


def key_of(store_key: str) -> ServiceKey:
    """The ServiceKey of a namespaced object's store key (``namespace/name``)."""
    namespace, _, name = store_key.rpartition("/")
    return ServiceKey(namespace or "default", name)


def slice_service(endpoint_slice: Obj) -> ServiceKey | None:
    """The service an EndpointSlice belongs to (its ``kubernetes.io/service-name`` label), if any."""
    name = _labels(endpoint_slice).get(SERVICE_NAME_LABEL, "")
    return ServiceKey(str(_meta(endpoint_slice).get("namespace", "default")), name) if name else None


def _pod_key(ref: Obj, namespace: str) -> str:
    return f"{ref.get('namespace', namespace)}/{ref.get('name')}"


def slice_pods(endpoint_slice: Obj, namespace: str) -> frozenset[str]:
    """Store keys of the Pods an EndpointSlice's endpoints reference."""
    refs = (item.get("targetRef") for item in endpoint_slice.get("endpoints") or [])
    return frozenset(_pod_key(ref, namespace) for ref in refs if ref)


class SliceIndex:
    """Which EndpointSlices belong to which service, and which services' slices reference which Pod.

    Built whole by ``of``, or kept current one slice at a time by ``update``.
    """

    def __init__(self) -> None:
        self._service: dict[str, ServiceKey] = {}  # slice key -> service key
        self._slices: dict[ServiceKey, set[str]] = {}  # service key -> slice keys
        self._pods: dict[str, frozenset[str]] = {}  # slice key -> pod keys
        self._pod_slices: dict[str, set[str]] = {}  # pod key -> slice keys

    @classmethod
    def of(cls, endpoint_slices: Mapping[str, Obj]) -> SliceIndex:
        index = cls()
        for key, obj in endpoint_slices.items():
            index.update(key, obj)
        return index

    def slices(self, service: ServiceKey) -> list[str]:
        """The service's slice keys, sorted (the order decides between equally healthy duplicates)."""
        return sorted(self._slices.get(service, ()))

    def services_of_pod(self, pod: str) -> set[ServiceKey]:
        return {self._service[key] for key in self._pod_slices.get(pod, ())}

    def update(self, key: str, endpoint_slice: Obj | None) -> set[ServiceKey]:
        """Re-index one slice (None: deleted); return the services it belonged to before and after."""
        before = self._forget(key)
        after = self._add(key, endpoint_slice) if endpoint_slice is not None else None
        return {service for service in (before, after) if service is not None}

    def _forget(self, key: str) -> ServiceKey | None:
        for pod in self._pods.pop(key, ()):
            _discard(self._pod_slices, pod, key)
        service = self._service.pop(key, None)
        if service is not None:
            _discard(self._slices, service, key)
        return service

    def _add(self, key: str, endpoint_slice: Obj) -> ServiceKey | None:
        service = slice_service(endpoint_slice)
        if service is None:
            return None
        self._service[key] = service
        self._slices.setdefault(service, set()).add(key)
        self._pods[key] = slice_pods(endpoint_slice, service.namespace)
        for pod in self._pods[key]:
            self._pod_slices.setdefault(pod, set()).add(key)
        return service


def _discard(index: dict[Any, set[str]], at: Any, key: str) -> None:
    keys = index[at]
    keys.discard(key)
    if not keys:
        del index[at]


def shard_of(
    cluster: MemberCluster,
    objs: ClusterObjects,
    export: ExportPolicy = ExportPolicy.ALL,
    require_namespace_label: bool = False,
    index: SliceIndex | None = None,
) -> Shard:
    """Convert a whole cluster (``index``, if given, must be current: SliceIndex.of(endpoint_slices))."""
    index = index if index is not None else SliceIndex.of(objs.endpoint_slices)
    services: dict[ServiceKey, tuple[ServicePort, ...]] = {}
    endpoints: dict[ServiceKey, tuple[Endpoint, ...]] = {}
    addresses: dict[ServiceKey, tuple[str, ...]] = {}
    since: dict[ServiceKey, str] = {}
    for svc in objs.services.values():
        key = service_key(svc)
        entry = service_entry(cluster, objs, index, key, svc, export, require_namespace_label)
        if entry is not None:
            services[key], endpoints[key], addresses[key], since[key] = entry
    return Shard(cluster, services, endpoints, addresses=addresses, exported_at=since)


def update_shard(
    shard: Shard,
    objs: ClusterObjects,
    index: SliceIndex,
    dirty: Iterable[ServiceKey],
    export: ExportPolicy = ExportPolicy.ALL,
    require_namespace_label: bool = False,
) -> Shard:
    """``shard`` with the ``dirty`` services recomputed from ``objs`` and the others' tuples reused."""
    services = dict(shard.services)
    endpoints = dict(shard.endpoints)
    addresses = dict(shard.addresses)
    since = dict(shard.exported_at)
    for key in dirty:
        svc = objs.services.get(str(key))
        entry = None
        if svc is not None:
            entry = service_entry(shard.cluster, objs, index, key, svc, export, require_namespace_label)
        if entry is None:
            services.pop(key, None)
            endpoints.pop(key, None)
            addresses.pop(key, None)
            since.pop(key, None)
        else:
            services[key], endpoints[key], addresses[key], since[key] = entry
    return Shard(shard.cluster, services, endpoints, addresses=addresses, exported_at=since)


def service_entry(
    cluster: MemberCluster,
    objs: ClusterObjects,
    index: SliceIndex,
    key: ServiceKey,
    service: Obj,
    export: ExportPolicy = ExportPolicy.ALL,
    require_namespace_label: bool = False,
) -> ServiceEntry | None:
    """One service's ports, endpoints and ClusterIPs, or None if it is not in the mesh (or has no
    TCP port)."""
    if (service.get("spec") or {}).get("type") == "ExternalName" or is_gateway_service(service):
        return None
    if not in_mesh(objs.namespaces.get(key.namespace), require_namespace_label):
        return None
    if export is ExportPolicy.SERVICE_EXPORT and str(key) not in objs.service_exports:
        return None
    ports = service_ports(service)
    if not ports:
        return None
    export_obj = objs.service_exports.get(str(key))
    since = str(_meta(export_obj if export_obj is not None else service).get("creationTimestamp") or "")
    return (
        ports,
        _endpoints(cluster, objs, key, ports, index.slices(key)),
        cluster_ips(service),
        since or NEVER,
    )


def _endpoints(
    cluster: MemberCluster,
    objs: ClusterObjects,
    key: ServiceKey,
    ports: tuple[ServicePort, ...],
    slice_keys: Iterable[str],
) -> tuple[Endpoint, ...]:
    best: dict[str, Endpoint] = {}
    for slice_key in slice_keys:
        eps = objs.endpoint_slices.get(slice_key)
        if eps is None or eps.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
            continue
        named = _named_ports(ports, _slice_ports(eps))
        for item in eps.get("endpoints") or []:
            endpoint = _endpoint(cluster, objs, key.namespace, item, named)
            if endpoint is None:
                continue
            known = best.get(endpoint.address)
            if known is None or _RANK[endpoint.health] < _RANK[known.health]:
                best[endpoint.address] = endpoint
    return tuple(sorted(best.values()))


def _endpoint(
    cluster: MemberCluster,
    objs: ClusterObjects,
    namespace: str,
    item: Obj,
    named: tuple[tuple[str, int], ...],
) -> Endpoint | None:
    addresses = item.get("addresses") or []
    if not addresses:
        return None
    node = objs.nodes.get(str(item.get("nodeName") or ""))
    node_labels = _labels(node) if node is not None else {}
    ref = item.get("targetRef") or {}
    pod = objs.pods.get(_pod_key(ref, namespace)) if ref else None
    return Endpoint(
        address=str(addresses[0]),
        locality=Locality(
            region=node_labels.get(REGION_LABEL, cluster.region),
            zone=str(item.get("zone") or node_labels.get(ZONE_LABEL, cluster.zone)),
            cluster=cluster.name,
        ),
        ports=named,
        health=endpoint_health(item.get("conditions") or {}),
        service_account=str(((pod or {}).get("spec") or {}).get("serviceAccountName") or "default"),
        workload=str(ref.get("name") or ""),
        sidecar_port=sidecar_port(pod),
    )


def _slice_ports(endpoint_slice: Obj) -> tuple[tuple[str, int], ...]:
    return tuple(
        sorted(
            (str(p.get("name") or ""), int(p["port"]))
            for p in endpoint_slice.get("ports") or []
            if p.get("port") is not None
        )
    )


def _named_ports(
    ports: tuple[ServicePort, ...], slice_ports: tuple[tuple[str, int], ...]
) -> tuple[tuple[str, int], ...]:
    """Map slice ports (named like the service's ports, or unnamed for a single-port service)."""
    by_name = dict(slice_ports)
    out = []
    for port in ports:
        if port.name in by_name:
            out.append((port.name, by_name[port.name]))
        elif len(ports) == 1 and "" in by_name:
            out.append((port.name, by_name[""]))
    return tuple(out)


def traffic_splits(
    splits: Mapping[str, Obj], namespaces: Mapping[str, Obj], require_namespace_label: bool = False
) -> tuple[TrafficSplit, ...]:
    """SMI TrafficSplits (split.smi-spec.io v1alpha2 and later: ``spec.service``, ``spec.backends``
    with integer weights), in mesh namespaces; malformed ones are skipped."""
    out = []
    for key in sorted(splits):
        obj = splits[key]
        namespace = str(_meta(obj).get("namespace", "default"))
        spec = obj.get("spec") or {}
        root = spec.get("service")
        if not root or not in_mesh(namespaces.get(namespace), require_namespace_label):
            continue
        backends = []
        for backend in spec.get("backends") or []:
            weight = backend.get("weight") if isinstance(backend, Mapping) else None
            if (
                isinstance(weight, int)
                and not isinstance(weight, bool)
                and weight >= 0
                and backend.get("service")
            ):
                backends.append((str(backend["service"]), weight))
        if any(weight for _, weight in backends):
            out.append(TrafficSplit(ServiceKey(namespace, str(root)), tuple(backends)))
    return tuple(out)


RouteMemo = MutableMapping[tuple[str, str], tuple[Obj, gamma.ReadRoute]]


def read_route(obj: Obj, kind: str, cluster: str) -> gamma.ReadRoute:
    """One route object read by discovery.gamma, as ``kind`` if it does not say (items of a list
    carry no kind). An object of a shape the reader does not expect (a schema that lets anything
    through) is refused, never raised: one bad object must not stop the cluster's publishing."""
    if not obj.get("kind"):
        obj = {**obj, "kind": kind}
    try:
        return gamma.read(obj, cluster)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        meta = _meta(obj)
        namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
        generation = meta.get("generation", 0)
        try:
            found = gamma.parents(obj)
        except (TypeError, ValueError, AttributeError, KeyError):
            found = ()
        return gamma.ReadRoute(
            str(obj.get("kind")),
            namespace,
            name,
            found,
            (),
            "UnsupportedValue",
            f"malformed {type(exc).__name__}: {exc}",
            generation if isinstance(generation, int) else 0,
        )


def route_reads(
    routes: Mapping[str, Mapping[str, Obj]],
    namespaces: Mapping[str, Obj],
    require_namespace_label: bool = False,
    cluster: str = "",
    memo: RouteMemo | None = None,
) -> tuple[gamma.ReadRoute, ...]:
    """The GAMMA routes of a cluster (``routes``: kind -> its objects by store key) read by
    discovery.gamma: those in mesh namespaces that have a Service parent, by kind and key. ``memo``
    (kept by the caller) remembers each object's reading while it is the same object (the store
    replaces an object that changed), and forgets the objects gone."""
    memo = memo if memo is not None else {}
    out: list[gamma.ReadRoute] = []
    seen: set[tuple[str, str]] = set()
    for kind in sorted(routes):
        objs = routes[kind]
        for key in sorted(objs):
            obj = objs[key]
            at = (kind, key)
            seen.add(at)
            known = memo.get(at)
            if known is not None and known[0] is obj:
                read = known[1]
            else:
                read = read_route(obj, kind, cluster)
                memo[at] = (obj, read)
            if read.parents and in_mesh(namespaces.get(read.namespace), require_namespace_label):
                out.append(read)
    for at in [at for at in memo if at not in seen]:
        del memo[at]
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ReadPolicy:
    """One policy object as read: the policy, its creationTimestamp (for conflicts across clusters)
    and generation (for the refusal's log line). Refused (``message`` says why): the policy is the
    one that denies every call to the workloads it selects (authorization.denying), or None where
    not even its selector reads."""

    kind: str
    namespace: str
    name: str
    policy: AuthorizationPolicy | None
    created: str = ""
    generation: int = 0
    message: str = ""


# (kind, store key) -> (the objects the reading came from, compared by identity; the reading)
PolicyMemo = MutableMapping[tuple[str, str], tuple[tuple[Obj, ...], ReadPolicy]]


def _by_name(objs: Mapping[str, Obj]) -> dict[tuple[str, str], Obj]:
    """Objects by (namespace, name), as discovery.authorization looks up a TrafficTarget's rules."""
    out = {}
    for obj in objs.values():
        meta = _meta(obj)
        out[(str(meta.get("namespace") or "default"), str(meta.get("name") or ""))] = obj
    return out


def _read_policy(kind: str, obj: Obj, read: Callable[[], AuthorizationPolicy]) -> ReadPolicy:
    meta = _meta(obj)
    namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
    generation = meta.get("generation", 0)
    generation = generation if isinstance(generation, int) else 0
    created = str(meta.get("creationTimestamp") or "")
    try:
        found = read()
    except authorization.PolicyError as exc:
        why = str(exc)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a shape the reader does not expect
        why = f"malformed: {type(exc).__name__}: {exc}"
    else:
        return ReadPolicy(kind, namespace, name, found, created, generation)
    # Refused: fail closed (its workloads may be called by nobody), where its selector reads.
    return ReadPolicy(kind, namespace, name, authorization.denying(kind, obj), created, generation, why)


def policy_reads(
    policies: Mapping[str, Obj],
    traffic_targets: Mapping[str, Obj],
    route_groups: Mapping[str, Obj],
    tcp_routes: Mapping[str, Obj],
    namespaces: Mapping[str, Obj],
    require_namespace_label: bool = False,
    memo: PolicyMemo | None = None,
) -> tuple[ReadPolicy, ...]:
    """The authorization policies of a cluster in mesh namespaces, read by discovery.authorization:
    its AuthorizationPolicies and its TrafficTargets (each with the HTTPRouteGroups and TCPRoutes of
    the cluster), by kind and store key. ``memo`` (kept by the caller) remembers each reading while
    the objects it came from are the same (the store replaces an object that changed); a
    TrafficTarget's come from its HTTPRouteGroups and TCPRoutes too."""
    memo = memo if memo is not None else {}
    groups, tcp = _by_name(route_groups), _by_name(tcp_routes)
    out: list[ReadPolicy] = []
    seen: set[tuple[str, str]] = set()
    stores = ((authorization.KIND, policies), (authorization.TRAFFIC_TARGET, traffic_targets))
    for kind, objs in stores:
        for key in sorted(objs):
            obj = objs[key]
            if not in_mesh(
                namespaces.get(str(_meta(obj).get("namespace") or "default")), require_namespace_label
            ):
                continue
            at = (kind, key)
            seen.add(at)
            read: Callable[[], AuthorizationPolicy]
            if kind == authorization.KIND:
                sources: tuple[Obj, ...] = (obj,)
                read = functools.partial(authorization.policy_object, obj)
            else:
                sources = (obj, *_rule_objects(obj, groups, tcp))
                read = functools.partial(authorization.traffic_target, obj, groups, tcp)
            known = memo.get(at)
            if known is not None and _same(known[0], sources):
                out.append(known[1])
                continue
            found = _read_policy(kind, obj, read)
            memo[at] = (sources, found)
            out.append(found)
    for at in [at for at in memo if at not in seen]:
        del memo[at]
    return tuple(out)


def _rule_objects(
    target: Obj, groups: Mapping[tuple[str, str], Obj], tcp: Mapping[tuple[str, str], Obj]
) -> tuple[Obj, ...]:
    """The HTTPRouteGroups and TCPRoutes a TrafficTarget's rules name, as they are now (a
    placeholder for one that does not exist, so that its appearing changes the reading)."""
    namespace = str(_meta(target).get("namespace") or "default")
    rules = (target.get("spec") or {}).get("rules") if isinstance(target.get("spec"), Mapping) else None
    out: list[Obj] = []
    for rule in rules if isinstance(rules, list) else ():
        if not isinstance(rule, Mapping):
            continue
        found = {"HTTPRouteGroup": groups, "TCPRoute": tcp}.get(str(rule.get("kind")), {})
        out.append(found.get((namespace, str(rule.get("name", ""))), _ABSENT))
    return tuple(out)


_ABSENT: Obj = {}


def _same(before: tuple[Obj, ...], now: tuple[Obj, ...]) -> bool:
    return len(before) == len(now) and all(a is b for a, b in zip(before, now, strict=True))
