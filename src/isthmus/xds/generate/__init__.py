"""Generators: pure functions ``(MeshView, Proxy, MeshIdentity) -> {name: message}``, one module
per type URL. MeshIdentity carries the trust domain and bundle, and for SDS the proxy's certificate.

They import neither gRPC nor the Kubernetes client (import-linter checks it) and
never mutate their inputs; the cache memoizes them per (view version, Proxy.for_type(type URL)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from isthmus.discovery.model import MeshView
from isthmus.xds import types
from isthmus.xds.generate import clusters, endpoints, listeners, routes, secrets
from isthmus.xds.generate.identity import MeshIdentity
from isthmus.xds.proxy import Proxy

Generator = Callable[[MeshView, Proxy, MeshIdentity], Mapping[str, Any]]

GENERATORS: Mapping[str, Generator] = {
    types.CLUSTER: clusters.generate,
    types.ENDPOINT: endpoints.generate,
    types.LISTENER: listeners.generate,
    types.ROUTE: routes.generate,
    types.SECRET: secrets.generate,
}


# Types generated in parts, each shared by its own group of proxies (Proxy.for_type(part name)), so
# that what is the same for every sidecar is generated once and what is per pod stays small.
PARTS: Mapping[str, tuple[tuple[str, Generator], ...]] = {
    types.CLUSTER: (("cds-shared", clusters.generate_shared), ("cds-own", clusters.generate_own)),
}


# Types generated service by service: (context of the view, generator of one service's resources).
# The cache regenerates only services whose Service object changed, while the context is equal.
PER_SERVICE: Mapping[str, tuple[Callable[..., Any], Callable[..., Mapping[str, Any]]]] = {
    types.ENDPOINT: (endpoints.context, endpoints.for_service),
}


def placeholder(type_url: str, name: str) -> Any:
    """The empty resource sent for a requested EDS/RDS name that does not exist (yet)."""
    if type_url == types.ENDPOINT:
        return endpoints.empty(name)
    if type_url == types.ROUTE:
        return routes.empty(name)
    raise ValueError(f"no placeholder for {type_url}")
