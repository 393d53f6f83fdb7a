"""EDS: one ClusterLoadAssignment per service port, endpoints grouped by locality.

Localities are (region, zone, member cluster). Priority 0 is the proxy's own
member cluster and zone, then the rest of its member cluster, then the rest of
its region, then everything else, and last the
endpoints of member clusters whose API server has been unreachable for longer
than the maximum staleness (state STALE), whatever their locality: they are
used only when nothing fresher is left. Priorities are renumbered to stay
contiguous, as Envoy requires. A locality's weight is its number of healthy
endpoints.

Split horizon (with mTLS on): the endpoints of another member cluster that has an
east-west gateway are replaced by that gateway's address, one LbEndpoint per
remote locality weighted by its number of healthy sidecar endpoints, marked for
mTLS; the SNI then tells the gateway which service port to forward to. A member
cluster without a gateway is taken to share the proxy's network and its
endpoints are used directly. Gateways get only their own cluster's sidecars.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import wrappers_pb2

from isthmus.discovery.model import (
    FULL_WEIGHT,
    ClusterState,
    Endpoint,
    Gateway,
    Health,
    Locality,
    MeshView,
    Service,
    ServicePort,
)
from isthmus.xds import naming
from isthmus.xds.generate import tls
from isthmus.xds.generate.clusters import exported_through_gateway
from isthmus.xds.generate.identity import PLAINTEXT, MeshIdentity
from isthmus.xds.proxy import Proxy, Role

TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"

_HEALTH = {
    Health.HEALTHY: health_check_pb2.HEALTHY,
    Health.UNHEALTHY: health_check_pb2.UNHEALTHY,
    Health.DRAINING: health_check_pb2.DRAINING,
}


def empty(name: str) -> Any:
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name)


STALE_CLASS = 4
DRAINED_CLASS = 5


def priority_class(proxy: Locality, endpoint: Locality, stale: frozenset[str] = frozenset()) -> int:
    """0: own member cluster and zone; 1: own member cluster, another zone; 2: same region;
    3: elsewhere; 4: a stale member cluster (see the module docstring)."""
    if endpoint.cluster in stale:
        return STALE_CLASS
    if proxy.cluster and endpoint.cluster == proxy.cluster:
        return 0 if not proxy.zone or endpoint.zone == proxy.zone else 1
    if proxy.region and endpoint.region == proxy.region:
        return 2
    return 3


def stale_clusters(view: MeshView) -> frozenset[str]:
    return frozenset(name for name, c in view.clusters.items() if c.state is ClusterState.STALE)


def _by_locality(endpoints: Iterable[Endpoint]) -> dict[Locality, list[Endpoint]]:
    grouped: dict[Locality, list[Endpoint]] = defaultdict(list)
    for endpoint in endpoints:
        grouped[endpoint.locality].append(endpoint)
    return grouped


def _mtls_metadata() -> Any:
    metadata = base_pb2.Metadata()
    metadata.filter_metadata[TRANSPORT_SOCKET_MATCH].update({tls.TLS_MODE_KEY: tls.TLS_MODE_MTLS})
    return metadata


def _lb_endpoint(address: str, port: int, health: Any, mtls: bool, weight: int = 0) -> Any:
    lb = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address=address, port_value=port)
            )
        ),
        health_status=health,
    )
    if mtls:
        lb.metadata.CopyFrom(_mtls_metadata())
    if weight:
        lb.load_balancing_weight.value = weight
    return lb


def _direct(endpoint: Endpoint, port: ServicePort, mtls: bool) -> Any:
    """The endpoint itself: its sidecar (mTLS) when it has one and mTLS is on, else the workload."""
    if mtls and endpoint.sidecar_port:
        return _lb_endpoint(endpoint.address, endpoint.sidecar_port, _HEALTH[endpoint.health], True)
    return _lb_endpoint(endpoint.address, endpoint.port_for(port), _HEALTH[endpoint.health], False)


def _locality_endpoints(
    endpoints: list[Endpoint], port: ServicePort, gateway: Gateway | None, mtls: bool, down: bool = False
) -> tuple[list[Any], int]:
    """LbEndpoints of one locality and its weight (its number of healthy endpoints)."""
    if gateway is None:
        healthy = sum(1 for e in endpoints if e.health is Health.HEALTHY)
        return [_direct(e, port, mtls) for e in endpoints], healthy
    # Split horizon: the remote cluster's gateway stands for its sidecar endpoints, weighted by
    # how many of them are healthy. Endpoints without a sidecar cannot be reached through it.
    meshed = [e for e in endpoints if e.sidecar_port]
    if not meshed:
        return [], 0
    healthy = sum(1 for e in meshed if e.health is Health.HEALTHY)
    status = health_check_pb2.HEALTHY if healthy and not down else health_check_pb2.UNHEALTHY
    return [_lb_endpoint(gateway.address, gateway.port, status, True, max(healthy, 1))], healthy


@dataclass(frozen=True, slots=True)
class Reach:
    """What EDS needs to know of the member clusters, computed once per view."""

    stale: frozenset[str] = frozenset()
    gateways: Mapping[str, Gateway] = field(default_factory=dict)  # used only with mTLS
    gateways_down: frozenset[str] = frozenset()
    weights: Mapping[str, int] = field(default_factory=dict)  # percent of normal traffic; absent = 100
    mtls: bool = False

    @classmethod
    def of(cls, view: MeshView, mtls: bool) -> Reach:
        clusters = view.clusters.values()
        return cls(
            stale=stale_clusters(view),
            gateways={c.name: c.gateway for c in clusters if c.gateway is not None} if mtls else {},
            gateways_down=frozenset(c.name for c in clusters if c.gateway_down),
            weights={c.name: c.weight for c in clusters if c.weight < FULL_WEIGHT},
            mtls=mtls,
        )


@dataclass(slots=True)
class _Group:
    locality: Locality
    lb_endpoints: list[Any]
    weight: int
    klass: int


def _drain(groups: list[_Group], weights: Mapping[str, int]) -> None:
    """Apply drain weights (docs/naming.md): a drained cluster (0) goes after everything; a cluster
    being drained shares a priority with its fallback, its weight scaled down, the fallback's up."""
    for group in groups:
        if weights.get(group.locality.cluster, FULL_WEIGHT) == 0:
            group.klass = DRAINED_CLASS
    for group in groups:
        share = weights.get(group.locality.cluster, FULL_WEIGHT)
        if not 0 < share < FULL_WEIGHT:
            continue
        steady = [g for g in groups if weights.get(g.locality.cluster, FULL_WEIGHT) == FULL_WEIGHT]
        fallback = min((g.klass for g in steady if g.klass >= group.klass), default=None)
        if fallback is None:
            continue  # nothing to drain to: keep serving
        for other in steady:
            if other.klass == fallback:
                other.weight *= FULL_WEIGHT - share if fallback > group.klass else FULL_WEIGHT
        group.klass = fallback
        group.weight = max(1, group.weight * share)


def assignment(
    service: Service, port: ServicePort, proxy: Proxy, reach: Reach = Reach(), name: str = ""
) -> Any:
    """The ClusterLoadAssignment of one service port as ``proxy`` sees it (the proxy's own cluster
    is always reached directly; other clusters through their gateway when they have one)."""
    by_locality = _by_locality(service.endpoints)
    groups = []
    for loc in sorted(by_locality):
        gateway = reach.gateways.get(loc.cluster) if loc.cluster != proxy.cluster else None
        down = gateway is not None and loc.cluster in reach.gateways_down
        lb_endpoints, healthy = _locality_endpoints(by_locality[loc], port, gateway, reach.mtls, down)
        if lb_endpoints:
            klass = priority_class(proxy.locality, loc, reach.stale)
            groups.append(_Group(loc, lb_endpoints, max(healthy, 1), klass))
    if reach.weights:
        _drain(groups, reach.weights)
    renumber = {c: i for i, c in enumerate(sorted({g.klass for g in groups}))}
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name or naming.outbound_cluster(service, port))
    for g in groups:
        cla.endpoints.append(
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(
                    region=g.locality.region, zone=g.locality.zone, sub_zone=g.locality.cluster
                ),
                lb_endpoints=g.lb_endpoints,
                load_balancing_weight=wrappers_pb2.UInt32Value(value=g.weight),
                priority=renumber[g.klass],
            )
        )
    return cla


def gateway_assignment(service: Service, port: ServicePort, proxy: Proxy) -> Any:
    """A gateway's view: only the sidecars of its own cluster, at their inbound (mTLS) port."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=naming.sni(service, port))
    by_locality = _by_locality(
        e for e in service.endpoints if e.locality.cluster == proxy.cluster and e.sidecar_port
    )
    for loc in sorted(by_locality):
        eps = by_locality[loc]
        cla.endpoints.append(
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(region=loc.region, zone=loc.zone, sub_zone=loc.cluster),
                lb_endpoints=[_lb_endpoint(e.address, e.sidecar_port, _HEALTH[e.health], False) for e in eps],
                load_balancing_weight=wrappers_pb2.UInt32Value(
                    value=max(1, sum(1 for e in eps if e.health is Health.HEALTHY))
                ),
            )
        )
    return cla


def generate(view: MeshView, proxy: Proxy, identity: MeshIdentity = PLAINTEXT) -> dict[str, Any]:
    reach = context(view, proxy, identity)
    out: dict[str, Any] = {}
    for service in view.services.values():
        out.update(for_service(service, proxy, reach))
    return out


def context(view: MeshView, proxy: Proxy, identity: MeshIdentity = PLAINTEXT) -> Reach:
    """Everything besides one service that its assignments depend on (see ``for_service``)."""
    return Reach.of(view, identity.mtls)


def for_service(service: Service, proxy: Proxy, reach: Reach) -> dict[str, Any]:
    """The assignments of one service's ports: a function of (service, proxy, reach) only, so the
    cache reuses them while the Service object and the reach stay the same."""
    out: dict[str, Any] = {}
    if proxy.role is Role.GATEWAY:
        if reach.mtls and exported_through_gateway(service, proxy.cluster):
            for port in service.ports:
                cla = gateway_assignment(service, port, proxy)
                out[cla.cluster_name] = cla
        return out
    for port in service.ports:
        cla = assignment(service, port, proxy, reach)
        out[cla.cluster_name] = cla
    return out
