"""The mesh model: typed, frozen value objects that every other layer reads.

Nothing here knows about Kubernetes or Envoy. Sources (discovery.file,
discovery.kube) build these objects; xds.generate turns them into Envoy
resources. All collections are tuples or read-only mappings so that a
MeshView can be shared between tasks without copying or locking.

A MeshView's version is a content hash built from per-service digests, each
computed once per Service object: a view that reuses the Service objects of the
previous one (the aggregator's incremental merge) hashes only what changed.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Protocol(enum.StrEnum):
    """Application protocol of a service port (decides HTTP routing vs TCP proxying)."""

    HTTP = "http"
    HTTP2 = "http2"
    GRPC = "grpc"
    TCP = "tcp"

    @property
    def is_http(self) -> bool:
        return self is not Protocol.TCP


class Health(enum.StrEnum):
    """Health of one endpoint as its source reports it."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


@dataclass(frozen=True, slots=True, order=True)
class Locality:
    """Where an endpoint or proxy runs: region and zone, and the member cluster as sub-zone."""

    region: str = ""
    zone: str = ""
    cluster: str = ""


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    """A service's identity across the mesh: the same namespace/name in every cluster is one service."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    """A port the service exposes, and the port its endpoints listen on."""

    name: str
    port: int
    target_port: int
    protocol: Protocol = Protocol.HTTP


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """One workload instance backing a service.

    ``ports`` maps a service port name to the port this endpoint listens on for it.
    ``sidecar_port`` is the port of the endpoint's sidecar inbound listener (mTLS, any service
    port, told apart by SNI); 0 means no sidecar: clients connect to ``ports`` in plain text.
    """

    address: str
    locality: Locality
    ports: tuple[tuple[str, int], ...] = ()
    health: Health = Health.HEALTHY
    service_account: str = "default"
    workload: str = ""
    sidecar_port: int = 0

    def port_for(self, service_port: ServicePort) -> int:
        for name, number in self.ports:
            if name == service_port.name:
                return number
        return service_port.target_port


ClusterAddresses = tuple[tuple[str, tuple[str, ...]], ...]  # ((member cluster, its ClusterIPs), ...)


@dataclass(frozen=True, slots=True)
class Service:
    """A service merged across member clusters, with all its endpoints (sorted, in a MeshView).

    ``addresses`` lists, per member cluster whose API server defines the Service, the ClusterIPs it
    has there (none for a headless one), in cluster order; clusters' service ranges may overlap, so
    an address means this service only in its own cluster. ``vip`` is its clusterset IP
    (discovery.clusterset): one address for the service in every member cluster.
    """

    key: ServiceKey
    ports: tuple[ServicePort, ...]
    endpoints: tuple[Endpoint, ...] = ()
    addresses: ClusterAddresses = ()
    vip: str = ""
    _digest: bytes = field(default=b"", init=False, repr=False, compare=False)

    @property
    def digest(self) -> bytes:
        """Content hash of key, ports, endpoints and addresses; computed on first use, then kept."""
        if not self._digest:
            text = repr((self.key, self.ports, self.endpoints, self.addresses, self.vip))
            object.__setattr__(self, "_digest", hashlib.sha256(text.encode()).digest())
        return self._digest

    @property
    def name(self) -> str:
        return self.key.name

    @property
    def namespace(self) -> str:
        return self.key.namespace

    @property
    def clusters(self) -> frozenset[str]:
        return frozenset(e.locality.cluster for e in self.endpoints)

    def defined_in(self, cluster: str) -> bool:
        """Whether ``cluster``'s API server has this Service (its own DNS then answers its name)."""
        return any(name == cluster for name, _ in self.addresses)

    def addresses_in(self, cluster: str) -> tuple[str, ...]:
        """The service's ClusterIPs in ``cluster`` (none where it is headless or not defined)."""
        return next((ips for name, ips in self.addresses if name == cluster), ())

    def reachable_at(self, cluster: str) -> tuple[str, ...]:
        """Where a pod of ``cluster`` reaches the service: its ClusterIPs there, its clusterset IP."""
        own = self.addresses_in(cluster)
        return (*own, self.vip) if self.vip else own


@dataclass(frozen=True, slots=True)
class Gateway:
    """A member cluster's east-west gateway: the address other clusters use to reach it."""

    address: str
    port: int = 15443


FULL_WEIGHT = 100  # MemberCluster.weight of a cluster that is not being drained


class ClusterState(enum.StrEnum):
    """Health of a member cluster's API server connection (not of its workloads)."""

    SYNCING = "syncing"  # first list not complete yet
    SYNCED = "synced"
    UNREACHABLE = "unreachable"  # last known endpoints kept, reported
    STALE = "stale"  # unreachable past the maximum staleness: endpoints demoted to the last priority
    STATIC = "static"  # from the file source: always current


@dataclass(frozen=True, slots=True)
class MemberCluster:
    """A member cluster of the mesh, as the control plane sees it."""

    name: str
    region: str = ""
    zone: str = ""
    gateway: Gateway | None = None
    state: ClusterState = ClusterState.STATIC
    detail: str = ""
    gateway_down: bool = False  # the gateway is known to be dead (unknown counts as alive)
    # Its pods' readiness from the cluster's API server (None: not known): the same for every
    # replica, so it decides gateway_down when known (discovery.kube.gateway).
    gateway_ready: bool | None = None
    weight: int = 100  # percent of its normal share of traffic; lowered step by step by a drain


def _frozen_map(items: Iterable[tuple[K, V]]) -> Mapping[K, V]:
    return MappingProxyType(dict(items))


@dataclass(frozen=True, slots=True, order=True)
class TrafficSplit:
    """SMI TrafficSplit: requests for the root ``service`` go to ``backends`` (service names in the
    same namespace, with weights) in proportion. A backend may live in any member cluster."""

    service: ServiceKey
    backends: tuple[tuple[str, int], ...]


# ---- routing: the one model behind GAMMA routes (HTTPRoute, GRPCRoute) and SMI TrafficSplits ----


class PathType(enum.StrEnum):
    """How a route match reads the request path (Gateway API ``HTTPPathMatch.type``)."""

    EXACT = "Exact"
    PREFIX = "PathPrefix"  # element-wise: /foo matches /foo and /foo/bar, not /foobar
    REGEX = "RegularExpression"  # RE2, as Envoy reads it


@dataclass(frozen=True, slots=True, order=True)
class ValueMatch:
    """A header or query parameter match: exact value, or an RE2 regular expression."""

    name: str
    value: str
    regex: bool = False


@dataclass(frozen=True, slots=True, order=True)
class RouteMatch:
    """One way a request matches a rule: every condition given must hold. GRPCRoute method
    matches arrive here as paths (/service/method)."""

    path: str = "/"
    path_type: PathType = PathType.PREFIX
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()
    method: str = ""  # "" any


@dataclass(frozen=True, slots=True, order=True)
class Backend:
    """A backendRef: a service of the mesh (in any member cluster, balanced as that service is), its
    port (0: the port of the parent's number, else its first HTTP port), and its weight."""

    service: ServiceKey
    port: int = 0
    weight: int = 1


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """RequestHeaderModifier / ResponseHeaderModifier: headers set (replacing), added, removed."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Redirect:
    """RequestRedirect: what of the URL is replaced ("" or 0: kept), and the status code. ``path``
    replaces the whole path, or (``prefix``) the matched prefix."""

    scheme: str = ""
    hostname: str = ""
    port: int = 0
    path: str | None = None
    prefix: bool = False
    status: int = 302


@dataclass(frozen=True, slots=True)
class Rewrite:
    """URLRewrite: the Host, and the whole path or (``prefix``) the matched prefix, before forwarding."""

    hostname: str = ""
    path: str | None = None
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Retry:
    """GEP-1731: attempts after the first, on these status codes (and connection failures), with
    a backoff between them (0: Envoy's default)."""

    attempts: int
    codes: tuple[int, ...] = ()
    backoff_ms: int = 0


@dataclass(frozen=True, slots=True)
class RouteRule:
    """A rule: requests matching any of ``matches`` get its filters and go to ``backends`` (by
    weight) unless it redirects. ``broken`` says why its backends cannot be used (an unknown
    service, a port it does not have): such requests get 500, as the Gateway API specifies."""

    matches: tuple[RouteMatch, ...] = (RouteMatch(),)
    backends: tuple[Backend, ...] = ()
    request_headers: HeaderEdits | None = None
    response_headers: HeaderEdits | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    mirrors: tuple[tuple[Backend, float], ...] = ()  # (backend, percent of requests)
    timeout_ms: int | None = None  # the whole request (GEP-1742 ``request``); 0: none
    backend_timeout_ms: int | None = None  # each try (``backendRequest``)
    retry: Retry | None = None
    broken: str = ""
    lenient: bool = False  # backends unknown to the mesh (yet) are left out, not 500 (SMI)


@dataclass(frozen=True, slots=True, order=True)
class ServiceRoute:
    """A route attached to a service (GAMMA: an HTTPRoute or GRPCRoute whose parentRef is the
    Service; or an SMI TrafficSplit, translated). A route in the service's own namespace is a
    *producer* route: it applies to every caller. One in another namespace is a *consumer* route:
    it applies to callers in its own namespace only, and for them replaces the producer routes.
    ``port`` is the parentRef's port (0: every HTTP port). ``created`` (RFC 3339) and the name
    order rules of equal precedence."""

    kind: str
    namespace: str
    name: str
    service: ServiceKey
    port: int = 0
    rules: tuple[RouteRule, ...] = field(default=(), compare=False)
    created: str = ""
    cluster: str = ""  # the member cluster it was read from ("" from a file)

    @property
    def consumer(self) -> bool:
        return self.namespace != self.service.namespace

    @property
    def precedence(self) -> tuple[str, str, str]:
        """Routes of equal match precedence: the oldest first, then by namespace/name."""
        return (self.created, self.namespace, self.name)


def split_route(split: TrafficSplit, created: str = "") -> ServiceRoute:
    """An SMI TrafficSplit in the routing model: one rule for every path, to its weighted
    backends (services of the root's namespace, each on its own port of the root's number)."""
    backends = tuple(Backend(ServiceKey(split.service.namespace, name), 0, w) for name, w in split.backends)
    rule = RouteRule(backends=tuple(b for b in backends if b.weight > 0), lenient=True)
    return ServiceRoute(
        "TrafficSplit", split.service.namespace, split.service.name, split.service, 0, (rule,), created
    )


# ---- authorization: who may call a workload, by SPIFFE identity ----------------------------


@dataclass(frozen=True, slots=True, order=True)
class Caller:
    """A calling identity: a service account of a namespace, in any member cluster (the SPIFFE ID
    spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT names no cluster). "*": any."""

    namespace: str = "*"
    service_account: str = "*"


@dataclass(frozen=True, slots=True)
class AllowRule:
    """Requests (or, on a TCP port, connections) allowed: from any of ``callers`` (none: any mesh
    identity), to any of ``ports`` (none: every port), and for HTTP to any of ``paths`` (exact, or
    a prefix ending in ``*``) with any of ``methods`` (none: any). A rule naming paths or methods
    allows nothing on a TCP port."""

    callers: tuple[Caller, ...] = ()
    ports: tuple[int, ...] = ()
    paths: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    regex: bool = False  # ``paths`` are RE2 regular expressions (SMI's pathRegex)


@dataclass(frozen=True, slots=True, order=True)
class AuthorizationPolicy:
    """Selects the workloads of a service account (``namespace``/``service_account``) and lists who
    may call them. No policy selecting a workload: every mesh identity may. Policies selecting it:
    only what one of their rules allows (deny by default). Plain-text callers carry no identity and
    never match. ``kind`` is where it came from: isthmus's AuthorizationPolicy, or SMI's
    TrafficTarget, translated."""

    kind: str
    namespace: str
    name: str
    service_account: str
    rules: tuple[AllowRule, ...] = field(default=(), compare=False)


def _version(
    services: Iterable[Service],
    clusters: Iterable[MemberCluster],
    splits: Iterable[TrafficSplit] = (),
    routes: Iterable[ServiceRoute] = (),
    policies: Iterable[AuthorizationPolicy] = (),
) -> str:
    """Content hash of services (in key order) and clusters (in name order).

    A cluster's ``detail`` (the last error text) is for status pages; it changes with every
    retry while a cluster is down and must not make a new version.
    """
    effective = [
        (c.name, c.region, c.zone, c.gateway, c.state, c.gateway_down, c.gateway_ready, c.weight)
        for c in clusters
    ]
    h = hashlib.sha256(b"".join(s.digest for s in services))
    h.update(repr(effective).encode())
    h.update(repr(sorted(splits)).encode())
    h.update(repr([(r, r.rules) for r in routes]).encode())
    h.update(repr([(p, p.rules) for p in policies]).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class MeshView:
    """An immutable snapshot of the whole mesh: what the generators read.

    ``version`` is a content hash: two views with the same services and clusters
    have the same version, whichever path built them (``build`` or ``of``), so a
    reload that changes nothing pushes nothing.
    """

    services: Mapping[ServiceKey, Service] = field(default_factory=lambda: MappingProxyType({}))
    clusters: Mapping[str, MemberCluster] = field(default_factory=lambda: MappingProxyType({}))
    version: str = ""
    splits: Mapping[ServiceKey, TrafficSplit] = field(default_factory=lambda: MappingProxyType({}))
    # Routes by the service they are attached to, GAMMA routes and TrafficSplits alike, each
    # service's in name order. What RDS reads (``splits`` is kept as read, for status).
    routes: Mapping[ServiceKey, tuple[ServiceRoute, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    # Authorization policies by the workloads they select: (namespace, service account).
    policies: Mapping[tuple[str, str], tuple[AuthorizationPolicy, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    @classmethod
    def build(
        cls,
        services: Iterable[Service],
        clusters: Iterable[MemberCluster],
        splits: Iterable[TrafficSplit] = (),
        routes: Iterable[ServiceRoute] = (),
        policies: Iterable[AuthorizationPolicy] = (),
    ) -> MeshView:
        """A view of any services: sorts them by key and their endpoints."""
        svc = sorted(services, key=lambda s: s.key)
        normalized = {
            s.key: Service(
                s.key, tuple(s.ports), tuple(sorted(s.endpoints)), tuple(sorted(s.addresses)), s.vip
            )
            for s in svc
        }
        return cls.of(normalized, clusters, splits, routes, policies)

    @classmethod
    def of(
        cls,
        services: Mapping[ServiceKey, Service],
        clusters: Iterable[MemberCluster],
        splits: Iterable[TrafficSplit] = (),
        routes: Iterable[ServiceRoute] = (),
        policies: Iterable[AuthorizationPolicy] = (),
    ) -> MeshView:
        """A view of services already in key order with sorted endpoints (not checked); copies the
        mapping. ``routes`` are GAMMA routes, one per (kind, namespace, name); each TrafficSplit
        joins them as a route of its own."""
        mcs = sorted(clusters, key=lambda c: c.name)
        by_root = {s.service: s for s in sorted(splits)}
        every = sorted([*routes, *(split_route(s) for s in by_root.values())])
        by_service: dict[ServiceKey, list[ServiceRoute]] = {}
        for route in every:
            by_service.setdefault(route.service, []).append(route)
        selecting: dict[tuple[str, str], list[AuthorizationPolicy]] = {}
        ordered = sorted(policies)
        for policy in ordered:
            selecting.setdefault((policy.namespace, policy.service_account), []).append(policy)
        return cls(
            services=MappingProxyType(dict(services)),
            clusters=_frozen_map((c.name, c) for c in mcs),
            version=_version(services.values(), mcs, by_root.values(), every, ordered),
            splits=MappingProxyType(by_root),
            routes=MappingProxyType({k: tuple(v) for k, v in sorted(by_service.items())}),
            policies=MappingProxyType({k: tuple(v) for k, v in sorted(selecting.items())}),
        )

    def service(self, namespace: str, name: str) -> Service | None:
        return self.services.get(ServiceKey(namespace, name))
