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
from collections.abc import Mapping
from typing import Any

from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import wrappers_pb2

from isthmus.discovery.model import (
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
from isthmus.xds.generate.clusters import gateway_services
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


def assignment(
    service: Service,
    port: ServicePort,
    proxy: Proxy,
    stale: frozenset[str] = frozenset(),
    gateways: Mapping[str, Gateway] | None = None,
    mtls: bool = False,
    name: str = "",
    gateways_down: frozenset[str] = frozenset(),
) -> Any:
    """The ClusterLoadAssignment of one service port as ``proxy`` sees it. ``gateways``: the
    east-west gateway of each member cluster that has one (used only with mTLS); the proxy's own
    cluster is always reached directly."""
    gateways = gateways if mtls and gateways else {}
    by_locality: dict[Locality, list[Endpoint]] = defaultdict(list)
    for ep in service.endpoints:
        by_locality[ep.locality].append(ep)
    groups = []
    for loc in sorted(by_locality):
        gateway = gateways.get(loc.cluster) if loc.cluster != proxy.cluster else None
        down = gateway is not None and loc.cluster in gateways_down
        lb_endpoints, healthy = _locality_endpoints(by_locality[loc], port, gateway, mtls, down)
        if lb_endpoints:
            groups.append((loc, lb_endpoints, healthy, priority_class(proxy.locality, loc, stale)))
    renumber = {c: i for i, c in enumerate(sorted({g[3] for g in groups}))}
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name or naming.outbound_cluster(service, port))
    for loc, lb_endpoints, healthy, klass in groups:
        cla.endpoints.append(
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(region=loc.region, zone=loc.zone, sub_zone=loc.cluster),
                lb_endpoints=lb_endpoints,
                load_balancing_weight=wrappers_pb2.UInt32Value(value=max(healthy, 1)),
                priority=renumber[klass],
            )
        )
    return cla


def gateway_assignment(service: Service, port: ServicePort, proxy: Proxy) -> Any:
    """A gateway's view: only the sidecars of its own cluster, at their inbound (mTLS) port."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=naming.sni(service, port))
    by_locality: dict[Locality, list[Endpoint]] = defaultdict(list)
    for ep in service.endpoints:
        if ep.locality.cluster == proxy.cluster and ep.sidecar_port:
            by_locality[ep.locality].append(ep)
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
    out: dict[str, Any] = {}
    if proxy.role is Role.GATEWAY:
        if identity.mtls:
            for service, port in gateway_services(view, proxy):
                cla = gateway_assignment(service, port, proxy)
                out[cla.cluster_name] = cla
        return out
    stale = stale_clusters(view)
    gateways = {name: c.gateway for name, c in view.clusters.items() if c.gateway is not None}
    down = frozenset(name for name, c in view.clusters.items() if c.gateway_down)
    for service in view.services.values():
        for port in service.ports:
            cla = assignment(service, port, proxy, stale, gateways, identity.mtls, gateways_down=down)
            out[cla.cluster_name] = cla
    return out
