"""CDS: one EDS-backed Envoy cluster per service port, locality-weighted, with outlier detection
and circuit-breaker defaults; upstream mTLS to sidecars and gateways; a sidecar's inbound clusters
to its own application (and a captured one's passthrough to original destinations); a gateway's
SNI-named passthrough clusters."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2

from isthmus.discovery.model import Endpoint, MeshView, Protocol, Service, ServicePort
from isthmus.xds import naming
from isthmus.xds.generate import tls
from isthmus.xds.generate.identity import PLAINTEXT, MeshIdentity
from isthmus.xds.proxy import Proxy, Role

CONNECT_TIMEOUT_S = 2
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _ads() -> Any:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def _http2_options() -> Any:
    opts = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    packed = any_pb2.Any()
    packed.Pack(opts)
    return packed


def outlier_detection() -> Any:
    """Eject a host after 3 consecutive gateway failures (502/503/504 and connect failures) or 5
    consecutive 5xx; for 10 s the first time, longer when it repeats (docs/resilience.md)."""
    return outlier_detection_pb2.OutlierDetection(
        consecutive_5xx=wrappers_pb2.UInt32Value(value=5),
        consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=3),
        enforcing_consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=100),
        interval=duration_pb2.Duration(seconds=2),
        base_ejection_time=duration_pb2.Duration(seconds=10),
        max_ejection_percent=wrappers_pb2.UInt32Value(value=100),
    )


def _eds_cluster(name: str, port: ServicePort) -> Any:
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads(), service_name=name),
        connect_timeout=duration_pb2.Duration(seconds=CONNECT_TIMEOUT_S),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
            locality_weighted_lb_config=cluster_pb2.Cluster.CommonLbConfig.LocalityWeightedLbConfig()
        ),
        outlier_detection=outlier_detection(),
        circuit_breakers=circuit_breaker_pb2.CircuitBreakers(
            thresholds=[
                circuit_breaker_pb2.CircuitBreakers.Thresholds(
                    max_connections=wrappers_pb2.UInt32Value(value=4096),
                    max_pending_requests=wrappers_pb2.UInt32Value(value=4096),
                    max_requests=wrappers_pb2.UInt32Value(value=4096),
                    max_retries=wrappers_pb2.UInt32Value(value=64),
                )
            ]
        ),
    )
    return cluster


def cluster_for(service: Service, port: ServicePort, identity: MeshIdentity = PLAINTEXT) -> Any:
    """A sidecar's outbound cluster. With mTLS, endpoints marked ``tlsMode: isthmus`` (sidecars,
    gateways) get mesh mTLS with the service port's SNI; the others plain text."""
    cluster = _eds_cluster(naming.outbound_cluster(service, port), port)
    if port.protocol in (Protocol.HTTP2, Protocol.GRPC):
        cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(_http2_options())
    if identity.mtls:
        peers = [
            identity.spiffe_id(service.namespace, e.service_account)
            for e in service.endpoints
            if e.sidecar_port
        ]
        match = struct_pb2.Struct()
        match.update({tls.TLS_MODE_KEY: tls.TLS_MODE_MTLS})
        cluster.transport_socket_matches.append(
            cluster_pb2.Cluster.TransportSocketMatch(
                name="mtls",
                match=match,
                transport_socket=tls.upstream_socket(identity, naming.sni(service, port), peers),
            )
        )
    return cluster


def gateway_cluster(service: Service, port: ServicePort) -> Any:
    """A gateway's cluster for one service port, named by its SNI: raw TCP to the local sidecars
    (the TLS session passes through untouched; the gateway holds no key)."""
    return _eds_cluster(naming.sni(service, port), port)


def own_endpoint(service: Service, proxy: Proxy) -> Endpoint | None:
    """The proxy's own endpoint of its service, found by address (its workload's or its own)."""
    addresses = {proxy.app_address, proxy.listen_address}
    return next((e for e in service.endpoints if e.address in addresses), None)


def single_endpoint_cluster(
    name: str,
    address: Any,
    kind: Any = cluster_pb2.Cluster.STATIC,
    connect_timeout_s: int = CONNECT_TIMEOUT_S,
) -> Any:
    """A cluster of one endpoint at ``address`` (an envoy.config.core.v3.Address)."""
    return cluster_pb2.Cluster(
        name=name,
        type=kind,
        connect_timeout=duration_pb2.Duration(seconds=connect_timeout_s),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(address=address)
                        )
                    ]
                )
            ],
        ),
    )


def inbound_cluster(port: ServicePort, proxy: Proxy, own: Endpoint | None = None) -> Any:
    """A sidecar's cluster to its own application: ``app_address`` and the port its endpoint
    declares for this service port (else the service's target port)."""
    name = naming.inbound_cluster(port)
    app_port = own.port_for(port) if own is not None else port.target_port
    address = address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=proxy.app_address, port_value=app_port)
    )
    cluster = single_endpoint_cluster(name, address)
    if port.protocol in (Protocol.HTTP2, Protocol.GRPC):
        cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(_http2_options())
    return cluster


def gateway_services(view: MeshView, proxy: Proxy) -> list[tuple[Service, ServicePort]]:
    """Service ports a gateway forwards: those with sidecar endpoints in the gateway's own cluster."""
    out: list[tuple[Service, ServicePort]] = []
    for service in view.services.values():
        if exported_through_gateway(service, proxy.cluster):
            out.extend((service, port) for port in service.ports)
    return out


def exported_through_gateway(service: Service, cluster: str) -> bool:
    """Whether ``cluster``'s east-west gateway forwards to this service: it has sidecars there."""
    return any(e.sidecar_port and e.locality.cluster == cluster for e in service.endpoints)


def generate(view: MeshView, proxy: Proxy, identity: MeshIdentity = PLAINTEXT) -> dict[str, Any]:
    """Sidecars: every service port of the mesh, plus inbound clusters to their own application.
    Gateways: one passthrough cluster per exported service port (needs mTLS: SNI routing)."""
    return {**generate_shared(view, proxy, identity), **generate_own(view, proxy, identity)}


def generate_shared(view: MeshView, proxy: Proxy, identity: MeshIdentity = PLAINTEXT) -> dict[str, Any]:
    """The clusters every sidecar (or every gateway of a member cluster) gets alike."""
    out: dict[str, Any] = {}
    if proxy.role is Role.GATEWAY:
        if identity.mtls:
            for service, port in gateway_services(view, proxy):
                c = gateway_cluster(service, port)
                out[c.name] = c
        return out
    for service in view.services.values():
        for port in service.ports:
            c = cluster_for(service, port, identity)
            out[c.name] = c
    return out


def passthrough_cluster() -> Any:
    """Connections of a captured sidecar to no mesh service, on to where they were going."""
    return cluster_pb2.Cluster(
        name=naming.PASSTHROUGH_CLUSTER,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=duration_pb2.Duration(seconds=CONNECT_TIMEOUT_S),
    )


def generate_own(view: MeshView, proxy: Proxy, identity: MeshIdentity = PLAINTEXT) -> dict[str, Any]:
    """A sidecar's inbound clusters to its own application, and if captured its passthrough cluster
    (nothing for gateways)."""
    out: dict[str, Any] = {}
    if proxy.role is Role.SIDECAR and proxy.capture:
        out[naming.PASSTHROUGH_CLUSTER] = passthrough_cluster()
    own = view.service(proxy.namespace, proxy.service)
    if proxy.role is Role.SIDECAR and identity.mtls and own is not None:
        mine = own_endpoint(own, proxy)
        for port in own.ports:
            c = inbound_cluster(port, proxy, mine)
            out[c.name] = c
    return out


# What CDS reads of a service (see generate.INPUTS): the shared part reads its ports, the accounts
# of its sidecar endpoints (SAN matching) and the clusters where it has sidecars (gateways); a
# pod's own part reads its own service's ports and its own endpoint. Not endpoint addresses.
def shared_inputs(service: Service | None) -> Hashable:
    if service is None:
        return None
    sidecars = [e for e in service.endpoints if e.sidecar_port]
    return (
        service.ports,
        frozenset(e.service_account for e in sidecars),
        frozenset(e.locality.cluster for e in sidecars),
    )


def own_inputs(service: Service | None, proxy: Proxy) -> Hashable:
    if service is None:
        return None
    mine = own_endpoint(service, proxy)
    return service.ports, mine.ports if mine is not None else None
