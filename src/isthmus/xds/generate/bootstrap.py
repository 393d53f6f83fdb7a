"""Envoy bootstrap: the node identity, locality and ADS config that make an Envoy a client of isthmus.

A pure function from BootstrapOptions to an envoy.config.bootstrap.v3.Bootstrap
message; the CLI renders it as JSON or YAML. Building the message (not a dict)
means a typo in a field name fails here, not in Envoy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    backoff_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    protocol_pb2,
)
from envoy.config.grpc_credential.v3 import file_based_metadata_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, duration_pb2, json_format, struct_pb2

from isthmus.xds.generate.clusters import single_endpoint_cluster
from isthmus.xds.generate.tls import pack, xds_client_socket
from isthmus.xds.proxy import DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT, METADATA_KEY, Role

XDS_CLUSTER = "isthmus_xds"
ADMIN_CLUSTER = "isthmus_admin"  # the readiness listener's way to the admin API's /ready
READINESS_LISTENER = "isthmus_readiness"
CLUSTER_HEADER = "isthmus-cluster"  # gRPC metadata: the member cluster a proxy says it runs in


@dataclass(frozen=True, slots=True)
class BootstrapOptions:
    role: Role
    cluster: str
    namespace: str
    service: str
    service_account: str = "default"
    pod: str = ""  # the pod's name, for a pod-bound service-account token ("" = not in a pod)
    node_name: str = ""  # the Kubernetes node the pod runs on: isthmus reads its locality from it
    node_id: str = ""
    region: str = ""
    zone: str = ""
    xds_host: str = "127.0.0.1"
    xds_port: int = 15010
    xds_socket: str = ""  # a Unix domain socket path instead of host and port
    xds_root_ca: str = ""  # TLS to the control plane, trusting this PEM file (the mesh root); "" = plain text
    xds_server_name: str = ""  # the SAN expected in its certificate (and SNI); default: xds_host
    token_file: str = ""  # authenticate with the bearer token in this file (needs xds_root_ca)
    admin_address: str = "127.0.0.1"
    admin_port: int = 15000
    delta: bool = False
    listen_address: str = "0.0.0.0"
    app_address: str = "127.0.0.1"
    outbound_port: int = DEFAULT_OUTBOUND_PORT
    inbound_port: int = DEFAULT_INBOUND_PORT
    readiness_port: int = 0  # a static listener answering only GET /ready from the admin API (0: none)
    capture: bool = False  # the pod's traffic is captured: isthmus sends listeners by original destination
    outbound_traffic: str = "allow-any"  # captured connections to no mesh service: allow-any | registry-only

    @property
    def effective_node_id(self) -> str:
        return self.node_id or f"{self.role.value}~{self.service}.{self.namespace}~{self.cluster}"


def _xds_cluster(opts: BootstrapOptions) -> Any:
    http2 = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions(
                connection_keepalive=protocol_pb2.KeepaliveSettings(
                    interval=duration_pb2.Duration(seconds=30), timeout=duration_pb2.Duration(seconds=5)
                )
            )
        )
    )
    packed = any_pb2.Any()
    packed.Pack(http2)
    if opts.xds_socket:
        address = address_pb2.Address(pipe=address_pb2.Pipe(path=opts.xds_socket))
    else:
        address = address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=opts.xds_host, port_value=opts.xds_port)
        )
    kind = cluster_pb2.Cluster.STATIC if opts.xds_socket else cluster_pb2.Cluster.STRICT_DNS
    cluster = single_endpoint_cluster(XDS_CLUSTER, address, kind, connect_timeout_s=1)
    cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].CopyFrom(packed)
    if opts.xds_root_ca:
        cluster.transport_socket.CopyFrom(
            xds_client_socket(opts.xds_root_ca, opts.xds_server_name or opts.xds_host)
        )
    return cluster


def _admin_cluster(opts: BootstrapOptions) -> Any:
    address = address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=opts.admin_address, port_value=opts.admin_port)
    )
    return single_endpoint_cluster(ADMIN_CLUSTER, address, connect_timeout_s=1)


def _readiness_listener(opts: BootstrapOptions) -> Any:
    """``GET /ready`` on ``readiness_port`` (all addresses), answered by the admin API's /ready (200
    once Envoy has its initial configuration): a kubelet readiness probe, without exposing the rest
    of the admin API, which stays on loopback. Any other path: 404."""
    ready = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(path="/ready"),
        route=route_components_pb2.RouteAction(cluster=ADMIN_CLUSTER),
    )
    other = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"),
        direct_response=route_components_pb2.DirectResponseAction(status=404),
    )
    manager = hcm.HttpConnectionManager(
        stat_prefix="readiness",
        route_config=route_pb2.RouteConfiguration(
            name=READINESS_LISTENER,
            virtual_hosts=[
                route_components_pb2.VirtualHost(name="readiness", domains=["*"], routes=[ready, other])
            ],
        ),
        http_filters=[
            hcm.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))
        ],
    )
    return listener_pb2.Listener(
        name=READINESS_LISTENER,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="0.0.0.0", port_value=opts.readiness_port)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=pack(manager)
                    )
                ]
            )
        ],
    )


def _envoy_grpc() -> Any:
    return grpc_service_pb2.GrpcService(
        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
            cluster_name=XDS_CLUSTER,
            # Reconnect within seconds of a control plane restart (Envoy's default
            # backoff grows to 30 s): 0.25 s doubling up to 5 s, jittered.
            retry_policy=base_pb2.RetryPolicy(
                retry_back_off=backoff_pb2.BackoffStrategy(
                    base_interval=duration_pb2.Duration(nanos=250_000_000),
                    max_interval=duration_pb2.Duration(seconds=5),
                )
            ),
        )
    )


def _google_grpc(opts: BootstrapOptions) -> Any:
    """ADS through Envoy's gRPC client library, which can add call credentials: the token read from
    ``token_file`` by the file_based_metadata plugin as ``authorization: Bearer ...``, and the
    member cluster as ``isthmus-cluster``. TLS with the mesh root; the name checked is
    ``xds_server_name`` (the target's host otherwise)."""
    google = grpc_service_pb2.GrpcService.GoogleGrpc
    target = f"unix:{opts.xds_socket}" if opts.xds_socket else f"{opts.xds_host}:{opts.xds_port}"
    plugin = file_based_metadata_pb2.FileBasedMetadataConfig(
        secret_data=base_pb2.DataSource(filename=opts.token_file),
        header_key="authorization",
        header_prefix="Bearer ",
    )
    channel = google(
        target_uri=target,
        stat_prefix=XDS_CLUSTER,
        channel_credentials=google.ChannelCredentials(
            ssl_credentials=google.SslCredentials(root_certs=base_pb2.DataSource(filename=opts.xds_root_ca))
        ),
        call_credentials=[
            google.CallCredentials(
                from_plugin=google.CallCredentials.MetadataCredentialsFromPlugin(
                    name="envoy.grpc_credentials.file_based_metadata", typed_config=pack(plugin)
                )
            )
        ],
        credentials_factory_name="envoy.grpc_credentials.file_based_metadata",
    )
    if opts.xds_server_name:
        channel.channel_args.args["grpc.ssl_target_name_override"].string_value = opts.xds_server_name
    return grpc_service_pb2.GrpcService(
        google_grpc=channel,
        initial_metadata=[base_pb2.HeaderValue(key=CLUSTER_HEADER, value=opts.cluster)],
    )


def bootstrap(opts: BootstrapOptions) -> Any:
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            METADATA_KEY: {
                "role": opts.role.value,
                "cluster": opts.cluster,
                "namespace": opts.namespace,
                "service": opts.service,
                "service_account": opts.service_account,
                **({"pod": opts.pod} if opts.pod else {}),
                **({"node_name": opts.node_name} if opts.node_name else {}),
                "listen_address": opts.listen_address,
                "app_address": opts.app_address,
                # Strings: Struct numbers are doubles and would render as 15001.0.
                "outbound_port": str(opts.outbound_port),
                "inbound_port": str(opts.inbound_port),
                **({"capture": True, "outbound_traffic": opts.outbound_traffic} if opts.capture else {}),
            }
        }
    )
    # No initial fetch timeout: without its first clusters and listeners Envoy stays initializing
    # (admin /ready 503, listeners closed) instead of going live with nothing after 15 s, so a proxy
    # that cannot reach isthmus is never taken for ready.
    ads_source = config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
        initial_fetch_timeout=duration_pb2.Duration(seconds=0),
    )
    api_type = (
        config_source_pb2.ApiConfigSource.DELTA_GRPC if opts.delta else config_source_pb2.ApiConfigSource.GRPC
    )
    return bootstrap_pb2.Bootstrap(
        node=base_pb2.Node(
            id=opts.effective_node_id,
            cluster=f"{opts.service}.{opts.namespace}",
            locality=base_pb2.Locality(region=opts.region, zone=opts.zone, sub_zone=opts.cluster),
            metadata=metadata,
        ),
        dynamic_resources=bootstrap_pb2.Bootstrap.DynamicResources(
            ads_config=config_source_pb2.ApiConfigSource(
                api_type=api_type,
                transport_api_version=config_source_pb2.V3,
                grpc_services=[_google_grpc(opts) if opts.token_file else _envoy_grpc()],
                set_node_on_first_message_only=True,
            ),
            cds_config=ads_source,
            lds_config=ads_source,
        ),
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(
            clusters=[
                _xds_cluster(opts),
                *([_admin_cluster(opts)] if opts.readiness_port else []),
            ],
            listeners=[_readiness_listener(opts)] if opts.readiness_port else [],
        ),
        admin=bootstrap_pb2.Admin(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(
                    address=opts.admin_address, port_value=opts.admin_port
                )
            )
        ),
    )


def bootstrap_dict(opts: BootstrapOptions) -> dict[str, Any]:
    """The bootstrap as plain data (proto3 JSON mapping), ready for json.dumps or yaml.safe_dump."""
    text = json_format.MessageToJson(bootstrap(opts), preserving_proto_field_name=True)
    result: dict[str, Any] = json.loads(text)  # plain dicts (Any fields come back as OrderedDict otherwise)
    return result
