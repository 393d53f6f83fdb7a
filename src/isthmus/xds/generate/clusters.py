"""CDS: one EDS-backed Envoy cluster per service port, locality-weighted, with outlier detection
and circuit-breaker defaults."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import config_source_pb2, protocol_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from isthmus.discovery.model import MeshView, Protocol, Service, ServicePort
from isthmus.xds import naming
from isthmus.xds.proxy import Proxy

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


def cluster_for(service: Service, port: ServicePort) -> Any:
    name = naming.outbound_cluster(service, port)
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads(), service_name=name),
        connect_timeout=duration_pb2.Duration(seconds=CONNECT_TIMEOUT_S),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
            locality_weighted_lb_config=cluster_pb2.Cluster.CommonLbConfig.LocalityWeightedLbConfig()
        ),
        outlier_detection=outlier_detection_pb2.OutlierDetection(
            consecutive_5xx=wrappers_pb2.UInt32Value(value=5),
            consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=3),
            interval=duration_pb2.Duration(seconds=5),
            base_ejection_time=duration_pb2.Duration(seconds=15),
            max_ejection_percent=wrappers_pb2.UInt32Value(value=100),
        ),
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
    if port.protocol in (Protocol.HTTP2, Protocol.GRPC):
        cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(_http2_options())
    return cluster


def generate(view: MeshView, proxy: Proxy) -> dict[str, Any]:
    """Every service port in the mesh, for sidecars and gateways alike."""
    out: dict[str, Any] = {}
    for service in view.services.values():
        for port in service.ports:
            c = cluster_for(service, port)
            out[c.name] = c
    return out
