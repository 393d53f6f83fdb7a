"""RDS: the sidecar's outbound route table, one virtual host per HTTP service port, matched by Host.

Short names (``web``) resolve in the proxy's own namespace only, as Kubernetes DNS
does. A Host without a port means port 80 if the service has it, else its first
HTTP port.
"""

from __future__ import annotations

from typing import Any

from envoy.config.route.v3 import route_components_pb2, route_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from isthmus.discovery.model import MeshView, Service, ServicePort
from isthmus.xds import naming
from isthmus.xds.generate.identity import PLAINTEXT, MeshIdentity
from isthmus.xds.proxy import Proxy, Role

REQUEST_TIMEOUT_S = 15
RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,reset"
NUM_RETRIES = 2


def empty(name: str) -> Any:
    return route_pb2.RouteConfiguration(name=name)


def _portless_port(service: Service) -> ServicePort | None:
    http = [p for p in service.ports if p.protocol.is_http]
    if not http:
        return None
    return next((p for p in http if p.port == 80), http[0])


def virtual_host(service: Service, port: ServicePort, domains: list[str]) -> Any:
    return route_components_pb2.VirtualHost(
        name=f"{naming.service_fqdn(service)}:{port.port}",
        domains=domains,
        routes=[
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix="/"),
                route=route_components_pb2.RouteAction(
                    cluster=naming.outbound_cluster(service, port),
                    timeout=duration_pb2.Duration(seconds=REQUEST_TIMEOUT_S),
                    retry_policy=route_components_pb2.RetryPolicy(
                        retry_on=RETRY_ON, num_retries=wrappers_pb2.UInt32Value(value=NUM_RETRIES)
                    ),
                ),
            )
        ],
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
                service, port, short=service.namespace == proxy.namespace, portless=port is portless
            )
            domains = [h for h in hosts if h not in seen]
            seen.update(domains)
            if domains:
                config.virtual_hosts.append(virtual_host(service, port, domains))
    return config


def generate(view: MeshView, proxy: Proxy, identity: MeshIdentity = PLAINTEXT) -> dict[str, Any]:
    if proxy.role is not Role.SIDECAR:
        return {}
    config = outbound_routes(view, proxy)
    return {config.name: config}
