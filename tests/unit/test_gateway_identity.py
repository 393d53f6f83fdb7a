"""Gateway identities (identity.gateways): only the configured service account of a member cluster's
gateway is admitted as that gateway, and it is admitted as nothing else; --gateway-identity parses
[CLUSTER=]NAMESPACE/SERVICEACCOUNT with a clear error."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from isthmus.discovery.model import Locality
from isthmus.identity.gateways import GatewayChecked, GatewayIdentities
from isthmus.identity.tokens import StaticTokens
from isthmus.settings import SettingsError, parse_gateway_identity
from isthmus.xds.proxy import Proxy, Role
from isthmus.xds.server.auth import AuthFailure


def node(role: Role, namespace: str, account: str, cluster: str = "east") -> Proxy:
    return Proxy(f"{role}~x.{namespace}~{cluster}", role, namespace, "x", account, Locality("", "", cluster))


@pytest.fixture
def checked(tmp_path: Path) -> GatewayChecked:
    path = tmp_path / "tokens.csv"
    path.write_text(
        "gw-east,isthmus-system,isthmus-gateway,east\ngw-west,edge,west-gw,west\nweb,shop,web,east\n"
    )
    identities = GatewayIdentities.of((("west", "edge", "west-gw"),))
    return GatewayChecked(StaticTokens(path), identities)


async def admitted(checked: GatewayChecked, token: str, proxy: Proxy) -> AuthFailure | None:
    authorize = await checked({"authorization": f"Bearer {token}", "isthmus-cluster": proxy.cluster})
    try:
        authorize(proxy)
    except AuthFailure as exc:
        return exc
    return None


async def test_only_the_configured_account_is_a_clusters_gateway(checked: GatewayChecked) -> None:
    assert await admitted(checked, "gw-east", node(Role.GATEWAY, "isthmus-system", "isthmus-gateway")) is None
    assert await admitted(checked, "gw-west", node(Role.GATEWAY, "edge", "west-gw", "west")) is None
    assert await admitted(checked, "web", node(Role.SIDECAR, "shop", "web")) is None
    # A sidecar's token, the Node claiming the gateway role (as its own account): refused.
    refused = await admitted(checked, "web", node(Role.GATEWAY, "shop", "web"))
    assert refused is not None
    assert (refused.code, refused.reason) == (grpc.StatusCode.PERMISSION_DENIED, "not-the-gateway")
    assert "its gateway is isthmus-system/isthmus-gateway" in refused.details
    # West's gateway account is not east's default.
    assert await admitted(checked, "gw-west", node(Role.GATEWAY, "edge", "west-gw", "west")) is None


async def test_the_gateways_account_cannot_connect_as_a_sidecar(checked: GatewayChecked) -> None:
    refused = await admitted(checked, "gw-east", node(Role.SIDECAR, "isthmus-system", "isthmus-gateway"))
    assert refused is not None
    assert refused.reason == "not-the-gateway"
    assert "may only connect as its gateway" in refused.details


def test_gateway_identity_flags() -> None:
    assert parse_gateway_identity("edge/gw") == ("", "edge", "gw")
    assert parse_gateway_identity("west=edge/gw") == ("west", "edge", "gw")
    identities = GatewayIdentities.of((("", "edge", "gw"), ("west", "w", "g")))
    assert identities.gateway_of("east") == ("edge", "gw")
    assert identities.gateway_of("west") == ("w", "g")
    assert GatewayIdentities.of(()).gateway_of("east") == ("isthmus-system", "isthmus-gateway")
    for bad in ("gw", "=edge/gw", "edge/", "/gw", "a/b/c"):
        with pytest.raises(SettingsError, match="--gateway-identity"):
            parse_gateway_identity(bad)
