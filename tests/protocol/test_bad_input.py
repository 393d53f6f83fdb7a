"""Bad clients: each ends only its own stream with a gRPC status; the server keeps serving the others.

Also graceful shutdown: ``AdsServer.stop()`` ends open streams with UNAVAILABLE.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc
import pytest

from isthmus.xds import types
from isthmus.xds.server import Limits

from .client import UNKNOWN_TYPE, AdsClient, DeltaClient, cluster, eventually, make_node
from .conftest import Mesh, MeshFactory

CDS, EDS = types.CLUSTER, types.ENDPOINT
NAME_LIMIT = 10
INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


async def served(mesh: Mesh, mode: str) -> None:
    """A fresh client on a fresh channel gets its first response."""
    client = await mesh.client(mode)
    await client.subscribe(CDS)
    reply = await client.recv()
    assert set(reply.names) == mesh.names(CDS)


async def bystander(mesh: Mesh, mode: str) -> AdsClient:
    client = await mesh.client(mode)
    await client.subscribe(CDS)
    await client.recv_ack()
    return client


async def still_served(mesh: Mesh, client: AdsClient, seconds: int) -> None:
    """An existing stream still receives updates (cluster a's connect_timeout becomes ``seconds``)."""
    mesh.put(cluster("a", timeout=seconds))
    mesh.publish()
    reply = await client.recv_ack()
    assert reply.resources["a"].connect_timeout.seconds == seconds


async def unknown_type(client: AdsClient) -> None:
    await client.subscribe(UNKNOWN_TYPE)


async def unknown_type_later(client: AdsClient) -> None:
    await client.subscribe(CDS)
    await client.recv_ack()
    await client.subscribe(UNKNOWN_TYPE)


async def empty_type(client: AdsClient) -> None:
    await client.subscribe("")


async def no_node(client: AdsClient) -> None:
    await client.subscribe(CDS, with_node=False)


async def node_without_id(client: AdsClient) -> None:
    client.node = make_node("")
    await client.subscribe(CDS)


async def node_with_bad_role(client: AdsClient) -> None:
    client.node = make_node("chef-1", role="chef")
    await client.subscribe(CDS)


async def too_many_names(client: AdsClient) -> None:
    await client.subscribe(EDS, [f"c{i}" for i in range(NAME_LIMIT + 1)])


async def too_many_names_later(client: AdsClient) -> None:
    """A valid stream that later asks for too much."""
    await client.subscribe(EDS, ["a"])
    await client.recv_ack()
    await client.resubscribe(EDS, [f"c{i}" for i in range(NAME_LIMIT + 1)])


async def too_many_initial_versions(client: AdsClient) -> None:
    assert isinstance(client, DeltaClient)
    await client.subscribe(CDS, initial={f"c{i}": "1" for i in range(NAME_LIMIT + 1)})


async def delta_subscriptions_add_up(client: AdsClient) -> None:
    """Within the limit per request, over it in total."""
    await client.subscribe(EDS, [f"c{i}" for i in range(NAME_LIMIT // 2 + 1)])
    await client.recv_ack()
    await client.resubscribe(EDS, [f"c{i}" for i in range(NAME_LIMIT + 1)])


Misbehaviour = Callable[[AdsClient], Awaitable[None]]

BAD_REQUESTS = [
    pytest.param(unknown_type, INVALID, (UNKNOWN_TYPE, "cds"), id="unknown-type"),
    pytest.param(unknown_type_later, INVALID, (UNKNOWN_TYPE,), id="unknown-type-later"),
    pytest.param(empty_type, INVALID, ("type_url",), id="empty-type"),
    pytest.param(no_node, INVALID, ("Node",), id="no-node"),
    pytest.param(node_without_id, INVALID, ("id",), id="node-without-id"),
    pytest.param(node_with_bad_role, INVALID, ("chef",), id="bad-role"),
    pytest.param(too_many_names, EXHAUSTED, ("limit", "10"), id="too-many-names"),
    pytest.param(too_many_names_later, EXHAUSTED, ("limit", "10"), id="too-many-later"),
]

DELTA_BAD_REQUESTS = [
    pytest.param(too_many_initial_versions, EXHAUSTED, ("limit", "10"), id="initial-versions"),
    pytest.param(delta_subscriptions_add_up, EXHAUSTED, ("limit", "10"), id="names-add-up"),
]


async def check_bad_request(
    mesh_factory: MeshFactory,
    mode: str,
    misbehave: Misbehaviour,
    code: grpc.StatusCode,
    details: tuple[str, ...],
) -> None:
    mesh = await mesh_factory(limits=Limits(max_resource_names=NAME_LIMIT))
    other = await bystander(mesh, mode)
    bad = await mesh.client(mode, node=make_node("bad-1"))

    await misbehave(bad)
    got_code, got_details = await bad.closed()
    assert got_code == code
    for part in details:
        assert part in got_details
    await mesh.wait_gone(bad.node.id)

    await still_served(mesh, other, 11)
    await served(mesh, mode)


@pytest.mark.parametrize(("misbehave", "code", "details"), BAD_REQUESTS)
async def test_bad_request_closes_only_that_stream(
    mesh_factory: MeshFactory,
    mode: str,
    misbehave: Misbehaviour,
    code: grpc.StatusCode,
    details: tuple[str, ...],
) -> None:
    await check_bad_request(mesh_factory, mode, misbehave, code, details)


@pytest.mark.parametrize(("misbehave", "code", "details"), DELTA_BAD_REQUESTS)
async def test_bad_delta_request_closes_only_that_stream(
    mesh_factory: MeshFactory, misbehave: Misbehaviour, code: grpc.StatusCode, details: tuple[str, ...]
) -> None:
    await check_bad_request(mesh_factory, "delta", misbehave, code, details)


async def test_name_limit_allows_exactly_the_limit(mesh_factory: MeshFactory, mode: str) -> None:
    mesh = await mesh_factory(limits=Limits(max_resource_names=NAME_LIMIT))
    client = await mesh.client(mode)
    await client.subscribe(EDS, [f"c{i}" for i in range(NAME_LIMIT)])
    reply = await client.recv()
    assert len(reply.names) == NAME_LIMIT  # all placeholders


async def test_request_over_the_size_limit(mesh_factory: MeshFactory, mode: str) -> None:
    mesh = await mesh_factory(max_request_bytes=1024)
    other = await bystander(mesh, mode)
    bad = await mesh.client(mode, node=make_node("big-1"))
    await bad.subscribe(EDS, ["x" * 4096])
    code, _ = await bad.closed()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await mesh.wait_gone(bad.node.id)

    await still_served(mesh, other, 12)
    await served(mesh, mode)


async def _eventually_streams(mesh: Mesh, count: int) -> None:
    assert mesh.server is not None
    server = mesh.server
    await eventually(lambda: len(server.status()) == count, what=f"{count} open streams")


@pytest.mark.parametrize("when", ["before-first-request", "response-unread", "response-unacked", "after-ack"])
async def test_client_disconnects_mid_stream(
    mesh: Mesh, mode: str, when: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="isthmus")
    other = await bystander(mesh, mode)
    leaving = await mesh.client(mode, node=make_node("leaving-1"))
    if when != "before-first-request":
        await leaving.subscribe(CDS)
        await mesh.wait_status(leaving.node.id)
        if when != "response-unread":
            reply = await leaving.recv()
            if when == "after-ack":
                await leaving.ack(reply)
    await _eventually_streams(mesh, 2)
    await leaving.close()
    await _eventually_streams(mesh, 1)
    assert mesh.status(leaving.node.id) is None

    await still_served(mesh, other, 13)
    await served(mesh, mode)
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert failures == [], [r.getMessage() for r in failures]


async def test_stop_ends_open_streams_with_unavailable(mesh: Mesh) -> None:
    clients = [await bystander(mesh, "sotw"), await bystander(mesh, "delta")]
    # A third stream is open but has not identified itself yet.
    anonymous = await mesh.client("delta")
    await _eventually_streams(mesh, 3)
    assert mesh.server is not None
    await mesh.server.stop(grace=5.0)
    for client in [*clients, anonymous]:
        code, details = await client.closed()
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in details
    assert mesh.server.status() == []
