"""LDS: the sidecar's outbound HTTP listener (routes come from RDS by Host), one outbound listener
per TCP service port, and its inbound mTLS listener; the east-west gateway's SNI passthrough listener.

* Captured sidecars (``Proxy.capture``: the pod's traffic is redirected by inject.capture) get
  instead one outbound listener on ``127.0.0.1:outbound_port`` that reads each connection's original
  destination (original_dst listener filter) and picks a filter chain by it: per service port, the
  service's ClusterIPs in the proxy's own member cluster and its clusterset IP; HTTP ports (one chain
  per port number) through the HTTP connection manager and the routes, TCP ports through tcp_proxy
  to the service's cluster. A connection to the outbound port itself is the explicit proxy (Host
  routing, as uncaptured). Any other destination goes through the passthrough cluster to where it
  was going (``allow-any``), or matches no chain and is closed (``registry-only``). And a DNS
  listener (UDP, ``127.0.0.1:15053``, where capture sends port 53): Envoy's DNS filter answers
  ``NAME.NS.svc.clusterset.local`` with the clusterset IP, and ``NAME.NS.svc.cluster.local`` too for a
  service the proxy's cluster does not define; other names go to the pod's resolver (A and AAAA
  queries; the DNS filter answers other types NOTIMP).

* Inbound (sidecar, mTLS on, its service known): ``listen_address:inbound_port``, one filter chain
  per port of the proxy's own service, matched by the SNI clients send for it. TLS is terminated
  with the proxy's certificate and a client certificate of the trust domain is required; HTTP ports
  go through an HTTP connection manager that sets ``x-forwarded-client-cert`` (the caller's SPIFFE
  URI, any value sent by the client is replaced) and runs the inbound HTTP filters (http_filters:
  authorization, then the router), TCP ports through tcp_proxy (after network RBAC when a policy
  selects the workload; then the handshake also accepts only the allowed callers' certificates and
  tcp_proxy connects the app only after it), both to the application at ``app_address:target_port``.
* East-west gateway: ``listen_address:15443`` (the gateway's ``inbound_port`` metadata is ignored),
  tls_inspector, one filter chain per service port with sidecars in the gateway's cluster, matched
  by SNI and forwarded by tcp_proxy without terminating TLS. A connection with an unknown SNI (or
  none) matches no chain and is closed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable
from typing import Any

from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, extension_pb2, resolver_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2, udp_listener_config_pb2
from envoy.data.dns.v3 import dns_table_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.filters.udp.dns_filter.v3 import dns_filter_pb2
from envoy.extensions.network.dns_resolver.cares.v3 import cares_dns_resolver_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from isthmus.discovery.model import MeshView, Protocol, Service, ServicePort
from isthmus.xds import naming
from isthmus.xds.generate import http_filters
from isthmus.xds.generate.clusters import gateway_services, shared_inputs
from isthmus.xds.generate.http_filters import authorization
from isthmus.xds.generate.http_filters.router import router as _router
from isthmus.xds.generate.identity import PLAINTEXT, MeshIdentity
from isthmus.xds.generate.tls import downstream_socket
from isthmus.xds.generate.tls import pack as _pack
from isthmus.xds.proxy import DEFAULT_GATEWAY_PORT, DNS_PORT, OutboundTraffic, Proxy, Role

HCM = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"
DNS_RESOLVER_TIMEOUT_S = 2


def _address(host: str, port: int) -> Any:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def _tls_inspector() -> Any:
    return listener_components_pb2.ListenerFilter(
        name="envoy.filters.listener.tls_inspector", typed_config=_pack(tls_inspector_pb2.TlsInspector())
    )


def _tcp_proxy(stat_prefix: str, cluster: str, after_handshake: bool = False) -> Any:
    """``after_handshake``: connect upstream only once the downstream TLS handshake is done."""
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster)
    if after_handshake:
        proxy.upstream_connect_mode = tcp_proxy_pb2.ON_DOWNSTREAM_TLS_HANDSHAKE
        # Envoy requires it with a delayed connect; 0: no bytes read before the app is connected.
        proxy.max_early_data_bytes.value = 0
    return listener_components_pb2.Filter(name=TCP_PROXY, typed_config=_pack(proxy))


def _outbound_http() -> Any:
    """The outbound HTTP connection manager: routes by Host from RDS."""
    manager = hcm.HttpConnectionManager(
        stat_prefix="outbound_http",
        codec_type=hcm.HttpConnectionManager.AUTO,
        rds=_rds(naming.OUTBOUND_HTTP_ROUTE),
        http_filters=[_router()],
    )
    return listener_components_pb2.Filter(name=HCM, typed_config=_pack(manager))


def outbound_http_listener(proxy: Proxy) -> Any:
    return listener_pb2.Listener(
        name=naming.outbound_http_listener(proxy.outbound_port),
        address=_address(proxy.listen_address, proxy.outbound_port),
        traffic_direction=base_pb2.OUTBOUND,
        filter_chains=[listener_components_pb2.FilterChain(filters=[_outbound_http()])],
    )


def _destination(port: int, ips: list[str]) -> Any:
    return listener_components_pb2.FilterChainMatch(
        destination_port=wrappers_pb2.UInt32Value(value=port),
        prefix_ranges=[
            address_pb2.CidrRange(
                address_prefix=ip,
                prefix_len=wrappers_pb2.UInt32Value(value=ipaddress.ip_address(ip).max_prefixlen),
            )
            for ip in ips
        ],
    )


def captured_outbound_listener(view: MeshView, proxy: Proxy) -> Any:
    """The outbound listener of a captured sidecar: filter chains by original destination."""
    http_ips: dict[int, list[str]] = {}
    tcp_chains = []
    seen: set[tuple[str, int]] = set()
    for service in view.services.values():  # in namespace/name order: the first claims an address
        ips = service.reachable_at(proxy.cluster)
        for port in service.ports:
            fresh = [ip for ip in ips if (ip, port.port) not in seen]
            seen.update((ip, port.port) for ip in fresh)
            if not fresh or port.port == proxy.outbound_port:
                continue
            if port.protocol.is_http:
                http_ips.setdefault(port.port, []).extend(fresh)
                continue
            cluster = naming.outbound_cluster(service, port)
            tcp_chains.append(
                listener_components_pb2.FilterChain(
                    name=cluster,
                    filter_chain_match=_destination(port.port, fresh),
                    filters=[_tcp_proxy(f"outbound_tcp_{port.port}", cluster)],
                )
            )
    explicit = listener_components_pb2.FilterChain(  # the app told to use the sidecar: 127.0.0.1:15001
        name=naming.outbound_http_listener(proxy.outbound_port),
        filter_chain_match=_destination(proxy.outbound_port, ["127.0.0.1"]),
        filters=[_outbound_http()],
    )
    http_chains = [
        listener_components_pb2.FilterChain(
            name=naming.outbound_http_listener(port),
            filter_chain_match=_destination(port, ips),
            filters=[_outbound_http()],
        )
        for port, ips in sorted(http_ips.items())
    ]
    listener = listener_pb2.Listener(
        name=naming.outbound_listener(proxy.outbound_port),
        # Capture redirects to loopback; on the pod's address the port would be an open proxy.
        address=_address("127.0.0.1", proxy.outbound_port),
        traffic_direction=base_pb2.OUTBOUND,
        listener_filters=[
            listener_components_pb2.ListenerFilter(
                name="envoy.filters.listener.original_dst", typed_config=_pack(original_dst_pb2.OriginalDst())
            )
        ],
        filter_chains=[explicit, *http_chains, *tcp_chains],
    )
    if proxy.outbound_traffic is OutboundTraffic.ALLOW_ANY:
        listener.default_filter_chain.CopyFrom(
            listener_components_pb2.FilterChain(
                name=naming.PASSTHROUGH_CLUSTER,
                filters=[_tcp_proxy("outbound_passthrough", naming.PASSTHROUGH_CLUSTER)],
            )
        )
    return listener


def dns_table(view: MeshView, cluster: str) -> list[tuple[str, str]]:
    """(name, address) a captured sidecar of ``cluster`` answers: every service's clusterset name,
    and the cluster.local name of the services that cluster's own DNS does not know."""
    out = []
    for service in view.services.values():
        if not service.vip:
            continue
        out.append((naming.service_fqdn(service, naming.CLUSTERSET_DOMAIN), service.vip))
        if not service.defined_in(cluster):
            out.append((naming.service_fqdn(service), service.vip))
    return out


def dns_listener(view: MeshView, proxy: Proxy) -> Any:
    table = dns_table_pb2.DnsTable(
        virtual_domains=[
            dns_table_pb2.DnsTable.DnsVirtualDomain(
                name=name,
                endpoint=dns_table_pb2.DnsTable.DnsEndpoint(
                    address_list=dns_table_pb2.DnsTable.AddressList(address=[address])
                ),
                answer_ttl=duration_pb2.Duration(seconds=30),
            )
            for name, address in dns_table(view, proxy.cluster)
        ]
    )
    # Other names: to the resolvers of the pod's /etc/resolv.conf (the sidecar's own queries are not
    # captured), without its search domains: the application's resolver has expanded them already.
    resolver = extension_pb2.TypedExtensionConfig(
        name="envoy.network.dns_resolver.cares",
        typed_config=_pack(
            cares_dns_resolver_pb2.CaresDnsResolverConfig(
                dns_resolver_options=resolver_pb2.DnsResolverOptions(no_default_search_domain=True)
            )
        ),
    )
    config = dns_filter_pb2.DnsFilterConfig(
        stat_prefix="dns",
        server_config=dns_filter_pb2.DnsFilterConfig.ServerContextConfig(inline_dns_table=table),
        client_config=dns_filter_pb2.DnsFilterConfig.ClientContextConfig(
            resolver_timeout=duration_pb2.Duration(seconds=DNS_RESOLVER_TIMEOUT_S),
            typed_dns_resolver_config=resolver,
            max_pending_lookups=1024,
        ),
    )
    return listener_pb2.Listener(
        name=naming.dns_listener(DNS_PORT),
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(
                address="127.0.0.1", port_value=DNS_PORT, protocol=address_pb2.SocketAddress.UDP
            )
        ),
        traffic_direction=base_pb2.OUTBOUND,
        udp_listener_config=udp_listener_config_pb2.UdpListenerConfig(),
        listener_filters=[
            listener_components_pb2.ListenerFilter(
                name="envoy.filters.udp.dns_filter", typed_config=_pack(config)
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


def _rds(name: str) -> Any:
    """Routes from RDS, over the ADS stream."""
    return hcm.Rds(
        route_config_name=name,
        config_source=config_source_pb2.ConfigSource(
            ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
        ),
    )


def _inbound_http(
    view: MeshView, proxy: Proxy, service: Service, port: ServicePort, identity: MeshIdentity
) -> Any:
    """The inbound HTTP connection manager of one port: its routes (to the application, with the
    port's authorization) from RDS, named as its inbound cluster (xds.generate.routes)."""
    # The codec of the port's protocol, as the calling sidecar's cluster speaks it (clusters.py):
    # AUTO would go by the TLS ALPN, which is the mesh's ("isthmus"), not h2, and read an HTTP/2
    # caller's preface as HTTP/1 (gRPC between meshed pods failed: the conformance tests).
    http2 = port.protocol in (Protocol.HTTP2, Protocol.GRPC)
    manager = hcm.HttpConnectionManager(
        stat_prefix=f"inbound_{port.port}",
        codec_type=hcm.HttpConnectionManager.HTTP2 if http2 else hcm.HttpConnectionManager.AUTO,
        forward_client_cert_details=hcm.HttpConnectionManager.SANITIZE_SET,
        set_current_client_cert_details=hcm.HttpConnectionManager.SetCurrentClientCertDetails(uri=True),
        rds=_rds(naming.inbound_cluster(port)),
        http_filters=http_filters.inbound(view, proxy, service, port, identity),
    )
    return listener_components_pb2.Filter(name=HCM, typed_config=_pack(manager))


def inbound_listener(view: MeshView, service: Service, proxy: Proxy, identity: MeshIdentity) -> Any:
    chains = []
    for port in service.ports:
        peers = None
        if port.protocol.is_http:
            filters = [_inbound_http(view, proxy, service, port, identity)]
        else:
            # With a policy, the handshake accepts only the allowed callers, and the app is connected
            # only after it: the network RBAC alone decides at the first bytes, after tcp_proxy has
            # connected the app (a server-first app would greet a denied caller).
            peers = authorization.tcp_peers(view, proxy, port, identity)
            denied = authorization.network_filter(view, proxy, port, identity)
            tcp = _tcp_proxy(
                f"inbound_{port.port}", naming.inbound_cluster(port), after_handshake=peers is not None
            )
            filters = [denied, tcp] if denied is not None else [tcp]
        chains.append(
            listener_components_pb2.FilterChain(
                name=f"inbound_{port.port}",
                filter_chain_match=listener_components_pb2.FilterChainMatch(
                    server_names=[naming.sni(service, port)]
                ),
                transport_socket=downstream_socket(identity, peers),
                filters=filters,
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
    if proxy.capture:
        for listener in (captured_outbound_listener(view, proxy), dns_listener(view, proxy)):
            out[listener.name] = listener
    else:
        listener = outbound_http_listener(proxy)
        out[listener.name] = listener
        for tcp in outbound_tcp_listeners(view, proxy):
            out[tcp.name] = tcp
    own = view.service(proxy.namespace, proxy.service)
    if identity.mtls and own is not None and own.ports:
        inbound = inbound_listener(view, own, proxy, identity)
        out[inbound.name] = inbound
    return out


def inputs(service: Service | None) -> Hashable:
    """What LDS reads of a service (see generate.INPUTS): its ports (TCP listeners, a pod's inbound
    listener), for gateways the clusters where it has sidecars, and for captured sidecars its
    addresses. Not endpoint addresses."""
    if service is None:
        return None
    return shared_inputs(service), service.addresses, service.vip
