"""LDS: the sidecar's outbound HTTP listener (routes come from RDS by Host).

Gateways get their SNI passthrough listener in the data-path work (issue 4);
until then a gateway receives no listeners.
"""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import any_pb2

from isthmus.discovery.model import MeshView
from isthmus.xds import naming
from isthmus.xds.proxy import Proxy, Role


def _pack(message: Any) -> Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


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
        http_filters=[
            hcm.HttpFilter(name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router()))
        ],
    )
    return listener_pb2.Listener(
        name=naming.outbound_http_listener(proxy.outbound_port),
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(
                address=proxy.listen_address, port_value=proxy.outbound_port
            )
        ),
        traffic_direction=base_pb2.OUTBOUND,
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=_pack(manager)
                    )
                ]
            )
        ],
    )


def generate(view: MeshView, proxy: Proxy) -> dict[str, Any]:
    if proxy.role is not Role.SIDECAR:
        return {}
    listener = outbound_http_listener(proxy)
    return {listener.name: listener}
