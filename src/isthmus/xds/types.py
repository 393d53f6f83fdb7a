"""Type URLs the server speaks, and the order in which ADS pushes them (make-before-break)."""

from __future__ import annotations

from typing import Final

CLUSTER: Final = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER: Final = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE: Final = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET: Final = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

# ADS push order: clusters before the endpoints they need, listeners before their routes.
# Removals are sent only after every addition in this order has been ACKed.
PUSH_ORDER: Final[tuple[str, ...]] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)

# Types whose SotW responses always carry the full state (xDS protocol: LDS and CDS).
FULL_STATE: Final[frozenset[str]] = frozenset({CLUSTER, LISTENER})

# Types where a request for a name that does not exist is answered with an empty
# resource of that name, so that Envoy never keeps a cluster or listener warming.
PLACEHOLDER_ON_MISSING: Final[frozenset[str]] = frozenset({ENDPOINT, ROUTE})

SHORT_NAMES: Final[dict[str, str]] = {
    CLUSTER: "cds",
    ENDPOINT: "eds",
    LISTENER: "lds",
    ROUTE: "rds",
    SECRET: "sds",
}


def short(type_url: str) -> str:
    return SHORT_NAMES.get(type_url, type_url.rsplit("/", 1)[-1])
