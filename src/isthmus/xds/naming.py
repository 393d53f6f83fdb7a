"""Names of generated resources: one documented scheme (docs/naming.md), used everywhere.

sidecar cluster / ClusterLoadAssignment:  outbound|PORT||NAME.NS.svc.cluster.local
outbound HTTP listener and its routes:  outbound_http_PORT (listener), outbound_http (route)
captured sidecar's outbound and DNS listeners, passthrough cluster:  outbound_PORT, dns_PORT, passthrough
mTLS SNI of a service port, and the gateway's cluster for it:  outbound_.PORT_._.NAME.NS.svc.cluster.local
sidecar inbound listener / cluster:  inbound_PORT (listener), inbound|PORT|| (cluster to the app)
east-west gateway listener:  eastwest_PORT
SDS secrets:  default (the proxy's own certificate), ROOTCA (the trust bundle)
"""

from __future__ import annotations

from isthmus.discovery.model import Service, ServicePort

CLUSTER_DOMAIN = "cluster.local"
CLUSTERSET_DOMAIN = "clusterset.local"
OUTBOUND_HTTP_ROUTE = "outbound_http"
PASSTHROUGH_CLUSTER = "passthrough"
WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"


def service_fqdn(service: Service, domain: str = CLUSTER_DOMAIN) -> str:
    return f"{service.name}.{service.namespace}.svc.{domain}"


# A cluster no proxy is sent: a route (or a weighted share of one) to a backend that cannot be used
# goes there and gets the route's cluster_not_found_response_code, 500 (Gateway API).
NO_CLUSTER = "isthmus|no-backend"


def outbound_cluster(service: Service, port: ServicePort) -> str:
    return f"outbound|{port.port}||{service_fqdn(service)}"


def sni(service: Service, port: ServicePort) -> str:
    """The TLS server name a client sends for a service port; gateways route on it."""
    return f"outbound_.{port.port}_._.{service_fqdn(service)}"


def inbound_listener(port: int) -> str:
    return f"inbound_{port}"


def inbound_cluster(port: ServicePort) -> str:
    return f"inbound|{port.port}||"


def gateway_listener(port: int) -> str:
    return f"eastwest_{port}"


def outbound_http_listener(port: int) -> str:
    return f"outbound_http_{port}"


def outbound_listener(port: int) -> str:
    return f"outbound_{port}"


def dns_listener(port: int) -> str:
    return f"dns_{port}"


def outbound_tcp_listener(service: Service, port: ServicePort) -> str:
    return f"outbound_tcp|{port.port}||{service_fqdn(service)}"


def host_names(
    service: Service, port: ServicePort, *, short: bool, portless: bool, addresses: tuple[str, ...] = ()
) -> list[str]:
    """Hosts a client may use for a service port: FQDNs, ``name.ns``, (``short``, same namespace
    only) ``name``, and the service's ``addresses`` (IPv6 in brackets); each with ``:PORT``, and
    without it when ``portless``."""
    bases = [
        f"{service.name}.{service.namespace}",
        f"{service.name}.{service.namespace}.svc",
        service_fqdn(service),
        service_fqdn(service, CLUSTERSET_DOMAIN),
        *(f"[{a}]" if ":" in a else a for a in addresses),
    ]
    if short:
        bases.insert(0, service.name)
    hosts = [f"{base}:{port.port}" for base in bases]
    if portless:
        hosts += bases
    return hosts
