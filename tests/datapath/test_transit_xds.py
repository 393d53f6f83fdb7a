"""xDS over the transit network (issue 12), what the "transit" mode of the data-path tier adds.

The control plane runs in its own network namespace and serves xDS over TLS on its transit address
only (``--xds-san`` that address); every proxy (sidecars and gateways in the cluster namespaces)
crosses the transit bridge to reach it and is served only if its bearer token proves the identity
its Node claims (``--xds-token-file``). test_crosscluster.py runs its scenarios in this mode too;
here: a proxy without valid credentials gets nothing while the others in the same clusters are
served.
"""

from __future__ import annotations

import asyncio

import pytest

from datapath.harness import DataPath, eventually, holds
from datapath.scenario import answered_by, meshed, pods, start_sidecars

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.datapath,
    pytest.mark.parametrize("dp", ["transit"], indirect=True),
]


async def test_a_proxy_without_valid_credentials_gets_nothing_while_the_others_are_served(
    dp: DataPath,
) -> None:
    """api runs in west; east's client reaches it through west's gateway, all three proxies with
    their own tokens. Three more sidecars in east claim the client's identity: one presents no token,
    one a token the control plane does not know, one a real token of another service account (api).
    Each of them is refused (its xDS stream ends with UNAUTHENTICATED or PERMISSION_DENIED) and has
    no cluster and no listener, while the authenticated proxies keep being served."""
    p = await pods(dp, ("west", "api-west"))
    cp = await dp.control_plane(dp.mesh.service("api", meshed(dp, p["api-west"], "api")))
    await start_sidecars(dp, {"api-west": "api"}, p)
    await dp.gateway("west")
    client = await dp.sidecar("east", "client")
    assert dp.tokens is not None
    others = dp.tokens.mint("shop", "api", "east")  # known to the server: shop/api in east
    tokens: dict[str, str | bool] = {
        "no token": False,
        "unknown token": "dp-not-a-token-of-anyone",
        "token of another service account": others,
    }
    started = await asyncio.gather(*(dp.sidecar("east", "client", token=t) for t in tokens.values()))
    refused = dict(zip(tokens, started, strict=True))

    async def served() -> None:
        assert await answered_by(client, "api.shop", count=4) == {"api-west": 4}

    await eventually(served, what="east's authenticated client reaches api in west", within=20)
    # What the client runs: ADS through Envoy's gRPC client to the control plane's transit address.
    dumped = await client.admin.json("/config_dump")
    bootstrap = next(c for c in dumped["configs"] if c["@type"].endswith("BootstrapConfigDump"))
    ads = bootstrap["bootstrap"]["dynamic_resources"]["ads_config"]["grpc_services"][0]
    assert ads["google_grpc"]["target_uri"] == cp.xds_address, ads
    assert dp.cp_net is not None
    assert cp.xds_host == dp.cp_net.transit_address

    async def each_was_refused() -> None:
        # Each refused sidecar reached the control plane and had its stream closed: Envoy's gRPC
        # client counts the status (16 UNAUTHENTICATED, 7 PERMISSION_DENIED); the token-less one
        # talks xDS through Envoy's own gRPC client, which does not, so the server's count says it.
        closed = {
            what: await refused[what].admin.stats(rf"^grpc\.isthmus_xds\.streams_closed_{code}$")
            for what, code in (("unknown token", 16), ("token of another service account", 7))
        }
        assert all(sum(got.values()) >= 1 for got in closed.values()), closed
        counted = (await cp.readyz())["xds"]["refused_streams"]
        assert counted.get("no-credentials", 0) >= 1, counted

    await eventually(each_was_refused, what="each sidecar without valid credentials was refused", within=20)

    async def nothing_for_the_refused() -> None:
        for what, proxy in refused.items():
            proxy.process.ensure_running()
            assert await proxy.admin.active_clusters() == {}, what
            assert await proxy.admin.config_dump("dynamic_listeners") == [], what
        assert (await cp.readyz())["proxies"] == 3, "only the api sidecar, the gateway and the client"

    await holds(nothing_for_the_refused, what="the refused sidecars get no configuration", duration=3)
    await served()  # ... and the authenticated ones still are
