"""The ADS server with an authenticator: a stream is authenticated from its gRPC metadata before
anything of it exists, and its Node checked against the credentials; a refused stream ends with
UNAUTHENTICATED or PERMISSION_DENIED and receives no response at all (SotW and Delta)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from isthmus.identity.tokens import StaticTokens
from isthmus.xds import types
from isthmus.xds.server.auth import AuthFailure, Authorizer, Revocation

from .client import make_node
from .conftest import MeshFactory

TOKEN = "protocol-test-token"


def first_request(mode: str, node: Any) -> Any:
    if mode == "sotw":
        return discovery_pb2.DiscoveryRequest(node=node, type_url=types.CLUSTER)
    return discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=types.CLUSTER)


async def exchange(port: int, mode: str, node: Any, metadata: list[tuple[str, str]]) -> tuple[list[Any], Any]:
    """Open a stream, send the first request; the responses received and the final status."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        method = stub.StreamAggregatedResources if mode == "sotw" else stub.DeltaAggregatedResources
        call = method(metadata=metadata, timeout=5)
        responses = []
        # A refused stream: the status below. The server may refuse it before the first request is
        # written (it authenticates at stream open), so the write can fail too.
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call.write(first_request(mode, node))
            responses.append(await call.read())
        if responses and responses[0] is not grpc.aio.EOF:
            call.cancel()
            return responses, None
        return [r for r in responses if r is not grpc.aio.EOF], await call.code()


@pytest.fixture
def tokens(tmp_path: Path) -> StaticTokens:
    path = tmp_path / "tokens.csv"
    path.write_text(f"{TOKEN},default,web,east\n")
    return StaticTokens(path)


@pytest.mark.parametrize(
    ("metadata", "node", "code"),
    [
        ([], make_node(), grpc.StatusCode.UNAUTHENTICATED),
        ([("authorization", "Bearer wrong")], make_node(), grpc.StatusCode.UNAUTHENTICATED),
        (
            [("authorization", f"Bearer {TOKEN}")],
            make_node(service_account="admin"),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        (
            [("authorization", f"Bearer {TOKEN}")],
            make_node(cluster="west"),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
    ],
)
async def test_a_refused_stream_receives_nothing(
    mesh_factory: MeshFactory,
    tokens: StaticTokens,
    mode: str,
    metadata: list[tuple[str, str]],
    node: Any,
    code: Any,
) -> None:
    mesh = await mesh_factory(authenticator=tokens)
    responses, status = await exchange(mesh.port, mode, node, metadata)
    assert responses == []
    assert mesh.server is not None
    if status is grpc.StatusCode.INTERNAL and code is grpc.StatusCode.UNAUTHENTICATED:
        # A gRPC core race (seen once in a loaded suite): the server refused the stream at open while
        # the client's first write was in flight, and the client reports INTERNAL instead of the
        # server's status. The server's own record says what it did.
        assert sum(mesh.server.auth_failures.values()) == 1, mesh.server.auth_failures
    else:
        assert status is code
    assert mesh.server.status() == []  # no state was kept for it


async def test_an_authenticated_stream_is_served(
    mesh_factory: MeshFactory, tokens: StaticTokens, mode: str
) -> None:
    mesh = await mesh_factory(authenticator=tokens)
    responses, _ = await exchange(mesh.port, mode, make_node(), [("authorization", f"Bearer {TOKEN}")])
    assert len(responses) == 1
    assert responses[0].type_url == types.CLUSTER


async def test_a_stream_whose_credentials_are_revoked_ends_unauthenticated(
    mesh_factory: MeshFactory, mode: str
) -> None:
    """A pod-bound token's pod deleted (identity.pod_bindings) revokes the credentials of an open
    stream: it ends at once with the revocation's status, while another stream goes on."""
    revocations: list[Revocation] = []

    def authorize(proxy: Any) -> Revocation:
        revocations.append(Revocation())
        return revocations[-1]

    async def authenticator(metadata: Mapping[str, str]) -> Authorizer:
        return authorize

    mesh = await mesh_factory(authenticator=authenticator)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.port}") as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        method = stub.StreamAggregatedResources if mode == "sotw" else stub.DeltaAggregatedResources
        calls = [method(timeout=10), method(timeout=10)]
        for i, call in enumerate(calls):
            await call.write(first_request(mode, make_node(node_id=f"sidecar~web{i}.default~east")))
            assert (await call.read()).type_url == types.CLUSTER
        assert len(revocations) == 2
        deleted = AuthFailure(grpc.StatusCode.UNAUTHENTICATED, "pod-deleted", "pod web-0 deleted")
        revocations[0].revoke(deleted)
        assert await calls[0].code() is grpc.StatusCode.UNAUTHENTICATED
        assert "pod web-0 deleted" in await calls[0].details()
        assert mesh.server is not None
        await mesh.wait_gone("sidecar~web0.default~east")  # the server ends it after the client hears
        assert [s.node_id for s in mesh.server.status()] == ["sidecar~web1.default~east"]
        assert mesh.server.auth_failures["pod-deleted"] == 1
        calls[1].cancel()
