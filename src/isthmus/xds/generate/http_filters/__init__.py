"""The HTTP filters of a sidecar's inbound HTTP connection manager: one module per feature, in the
order stated here, once. A feature is a pure function of (view, proxy, its service, the port,
identity) giving its filter, or None where it does not apply; the listener builder asks each in turn
and never names a feature itself. New filters (rate limits, external authorization, ...) plug in
here, before the router, which is always last.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from isthmus.discovery.model import MeshView, Service, ServicePort
from isthmus.xds.generate.http_filters import authorization, router
from isthmus.xds.generate.identity import MeshIdentity
from isthmus.xds.proxy import Proxy

Feature = Callable[[MeshView, Proxy, Service, ServicePort, MeshIdentity], Any | None]

INBOUND: tuple[Feature, ...] = (
    authorization.http_filter,  # who may call: denied requests go no further
    router.http_filter,
)


def inbound(
    view: MeshView, proxy: Proxy, service: Service, port: ServicePort, identity: MeshIdentity
) -> list[Any]:
    """The filters of the inbound connection manager of ``service``'s ``port``, in order."""
    found = (feature(view, proxy, service, port, identity) for feature in INBOUND)
    return [f for f in found if f is not None]
