"""Which identity may act as a member cluster's east-west gateway, and only as it.

A gateway's Node claims the role ``gateway`` and a member cluster; an authenticated gateway must be
the service account configured for that cluster's gateway (``--gateway-identity
[CLUSTER=]NAMESPACE/SERVICEACCOUNT``; default ``isthmus-system/isthmus-gateway``). A sidecar's
token cannot make it a gateway, and the gateway's token cannot make it a sidecar (which would be
served a workload certificate and key for the gateway's account: gateways hold no keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

from isthmus.xds.proxy import Proxy, Role
from isthmus.xds.server.auth import AuthFailure, Authorizer, Revocation, StreamAuthenticator

DEFAULT_GATEWAY_IDENTITY = ("isthmus-system", "isthmus-gateway")


@dataclass(frozen=True, slots=True)
class GatewayIdentities:
    default: tuple[str, str] = DEFAULT_GATEWAY_IDENTITY
    by_cluster: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def of(cls, entries: tuple[tuple[str, str, str], ...]) -> GatewayIdentities:
        default = next(((ns, sa) for c, ns, sa in entries if not c), DEFAULT_GATEWAY_IDENTITY)
        return cls(default, {c: (ns, sa) for c, ns, sa in entries if c})

    def gateway_of(self, cluster: str) -> tuple[str, str]:
        return self.by_cluster.get(cluster, self.default)

    def check(self, proxy: Proxy) -> None:
        claimed = (proxy.namespace, proxy.service_account)
        gateway = self.gateway_of(proxy.cluster)
        if proxy.role is Role.GATEWAY and claimed != gateway:
            raise AuthFailure(
                grpc.StatusCode.PERMISSION_DENIED,
                "not-the-gateway",
                f"node {proxy.node_id} claims to be member cluster {proxy.cluster!r}'s gateway as "
                f"{claimed[0]}/{claimed[1]}; its gateway is {gateway[0]}/{gateway[1]}",
            )
        if proxy.role is not Role.GATEWAY and claimed == gateway:
            raise AuthFailure(
                grpc.StatusCode.PERMISSION_DENIED,
                "not-the-gateway",
                f"node {proxy.node_id}: {claimed[0]}/{claimed[1]} is member cluster "
                f"{proxy.cluster!r}'s gateway account and may only connect as its gateway",
            )


class GatewayChecked:
    """A ``StreamAuthenticator`` that applies ``GatewayIdentities`` to the Nodes ``inner`` admits."""

    def __init__(self, inner: StreamAuthenticator, gateways: GatewayIdentities) -> None:
        self.inner, self.gateways = inner, gateways

    async def __call__(self, metadata: Mapping[str, str]) -> Authorizer:
        authorize = await self.inner(metadata)

        def checked(proxy: Proxy) -> Revocation | None:
            self.gateways.check(proxy)
            return authorize(proxy)

        return checked
