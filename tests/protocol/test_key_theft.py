"""Another workload's private key is never obtained (issue 12): the real cache, generators and mesh
CA behind an authenticating ADS server (static tokens, gateway accounts), and a client that holds
the token of shop/web in east tries every way we could think of to get a key of another identity.
Every Secret any attempt receives is parsed: a key may only come with a certificate for shop/web.

The attempts: claim another service account, namespace or member cluster in the Node; ask for the
other identity's secret by name, by its SPIFFE ID and by wildcard (SotW and Delta); switch Node on
a later request of the stream; open a second stream claiming another identity on the same channel;
claim the gateway role; present the token with another isthmus-cluster header; use the gateway's
own token as a sidecar; send no token or garbage.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from isthmus.discovery.file import parse_mesh
from isthmus.identity.gateways import GatewayChecked, GatewayIdentities
from isthmus.identity.tokens import StaticTokens
from isthmus.xds import types
from isthmus.xds.ca import MeshCA
from isthmus.xds.cache import ConfigCache
from isthmus.xds.server import AdsServer

from .client import make_node

MESH = """
clusters:
  - name: east
  - name: west
services:
  - name: web
    namespace: shop
    service_accounts: [web]
    ports: [{name: http, port: 80, protocol: http}]
    endpoints: [{cluster: east, address: 10.1.0.1, port: 8080, sidecar_port: 15006}]
  - name: api
    namespace: shop
    service_accounts: [api]
    ports: [{name: http, port: 80, protocol: http}]
    endpoints: [{cluster: east, address: 10.1.0.2, port: 8080, sidecar_port: 15006}]
"""
WEB, GATEWAY = "tok-web-east", "tok-gateway-east"
OWN = "spiffe://cluster.local/ns/shop/sa/web"
SECRET_NAMES = ["default", "ROOTCA", "spiffe://cluster.local/ns/shop/sa/api", "api", "shop/api", "*"]


@pytest.fixture
async def server(tmp_path: Path) -> Any:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f"{WEB},shop,web,east\n{GATEWAY},isthmus-system,isthmus-gateway,east\n")
    cache = ConfigCache()
    cache.use_ca(MeshCA.development(None, "cluster.local"))
    cache.set_view(parse_mesh(MESH, "test"))
    authenticator = GatewayChecked(StaticTokens(tokens), GatewayIdentities())
    server = AdsServer(cache, address="127.0.0.1:0", authenticator=authenticator)
    await server.start()
    yield server
    await server.stop(grace=0.5)


class Loot:
    """Every Secret received, by the URI SANs of its certificate ("" for a trust bundle)."""

    def __init__(self) -> None:
        self.keys: list[str] = []  # the identity of each private key received
        self.responses = 0
        self.statuses: list[grpc.StatusCode] = []

    def take(self, response: Any) -> None:
        self.responses += 1
        for any_resource in response.resources:
            packed = getattr(any_resource, "resource", any_resource)  # Delta wraps it in a Resource
            if not packed.type_url.endswith("tls.v3.Secret"):
                continue
            secret = secret_pb2.Secret()
            packed.Unpack(secret)
            if secret.HasField("tls_certificate"):
                pem = secret.tls_certificate.certificate_chain.inline_bytes
                cert = x509.load_pem_x509_certificate(
                    pem or secret.tls_certificate.certificate_chain.inline_string.encode()
                )
                sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                self.keys.extend(str(u) for u in sans.get_values_for_type(x509.UniformResourceIdentifier))


async def attempt(
    port: int,
    loot: Loot,
    mode: str,
    token: str | None,
    header_cluster: str,
    nodes: list[Any],
    names: list[str],
) -> None:
    """One stream: a request per Node in ``nodes`` (the first carries it as the stream's Node; later
    ones carry another Node, which must be ignored), asking for SDS ``names``; read what comes."""
    metadata = [("isthmus-cluster", header_cluster)]
    if token is not None:
        metadata.append(("authorization", f"Bearer {token}"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = (stub.StreamAggregatedResources if mode == "sotw" else stub.DeltaAggregatedResources)(
            metadata=metadata, timeout=3
        )
        try:
            for node in nodes:
                if mode == "sotw":
                    await call.write(
                        discovery_pb2.DiscoveryRequest(node=node, type_url=types.SECRET, resource_names=names)
                    )
                else:
                    await call.write(
                        discovery_pb2.DeltaDiscoveryRequest(
                            node=node, type_url=types.SECRET, resource_names_subscribe=names
                        )
                    )
            first = True
            while True:
                # The first answer or the refusal must come (generous, for a loaded machine); after
                # that a served stream stays open: what it had to say came within a second.
                try:
                    response = await asyncio.wait_for(call.read(), 10.0 if first else 1.0)
                except TimeoutError:
                    break
                first = False
                if response is grpc.aio.EOF:
                    break
                loot.take(response)
                if mode == "sotw":  # ACK, and ask again for all names
                    await call.write(
                        discovery_pb2.DiscoveryRequest(
                            type_url=types.SECRET,
                            resource_names=names,
                            response_nonce=response.nonce,
                            version_info=response.version_info,
                        )
                    )
                else:
                    await call.write(
                        discovery_pb2.DeltaDiscoveryRequest(
                            type_url=types.SECRET, response_nonce=response.nonce
                        )
                    )
        except grpc.aio.AioRpcError as exc:
            loot.statuses.append(exc.code())
        finally:
            with contextlib.suppress(Exception):
                call.cancel()


def web(**claims: Any) -> Any:
    fields = {"namespace": "shop", "service": "web", "service_account": "web", **claims}
    return make_node("sidecar~web.shop~east", **fields)


@pytest.mark.parametrize("mode", ["sotw", "delta"])
async def test_no_way_yields_another_workloads_key(server: AdsServer, mode: str) -> None:
    port = server.port
    assert port is not None
    loot = Loot()
    api = make_node("sidecar~api.shop~east", namespace="shop", service="api", service_account="api")
    attempts = {
        "claim another account": (WEB, "east", [api]),
        "claim another namespace": (WEB, "east", [web(namespace="other")]),
        "claim another member cluster": (WEB, "west", [web(cluster="west")]),
        "another cluster header only": (WEB, "west", [web()]),
        "switch Node on a later request": (WEB, "east", [web(), api]),
        "claim the gateway role": (WEB, "east", [web(role="gateway")]),
        "the gateway's token as a sidecar": (
            GATEWAY,
            "east",
            [
                make_node(
                    "sidecar~gw.isthmus-system~east",
                    namespace="isthmus-system",
                    service="gw",
                    service_account="isthmus-gateway",
                )
            ],
        ),
        "the gateway's token as the gateway": (
            GATEWAY,
            "east",
            [
                make_node(
                    "gateway~gw.isthmus-system~east",
                    role="gateway",
                    namespace="isthmus-system",
                    service="gw",
                    service_account="isthmus-gateway",
                )
            ],
        ),
        "no token": (None, "east", [api]),
        "garbage token": ("garbage", "east", [api]),
        "own identity, asking for every name": (WEB, "east", [web()]),
    }
    for what, (token, header, nodes) in attempts.items():
        before = len(loot.keys)
        await attempt(port, loot, mode, token, header, nodes, SECRET_NAMES)
        assert set(loot.keys[before:]) <= {OWN}, (what, loot.keys[before:])
    # The attempts were answered: refusals with a status, the honest stream with its own key.
    assert OWN in loot.keys
    assert set(loot.keys) == {OWN}
    refused = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
    # A gRPC core race (seen under load, as in test_auth): a stream refused at open while the
    # client's write is in flight may end with INTERNAL at the client; the server's own record of
    # its refusals decides how many there were.
    assert set(loot.statuses) <= refused | {grpc.StatusCode.INTERNAL}, loot.statuses
    assert sum(server.auth_failures.values()) >= 8, (server.auth_failures, loot.statuses)
