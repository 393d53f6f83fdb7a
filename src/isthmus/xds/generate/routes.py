"""RDS: the sidecar's outbound route table, one virtual host per HTTP service port, matched by Host.

A service that is the root of an SMI TrafficSplit routes to its backends' clusters with the split's
weights (weighted_clusters); each backend is balanced by its own EDS, so backends may live in any
member cluster.

Short names (``web``) resolve in the proxy's own namespace only, as Kubernetes DNS
does. For a captured proxy, a service's ClusterIPs in its member cluster and its clusterset IP are
names too (a captured client that calls an address sends it as Host); an uncaptured one reaches
services by name only, and its route table is the same in every member cluster. A Host without a
port means port 80 if the service has it, else its first HTTP port.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import previous_priorities_config_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from isthmus.discovery.model import MeshView, Service, ServicePort, TrafficSplit
from isthmus.xds import naming
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


def split_clusters(view: MeshView, split: TrafficSplit, port: ServicePort) -> list[tuple[str, int]]:
    """(Envoy cluster, weight) of each backend with a weight: its port with the root port's number,
    else its first HTTP port. Backends unknown to the mesh (yet) are left out."""
    out = []
    for name, weight in split.backends:
        backend = view.service(split.service.namespace, name)
        if backend is None or weight <= 0:
            continue
        same = next((p for p in backend.ports if p.port == port.port and p.protocol.is_http), None)
        chosen = same or _portless_port(backend)
        if chosen is not None:
            out.append((naming.outbound_cluster(backend, chosen), weight))
    return out


def virtual_host(
    service: Service, port: ServicePort, domains: list[str], split: list[tuple[str, int]] | None = None
) -> Any:
    action = route_components_pb2.RouteAction(
        timeout=duration_pb2.Duration(seconds=REQUEST_TIMEOUT_S), retry_policy=retry_policy()
    )
    if split:
        action.weighted_clusters.CopyFrom(
            route_components_pb2.WeightedCluster(
                clusters=[
                    route_components_pb2.WeightedCluster.ClusterWeight(
                        name=cluster, weight=wrappers_pb2.UInt32Value(value=weight)
                    )
                    for cluster, weight in split
                ]
            )
        )
    else:
        action.cluster = naming.outbound_cluster(service, port)
    return route_components_pb2.VirtualHost(
        name=f"{naming.service_fqdn(service)}:{port.port}",
        domains=domains,
        routes=[route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix="/"), route=action)],
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
            split = view.splits.get(service.key)
            weighted = split_clusters(view, split, port) if split is not None else None
            if domains:
                config.virtual_hosts.append(virtual_host(service, port, domains, weighted))
    return config


def generate(view: MeshView, proxy: Proxy, identity: MeshIdentity = PLAINTEXT) -> dict[str, Any]:
    if proxy.role is not Role.SIDECAR:
        return {}
    config = outbound_routes(view, proxy)
    return {config.name: config}


def inputs(service: Service | None) -> Hashable:
    """What RDS reads of a service (see generate.INPUTS): that it exists, its ports and addresses."""
    return None if service is None else (service.ports, service.addresses, service.vip)
