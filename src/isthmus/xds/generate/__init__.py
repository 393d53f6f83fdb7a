"""Generators: pure functions ``(MeshView, Proxy, MeshIdentity) -> {name: message}``, one module
per type URL. MeshIdentity carries the trust domain and bundle, and for SDS the proxy's certificate.

They import neither gRPC nor the Kubernetes client (import-linter checks it) and
never mutate their inputs; the cache memoizes them per (view version, Proxy.for_type(type URL)).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from isthmus.discovery.model import MeshView, Service
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
    types.ROUTE: (("rds-shared", routes.generate_outbound), ("rds-own", routes.generate_inbound)),
}


# Types generated service by service: (context of the view, generator of one service's resources).
# The cache regenerates only services whose Service object changed, while the context is equal.
PER_SERVICE: Mapping[str, tuple[Callable[..., Any], Callable[..., Mapping[str, Any]]]] = {
    types.ENDPOINT: (endpoints.context, endpoints.for_service),
}


@dataclass(frozen=True, slots=True)
class Inputs:
    """What one type's (or part's) generator reads of a MeshView besides the proxy.

    ``service`` projects a Service (None: absent) onto what the generator reads of it, whatever the
    proxy; ``own`` (if set) projects the proxy's own service onto what it reads for that proxy only;
    ``routes``: it reads the routes attached to services (MeshView.routes); ``policies``: the
    authorization policies (MeshView.policies). When a new view
    differs from the last one only in services whose projections are equal (and not in what else
    the type reads), the cache keeps the type's resources as they are: an endpoint's new address
    regenerates EDS, not CDS, LDS or RDS. Nothing listed here reads the member clusters. Tested
    against generation from scratch.
    """

    service: Callable[[Service | None], Hashable]
    own: Callable[[Service | None, Proxy], Hashable] | None = None
    routes: bool = False
    policies: bool = False


def _nothing(service: Service | None) -> Hashable:
    return None


INPUTS: Mapping[str, Inputs] = {
    "cds-shared": Inputs(clusters.shared_inputs),
    "cds-own": Inputs(_nothing, own=clusters.own_inputs),
    types.LISTENER: Inputs(listeners.inputs, policies=True),
    "rds-shared": Inputs(routes.inputs, routes=True),
    "rds-own": Inputs(_nothing, own=routes.own_inputs, policies=True),
    types.SECRET: Inputs(_nothing),  # certificates change outside the view (ConfigCache.rotate_certificates)
}


def placeholder(type_url: str, name: str) -> Any:
    """The empty resource sent for a requested EDS/RDS name that does not exist (yet)."""
    if type_url == types.ENDPOINT:
        return endpoints.empty(name)
    if type_url == types.ROUTE:
        return routes.empty(name)
    raise ValueError(f"no placeholder for {type_url}")
