"""Incremental (Delta) ADS: wildcard, subscribe/unsubscribe, initial_resource_versions, removals."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2

from isthmus.xds import types

from .client import DeltaClient, Reply, cluster, endpoints, listener, route, secret
from .conftest import Mesh

CDS, EDS, LDS, RDS, SDS = types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE, types.SECRET


async def delta(mesh: Mesh, node: Any = None) -> DeltaClient:
    client = await mesh.client("delta", node=node)
    assert isinstance(client, DeltaClient)
    return client


def merged(replies: list[Reply]) -> tuple[dict[str, Any], set[str]]:
    """What a client holds after applying ``replies``: resources by name, and the names removed."""
    held: dict[str, Any] = {}
    removed: set[str] = set()
    for reply in replies:
        for name in reply.removed:
            held.pop(name, None)
            removed.add(name)
        held.update(reply.resources)
        removed -= set(reply.resources)
    return held, removed


@pytest.mark.parametrize("type_url", [CDS, EDS, LDS, RDS, SDS], ids=types.short)
@pytest.mark.parametrize("names", [None, ["*"]], ids=["no-names", "star"])
async def test_wildcard_first_request_gets_everything(
    mesh: Mesh, type_url: str, names: list[str] | None
) -> None:
    client = await delta(mesh)
    await client.subscribe(type_url, names)
    reply = await client.recv()
    assert reply.type_url == type_url
    assert reply.nonce
    assert reply.version
    assert reply.removed == ()
    assert set(reply.names) == mesh.names(type_url)
    assert len(reply.names) == len(set(reply.names))
    for name, message in mesh.state[type_url].items():
        assert reply.resources[name] == message
    await client.ack(reply)
    await client.quiet()


async def test_wildcard_gets_new_resources_but_only_the_changes(mesh: Mesh) -> None:
    client = await delta(mesh)
    await client.subscribe(CDS, ["*"])
    await client.recv_ack()
    mesh.put(cluster("c"), cluster("a", timeout=3))
    mesh.publish()
    reply = await client.recv()
    assert sorted(reply.names) == ["a", "c"]
    assert reply.removed == ()


async def test_named_subscribe_and_unsubscribe(mesh: Mesh) -> None:
    client = await delta(mesh)
    await client.subscribe(CDS, ["a"])
    first = await client.recv_ack()
    assert first.names == ("a",)

    await client.resubscribe(CDS, ["a", "b"])
    added = await client.recv_ack()
    assert added.names == ("b",)  # a is not resent
    assert added.removed == ()

    await client.resubscribe(CDS, ["b"])  # unsubscribe a
    status = await mesh.wait_status(
        client.node.id, lambda s: s.types[CDS].subscribed == ("b",), "unsubscribe"
    )
    assert not status.types[CDS].wildcard
    await client.quiet()  # an unsubscribe needs no answer

    mesh.put(cluster("a", timeout=5), cluster("b", timeout=6))
    mesh.publish()
    update = await client.recv_ack()
    assert update.names == ("b",)  # a changed too, but is no longer subscribed
    assert update.removed == ()
    await client.quiet()

    # Subscribing again sends a afresh.
    await client.resubscribe(CDS, ["a", "b"])
    again = await client.recv_ack()
    assert again.names == ("a",)
    assert again.resources["a"].connect_timeout.seconds == 5


async def test_subscription_while_a_response_is_pending_is_answered_after_the_ack(mesh: Mesh) -> None:
    client = await delta(mesh)
    await client.subscribe(CDS, ["a"])
    pending = await client.recv()
    await client.resubscribe(CDS, ["a", "b"])
    await mesh.wait_status(client.node.id, lambda s: s.types[CDS].subscribed == ("a", "b"), "subscribe b")
    await client.quiet()
    await client.ack(pending)
    reply = await client.recv_ack()
    assert reply.names == ("b",)


async def test_subscription_change_with_a_stale_nonce_is_honored(mesh: Mesh) -> None:
    client = await delta(mesh)
    await client.subscribe(CDS, ["a"])
    first = await client.recv_ack()
    mesh.put(cluster("a", timeout=2))
    mesh.publish()
    await client.recv_ack()

    await client.request(CDS, subscribe=["b"], nonce=first.nonce)
    reply = await client.recv()
    assert reply.names == ("b",)


async def test_stale_nonce_does_not_ack_the_pending_response(mesh: Mesh) -> None:
    client = await delta(mesh)
    await client.subscribe(CDS, ["a"])
    first = await client.recv_ack()
    mesh.put(cluster("a", timeout=2))
    mesh.publish()
    pending = await client.recv()

    await client.request(CDS, subscribe=["b"], nonce=first.nonce)
    status = await mesh.wait_status(
        client.node.id, lambda s: s.types[CDS].subscribed == ("a", "b"), "subscribe b"
    )
    assert status.types[CDS].last_acked_nonce == first.nonce
    await client.quiet()  # the update is still un-ACKed, so b waits

    await client.ack(pending)
    reply = await client.recv()
    assert reply.names == ("b",)


async def test_nack_is_not_resent_in_a_loop(mesh: Mesh) -> None:
    client = await delta(mesh)
    await client.subscribe(LDS)
    await client.recv_ack()
    mesh.put(listener("http", 1))
    mesh.publish()
    bad = await client.recv()
    await client.nack(bad, "port 1 is privileged")
    await mesh.wait_status(client.node.id, lambda s: s.types[LDS].nacks == 1, "the NACK")
    for _ in range(3):  # regenerations with the same content: still not resent
        mesh.publish()
        await client.quiet()
    status = mesh.status(client.node.id)
    assert status is not None
    assert status.types[LDS].responses == 2
    assert status.types[LDS].last_nack is not None
    assert status.types[LDS].last_nack.message == "port 1 is privileged"
    assert status.types[LDS].last_nack.nonce == bad.nonce

    # Only a different desired resource is pushed again.
    mesh.put(listener("http", 8443))
    mesh.publish()
    fixed = await client.recv_ack()
    assert fixed.names == ("http",)
    assert fixed.resources["http"].address.socket_address.port_value == 8443


RECONNECTS = [
    pytest.param(CDS, None, id="cds-wildcard"),
    pytest.param(EDS, ["a", "b", "d"], id="eds-named"),
]


@pytest.mark.parametrize(("type_url", "names"), RECONNECTS)
async def test_initial_resource_versions_on_reconnect(
    mesh: Mesh, type_url: str, names: list[str] | None
) -> None:
    make = cluster if type_url == CDS else (lambda n, timeout=1: endpoints(n, 7000 + timeout))
    mesh.put(make("d"))
    first = await delta(mesh)
    await first.subscribe(type_url, names)
    held = (await first.recv_ack()).versions
    assert set(held) == {"a", "b", "d"}
    await first.close()

    # While disconnected: a changes, b goes away, d stays the same, c appears.
    mesh.put(make("a", timeout=9), make("c"))
    mesh.delete(type_url, "b")
    mesh.publish()

    second = await delta(mesh)
    await second.subscribe(type_url, names, initial=dict(held))
    replies = await second.drain()
    sent = [name for reply in replies for name in reply.names]
    resources, removed = merged(replies)
    expected_sent = {"a", "c"} if names is None else {"a"}
    if type_url == EDS:
        # EDS never removes: a subscribed CLA that is gone is answered with an empty one.
        expected_sent.add("b")
        assert resources["b"] == endpoint_pb2.ClusterLoadAssignment(cluster_name="b")
        assert removed == set()
    else:
        assert removed == {"b"}
    assert sorted(sent) == sorted(expected_sent)  # d is identical: not resent; nothing is sent twice
    assert resources["a"] == mesh.state[type_url]["a"]


async def test_reconnect_with_everything_current_gets_an_empty_first_response(mesh: Mesh) -> None:
    """A wildcard first response is what ends Envoy's CDS/LDS initialization: it comes even if empty."""
    first = await delta(mesh)
    await first.subscribe(CDS)
    held = (await first.recv_ack()).versions
    await first.close()

    second = await delta(mesh)
    await second.subscribe(CDS, initial=dict(held))
    reply = await second.recv_ack()
    assert (reply.names, reply.removed) == ((), ())
    assert reply.version
    await second.quiet()


async def test_initial_resource_versions_for_names_the_server_never_had(mesh: Mesh) -> None:
    client = await delta(mesh)
    await client.subscribe(LDS, initial={"gone-listener": "1234", "http": "stale"})
    replies = await client.drain()
    resources, removed = merged(replies)
    assert set(resources) == {"http", "tcp"}
    assert removed == {"gone-listener"}


DELETIONS = [
    pytest.param(CDS, None, "b", None, id="cds-wildcard"),
    pytest.param(LDS, None, "tcp", None, id="lds-wildcard"),
    pytest.param(SDS, ["cert", "key"], "key", None, id="sds-named"),
    pytest.param(EDS, None, "b", None, id="eds-wildcard"),
    pytest.param(EDS, ["a", "b"], "b", endpoint_pb2.ClusterLoadAssignment(cluster_name="b"), id="eds-named"),
    pytest.param(RDS, ["r1", "r2"], "r2", route_pb2.RouteConfiguration(name="r2"), id="rds-named"),
]


@pytest.mark.parametrize(("type_url", "names", "deleted", "placeholder"), DELETIONS)
async def test_server_side_deletion(
    mesh: Mesh, type_url: str, names: list[str] | None, deleted: str, placeholder: Any
) -> None:
    client = await delta(mesh)
    await client.subscribe(type_url, names)
    await client.recv_ack()

    mesh.delete(type_url, deleted)
    mesh.publish()
    reply = await client.recv_ack()
    if placeholder is None:
        assert reply.removed == (deleted,)
        assert reply.names == ()
    else:  # a subscribed EDS/RDS name is never left warming: it becomes empty
        assert reply.removed == ()
        assert reply.names == (deleted,)
        assert reply.resources[deleted] == placeholder
    await client.quiet()


UNKNOWN = [
    pytest.param(CDS, "a", None, cluster("ghost"), id="cds"),
    pytest.param(LDS, "http", None, listener("ghost", 1234), id="lds"),
    pytest.param(SDS, "cert", None, secret("ghost"), id="sds"),
    pytest.param(
        EDS, "a", endpoint_pb2.ClusterLoadAssignment(cluster_name="ghost"), endpoints("ghost", 1), id="eds"
    ),
    pytest.param(RDS, "r1", route_pb2.RouteConfiguration(name="ghost"), route("ghost", "a"), id="rds"),
]


@pytest.mark.parametrize(("type_url", "real", "placeholder", "created"), UNKNOWN)
async def test_unknown_names(mesh: Mesh, type_url: str, real: str, placeholder: Any, created: Any) -> None:
    client = await delta(mesh)
    await client.subscribe(type_url, [real, "ghost"])
    reply = await client.recv_ack()
    assert reply.resources[real] == mesh.state[type_url][real]
    if placeholder is None:
        assert reply.names == (real,)
        assert reply.removed == ("ghost",)
    else:
        assert set(reply.names) == {real, "ghost"}
        assert reply.resources["ghost"] == placeholder
        assert reply.removed == ()

    # Reported once, not on every regeneration.
    mesh.publish()
    await client.quiet()

    # When it comes into existence, it is sent.
    mesh.put(created)
    mesh.publish()
    update = await client.recv_ack()
    assert update.names == ("ghost",)
    assert update.resources["ghost"] == created
    assert update.removed == ()


async def test_explicit_wildcard_plus_names(mesh: Mesh) -> None:
    client = await delta(mesh)
    await client.subscribe(CDS, ["*", "a", "a", "ghost", "ghost"])
    reply = await client.recv_ack()
    assert sorted(reply.names) == ["a", "b"]  # each once, though a is both named and wildcard
    assert reply.removed == ("ghost",)
    status = await mesh.wait_status(client.node.id, lambda s: s.types[CDS].last_acked_nonce == reply.nonce)
    assert status.types[CDS].wildcard
    assert status.types[CDS].subscribed == ("a", "ghost")


async def test_unsubscribing_star_leaves_the_named_resources(mesh: Mesh) -> None:
    client = await delta(mesh)
    await client.subscribe(CDS, ["*", "a"])
    await client.recv_ack()
    await client.request(CDS, unsubscribe=["*"])
    await mesh.wait_status(client.node.id, lambda s: not s.types[CDS].wildcard, "wildcard off")
    mesh.put(cluster("c"), cluster("a", timeout=4))
    mesh.publish()
    replies = await client.drain()
    resources, _ = merged(replies)
    assert set(resources) == {"a"}  # c is not sent: the stream is no longer wildcard


@pytest.mark.parametrize(
    ("type_url", "name", "exists"),
    [
        pytest.param(CDS, "a", True, id="cds-existing"),
        pytest.param(EDS, "ghost", False, id="eds-placeholder"),
    ],
)
async def test_unsubscribing_a_name_the_wildcard_still_covers(
    mesh: Mesh, type_url: str, name: str, exists: bool
) -> None:
    """The client cannot tell whether the wildcard includes a resource it unsubscribes by name, so it
    keeps it aside until the server says: the resource is sent again if it is part of the wildcard,
    or reported removed if not."""
    client = await delta(mesh)
    await client.subscribe(type_url, ["*", name])
    first = await client.recv_ack()
    assert name in first.names

    await client.request(type_url, unsubscribe=[name])
    reply = await client.recv_ack()
    if exists:
        assert (reply.names, reply.removed) == ((name,), ())
        assert reply.resources[name] == mesh.state[type_url][name]
    else:  # the placeholder existed only because it was named
        assert (reply.names, reply.removed) == ((), (name,))
    await client.quiet()
