"""LDS: the sidecar's outbound HTTP listener (routes come from RDS by Host), one outbound listener
per TCP service port, and its inbound mTLS listener; the east-west gateway's SNI passthrough listener.

* Inbound (sidecar, mTLS on, its service known): ``listen_address:inbound_port``, one filter chain
  per port of the proxy's own service, matched by the SNI clients send for it. TLS is terminated
  with the proxy's certificate and a client certificate of the trust domain is required; HTTP ports
  go through an HTTP connection manager that sets ``x-forwarded-client-cert`` (the caller's SPIFFE
  URI, any value sent by the client is replaced), TCP ports through tcp_proxy, both to the
  application at ``app_address:target_port``.
* East-west gateway: ``listen_address:15443`` (the gateway's ``inbound_port`` metadata is ignored),
  tls_inspector, one filter chain per service port with sidecars in the gateway's cluster, matched
  by SNI and forwarded by tcp_proxy without terminating TLS. A connection with an unknown SNI (or
  none) matches no chain and is closed.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from isthmus.discovery.model import MeshView, Service, ServicePort
from isthmus.xds import naming
from isthmus.xds.generate.clusters import gateway_services, shared_inputs
from isthmus.xds.generate.identity import PLAINTEXT, MeshIdentity
from isthmus.xds.generate.tls import downstream_socket
from isthmus.xds.generate.tls import pack as _pack
from isthmus.xds.proxy import DEFAULT_GATEWAY_PORT, Proxy, Role

HCM = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"


def _address(host: str, port: int) -> Any:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def _router() -> Any:
    return hcm.HttpFilter(name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router()))


def _tls_inspector() -> Any:
    return listener_components_pb2.ListenerFilter(
        name="envoy.filters.listener.tls_inspector", typed_config=_pack(tls_inspector_pb2.TlsInspector())
    )


def _tcp_proxy(stat_prefix: str, cluster: str) -> Any:
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster)
    return listener_components_pb2.Filter(name=TCP_PROXY, typed_config=_pack(proxy))


def outbound_http_listener(proxy: Proxy) -> Any:
    manager = hcm.HttpConnectionManager(
        stat_prefix="outbound_http",
        codec_type=hcm.HttpConnectionManager.AUTO,
        rds=hcm.Rds(
            route_config_name=naming.OUTBOUND_HTTP_ROUTE,
            config_source=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            ),
        ),
        http_filters=[_router()],
    )
    return listener_pb2.Listener(
        name=naming.outbound_http_listener(proxy.outbound_port),
        address=_address(proxy.listen_address, proxy.outbound_port),
        traffic_direction=base_pb2.OUTBOUND,
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[listener_components_pb2.Filter(name=HCM, typed_config=_pack(manager))]
            )
        ],
    )


def outbound_tcp_listeners(view: MeshView, proxy: Proxy) -> list[Any]:
    """One listener per TCP service port, on ``listen_address:PORT``, straight to its cluster.

    Without traffic interception a TCP client has no Host header to route by, so the port alone
    names the service: when two TCP services share a port number, the first by namespace/name
    gets it (and a port equal to the proxy's own outbound or inbound port is skipped)."""
    taken = {proxy.outbound_port, proxy.inbound_port}
    out = []
    for service in view.services.values():  # in namespace/name order (a MeshView guarantee)
        for port in service.ports:
            if port.protocol.is_http or port.port in taken:
                continue
            taken.add(port.port)
            out.append(
                listener_pb2.Listener(
                    name=naming.outbound_tcp_listener(service, port),
                    address=_address(proxy.listen_address, port.port),
                    traffic_direction=base_pb2.OUTBOUND,
                    filter_chains=[
                        listener_components_pb2.FilterChain(
                            filters=[
                                _tcp_proxy(
                                    f"outbound_tcp_{port.port}", naming.outbound_cluster(service, port)
                                )
                            ]
                        )
                    ],
                )
            )
    return out


def _inbound_http(port: ServicePort) -> Any:
    cluster = naming.inbound_cluster(port)
    manager = hcm.HttpConnectionManager(
        stat_prefix=f"inbound_{port.port}",
        codec_type=hcm.HttpConnectionManager.AUTO,
        forward_client_cert_details=hcm.HttpConnectionManager.SANITIZE_SET,
        set_current_client_cert_details=hcm.HttpConnectionManager.SetCurrentClientCertDetails(uri=True),
        route_config=route_pb2.RouteConfiguration(
            name=cluster,
            virtual_hosts=[
                route_components_pb2.VirtualHost(
                    name=cluster,
                    domains=["*"],
                    routes=[
                        route_components_pb2.Route(
                            match=route_components_pb2.RouteMatch(prefix="/"),
                            route=route_components_pb2.RouteAction(cluster=cluster),
                        )
                    ],
                )
            ],
        ),
        http_filters=[_router()],
    )
    return listener_components_pb2.Filter(name=HCM, typed_config=_pack(manager))


def inbound_listener(service: Service, proxy: Proxy, identity: MeshIdentity) -> Any:
    chains = []
    for port in service.ports:
        network_filter = (
            _inbound_http(port)
            if port.protocol.is_http
            else _tcp_proxy(f"inbound_{port.port}", naming.inbound_cluster(port))
        )
        chains.append(
            listener_components_pb2.FilterChain(
                name=f"inbound_{port.port}",
                filter_chain_match=listener_components_pb2.FilterChainMatch(
                    server_names=[naming.sni(service, port)]
                ),
                transport_socket=downstream_socket(identity),
                filters=[network_filter],
            )
        )
    return listener_pb2.Listener(
        name=naming.inbound_listener(proxy.inbound_port),
        address=_address(proxy.listen_address, proxy.inbound_port),
        traffic_direction=base_pb2.INBOUND,
        listener_filters=[_tls_inspector()],
        filter_chains=chains,
    )


def gateway_listener(view: MeshView, proxy: Proxy) -> Any:
    chains = [
        listener_components_pb2.FilterChain(
            name=naming.sni(service, port),
            filter_chain_match=listener_components_pb2.FilterChainMatch(
                server_names=[naming.sni(service, port)]
            ),
            filters=[_tcp_proxy("eastwest", naming.sni(service, port))],
        )
        for service, port in gateway_services(view, proxy)
    ]
    return listener_pb2.Listener(
        name=naming.gateway_listener(DEFAULT_GATEWAY_PORT),
        address=_address(proxy.listen_address, DEFAULT_GATEWAY_PORT),
        traffic_direction=base_pb2.INBOUND,
        listener_filters=[_tls_inspector()],
        # The TLS ClientHello must arrive quickly; a silent connection is not mesh traffic.
        listener_filters_timeout=duration_pb2.Duration(seconds=5),
        filter_chains=chains,
        per_connection_buffer_limit_bytes=wrappers_pb2.UInt32Value(value=32768),
    )


def generate(view: MeshView, proxy: Proxy, identity: MeshIdentity = PLAINTEXT) -> dict[str, Any]:
    if proxy.role is Role.GATEWAY:
        if not identity.mtls:
            return {}
        listener = gateway_listener(view, proxy)
        # Envoy rejects a listener without filter chains: no exported service, no listener.
        return {listener.name: listener} if listener.filter_chains else {}
    out = {}
    listener = outbound_http_listener(proxy)
    out[listener.name] = listener
    for tcp in outbound_tcp_listeners(view, proxy):
        out[tcp.name] = tcp
    own = view.service(proxy.namespace, proxy.service)
    if identity.mtls and own is not None and own.ports:
        inbound = inbound_listener(own, proxy, identity)
        out[inbound.name] = inbound
    return out


def inputs(service: Service | None) -> Hashable:
    """What LDS reads of a service (see generate.INPUTS): its ports (TCP listeners, a pod's inbound
    listener) and, for gateways, the clusters where it has sidecars. Not endpoint addresses."""
    return shared_inputs(service)
