"""The router: the last HTTP filter of every connection manager (it forwards by the routes)."""

from __future__ import annotations

from typing import Any

from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

from isthmus.discovery.model import MeshView, Service, ServicePort
from isthmus.xds.generate.identity import MeshIdentity
from isthmus.xds.generate.tls import pack
from isthmus.xds.proxy import Proxy


def router() -> Any:
    return hcm.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))


def http_filter(
    view: MeshView, proxy: Proxy, service: Service, port: ServicePort, identity: MeshIdentity
) -> Any:
    return router()
