"""EDS: one ClusterLoadAssignment per service port, endpoints grouped by locality.

Localities are (region, zone, member cluster). Priority 0 is the proxy's own
member cluster, then the rest of its region, then everything else, and last the
endpoints of member clusters whose API server has been unreachable for longer
than the maximum staleness (state STALE), whatever their locality: they are
used only when nothing fresher is left. Priorities are renumbered to stay
contiguous, as Envoy requires. A locality's weight is its number of healthy
endpoints.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import wrappers_pb2

from isthmus.discovery.model import ClusterState, Endpoint, Health, Locality, MeshView, Service, ServicePort
from isthmus.xds import naming
from isthmus.xds.proxy import Proxy

_HEALTH = {
    Health.HEALTHY: health_check_pb2.HEALTHY,
    Health.UNHEALTHY: health_check_pb2.UNHEALTHY,
    Health.DRAINING: health_check_pb2.DRAINING,
}


def empty(name: str) -> Any:
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name)


STALE_CLASS = 3


def priority_class(proxy: Locality, endpoint: Locality, stale: frozenset[str] = frozenset()) -> int:
    """0: same member cluster; 1: same region; 2: elsewhere; 3: a stale member cluster."""
    if endpoint.cluster in stale:
        return STALE_CLASS
    if proxy.cluster and endpoint.cluster == proxy.cluster:
        return 0
    if proxy.region and endpoint.region == proxy.region:
        return 1
    return 2


def _lb_endpoint(endpoint: Endpoint, port: ServicePort) -> Any:
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(
                    address=endpoint.address, port_value=endpoint.port_for(port)
                )
            )
        ),
        health_status=_HEALTH[endpoint.health],
    )


def stale_clusters(view: MeshView) -> frozenset[str]:
    return frozenset(name for name, c in view.clusters.items() if c.state is ClusterState.STALE)


def assignment(service: Service, port: ServicePort, proxy: Proxy, stale: frozenset[str] = frozenset()) -> Any:
    by_locality: dict[Locality, list[Endpoint]] = defaultdict(list)
    for ep in service.endpoints:
        by_locality[ep.locality].append(ep)
    classes = sorted({priority_class(proxy.locality, loc, stale) for loc in by_locality})
    renumber = {c: i for i, c in enumerate(classes)}
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=naming.outbound_cluster(service, port))
    for loc in sorted(by_locality):
        eps = by_locality[loc]
        healthy = sum(1 for e in eps if e.health is Health.HEALTHY)
        cla.endpoints.append(
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(region=loc.region, zone=loc.zone, sub_zone=loc.cluster),
                lb_endpoints=[_lb_endpoint(e, port) for e in eps],
                load_balancing_weight=wrappers_pb2.UInt32Value(value=max(healthy, 1)),
                priority=renumber[priority_class(proxy.locality, loc, stale)],
            )
        )
    return cla


def generate(view: MeshView, proxy: Proxy) -> dict[str, Any]:
    out: dict[str, Any] = {}
    stale = stale_clusters(view)
    for service in view.services.values():
        for port in service.ports:
            cla = assignment(service, port, proxy, stale)
            out[cla.cluster_name] = cla
    return out
