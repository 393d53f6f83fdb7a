"""State-of-the-world ADS: nonces, subscriptions, full-state CDS/LDS and EDS/RDS placeholders."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2

from isthmus.xds import types

from .client import SotwClient, cluster, endpoints, listener, route, secret
from .conftest import Mesh

CDS, EDS, LDS, RDS, SDS = types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE, types.SECRET


async def sotw(mesh: Mesh) -> SotwClient:
    client = await mesh.client("sotw")
    assert isinstance(client, SotwClient)
    return client


async def barrier(client: SotwClient) -> None:
    """Requests on a stream are handled in order: once this SDS answer arrives, all before it were
    handled. Fails if any other response arrives first."""
    await client.subscribe(SDS, ["cert"])
    reply = await client.recv()
    assert (reply.type_url, reply.names) == (SDS, ("cert",)), f"unexpected response {reply}"


FIRST_REQUESTS = [
    pytest.param(CDS, None, {"a", "b"}, id="cds-wildcard"),
    pytest.param(LDS, None, {"http", "tcp"}, id="lds-wildcard"),
    pytest.param(CDS, ["b"], {"b"}, id="cds-named"),
    pytest.param(EDS, ["a"], {"a"}, id="eds-named"),
    pytest.param(EDS, None, {"a", "b"}, id="eds-wildcard"),
    pytest.param(RDS, ["r1", "r2"], {"r1", "r2"}, id="rds-named"),
    pytest.param(SDS, ["cert"], {"cert"}, id="sds-named"),
]


@pytest.mark.parametrize(("type_url", "names", "expected"), FIRST_REQUESTS)
async def test_first_request_gets_resources_version_and_nonce(
    mesh: Mesh, type_url: str, names: list[str] | None, expected: set[str]
) -> None:
    client = await sotw(mesh)
    await client.subscribe(type_url, names)
    reply = await client.recv()
    assert reply.type_url == type_url
    assert reply.version
    assert reply.nonce
    assert set(reply.names) == expected
    for name in expected:
        assert reply.resources[name] == mesh.state[type_url][name]


async def test_nonces_are_unique_per_response(mesh: Mesh) -> None:
    client = await sotw(mesh)
    nonces = []
    for type_url, names in ((CDS, None), (LDS, None), (EDS, ["a"])):
        await client.subscribe(type_url, names)
        nonces.append((await client.recv_ack()).nonce)
    mesh.put(cluster("a", timeout=9))
    mesh.publish()
    nonces += [r.nonce for r in await client.drain()]
    assert len(nonces) == 5  # three first responses, then CDS and the re-armed EDS
    assert len(set(nonces)) == len(nonces)


async def test_stale_nonce_is_ignored_even_with_new_names(mesh: Mesh) -> None:
    client = await sotw(mesh)
    await client.subscribe(EDS, ["a"])
    first = await client.recv_ack()
    mesh.put(endpoints("a", 9090))
    mesh.publish()
    second = await client.recv()
    assert second.nonce != first.nonce

    # A request with the older nonce is stale: it neither ACKs nor changes the subscription.
    await client.request(EDS, ["a", "b"], version=first.version, nonce=first.nonce)
    await barrier(client)
    status = mesh.status(client.node.id)
    assert status is not None
    assert status.types[EDS].subscribed == ("a",)
    assert status.types[EDS].last_acked_nonce == first.nonce
    assert status.types[EDS].last_sent_nonce == second.nonce

    # The same names with the latest nonce are answered: only the newly requested resource.
    await client.ack(second, names=["a", "b"])
    reply = await client.recv()
    assert reply.type_url == EDS
    assert reply.names == ("b",)


async def test_request_with_a_nonce_never_sent_is_ignored(mesh: Mesh) -> None:
    client = await sotw(mesh)
    await client.subscribe(RDS, ["r1"])
    await client.recv_ack()
    await client.request(RDS, ["r1", "r2"], nonce="not-a-nonce")
    await barrier(client)
    status = mesh.status(client.node.id)
    assert status is not None
    assert status.types[RDS].subscribed == ("r1",), "the names of an ignored request are not applied"
    assert status.types[RDS].responses == 1


NAME_CHANGES = [
    pytest.param(EDS, ["a"], ["a", "b"], ("b",), id="eds-adds-only-new"),
    pytest.param(RDS, ["r1"], ["r2", "r1"], ("r2",), id="rds-adds-only-new"),
    pytest.param(CDS, ["a"], ["a", "b"], ("a", "b"), id="cds-full-state"),
]


@pytest.mark.parametrize(("type_url", "before", "after", "expected"), NAME_CHANGES)
async def test_names_changed_on_ack_are_answered(
    mesh: Mesh, type_url: str, before: list[str], after: list[str], expected: tuple[str, ...]
) -> None:
    client = await sotw(mesh)
    await client.subscribe(type_url, before)
    first = await client.recv()
    await client.ack(first, names=after)
    reply = await client.recv()
    assert reply.type_url == type_url
    assert tuple(sorted(reply.names)) == expected
    assert reply.nonce != first.nonce
    await client.ack(reply)
    await client.quiet()


async def test_new_names_after_an_ack_are_answered(mesh: Mesh) -> None:
    """Envoy re-requests at the same version and nonce when a CDS update adds clusters."""
    client = await sotw(mesh)
    await client.subscribe(EDS, ["a"])
    await client.recv_ack()
    await client.resubscribe(EDS, ["a", "b"])
    reply = await client.recv()
    assert reply.names == ("b",)
    assert reply.resources["b"] == mesh.state[EDS]["b"]


async def test_resubscribed_name_is_sent_again(mesh: Mesh) -> None:
    """A newly requested resource is resent even though it was sent before and did not change."""
    client = await sotw(mesh)
    await client.subscribe(EDS, ["a", "b"])
    first = await client.recv()
    await client.ack(first, names=["a"])
    status = await mesh.wait_status(client.node.id, lambda s: s.types[EDS].subscribed == ("a",))
    assert status.types[EDS].last_acked_nonce == first.nonce
    await client.resubscribe(EDS, ["a", "b"])
    reply = await client.recv()
    assert reply.names == ("b",)


FULL_STATE = [
    pytest.param(CDS, cluster("a", timeout=5), "b", id="cds"),
    pytest.param(LDS, listener("http", 8081), "tcp", id="lds"),
]


@pytest.mark.parametrize(("type_url", "changed", "removed"), FULL_STATE)
async def test_cds_and_lds_responses_carry_the_full_state(
    mesh: Mesh, type_url: str, changed: Any, removed: str
) -> None:
    client = await sotw(mesh)
    await client.subscribe(type_url)
    first = await client.recv_ack()
    everything = mesh.names(type_url)
    assert set(first.names) == everything

    mesh.put(changed)
    mesh.publish()
    update = await client.recv_ack()
    assert set(update.names) == everything  # unchanged resources are included too
    for name in everything:
        assert update.resources[name] == mesh.state[type_url][name]
    assert update.version != first.version

    mesh.delete(type_url, removed)
    mesh.publish()
    removal = await client.recv_ack()
    assert set(removal.names) == everything - {removed}
    assert removal.version not in (first.version, update.version)
    await client.quiet()


async def test_full_state_response_for_everything_removed_is_empty(mesh: Mesh) -> None:
    client = await sotw(mesh)
    await client.subscribe(LDS)
    await client.recv_ack()
    mesh.delete(LDS, "http", "tcp")
    mesh.publish()
    reply = await client.recv()
    assert reply.names == ()
    assert reply.nonce


PLACEHOLDERS = [
    pytest.param(
        EDS, "a", endpoint_pb2.ClusterLoadAssignment(cluster_name="ghost"), endpoints("ghost", 1), id="eds"
    ),
    pytest.param(RDS, "r1", route_pb2.RouteConfiguration(name="ghost"), route("ghost", "a"), id="rds"),
]


@pytest.mark.parametrize(("type_url", "real", "empty", "created"), PLACEHOLDERS)
async def test_unknown_eds_rds_names_get_an_empty_resource(
    mesh: Mesh, type_url: str, real: str, empty: Any, created: Any
) -> None:
    client = await sotw(mesh)
    await client.subscribe(type_url, [real, "ghost"])
    reply = await client.recv_ack()
    assert set(reply.names) == {real, "ghost"}
    assert reply.resources["ghost"] == empty
    assert reply.resources[real] == mesh.state[type_url][real]

    # Once it exists, the real resource replaces the placeholder.
    mesh.put(created)
    mesh.publish()
    update = await client.recv_ack()
    assert update.names == ("ghost",)
    assert update.resources["ghost"] == created


async def test_unknown_name_of_other_types_is_sent_once_it_exists(mesh: Mesh) -> None:
    client = await sotw(mesh)
    await client.subscribe(SDS, ["cert", "later"])
    reply = await client.recv_ack()
    assert reply.names == ("cert",)

    mesh.put(secret("later"))
    mesh.publish()
    update = await client.recv_ack()
    assert update.names == ("later",)


async def test_wildcard_and_named_subscriptions(mesh: Mesh) -> None:
    wildcard = await sotw(mesh)
    named = await sotw(mesh)
    await wildcard.subscribe(CDS)
    await named.subscribe(CDS, ["a"])
    assert set((await wildcard.recv_ack()).names) == {"a", "b"}
    assert (await named.recv_ack()).names == ("a",)
    status = await mesh.wait_status(named.node.id, lambda s: s.types[CDS].last_acked_nonce != "")
    assert (status.types[CDS].wildcard, status.types[CDS].subscribed) == (False, ("a",))
    status = await mesh.wait_status(wildcard.node.id, lambda s: s.types[CDS].last_acked_nonce != "")
    assert (status.types[CDS].wildcard, status.types[CDS].subscribed) == (True, ())

    # A new cluster reaches the wildcard subscriber only.
    mesh.put(cluster("c"))
    mesh.publish()
    assert set((await wildcard.recv_ack()).names) == {"a", "b", "c"}
    await named.quiet()

    # A change to the named cluster reaches both.
    mesh.put(cluster("a", timeout=4))
    mesh.publish()
    assert set((await wildcard.recv_ack()).names) == {"a", "b", "c"}
    assert (await named.recv_ack()).names == ("a",)


async def test_empty_names_after_wildcard_stays_wildcard(mesh: Mesh) -> None:
    client = await sotw(mesh)
    await client.subscribe(CDS)
    first = await client.recv()
    await client.ack(first)  # the ACK repeats the (empty) name list
    mesh.put(cluster("c"))
    mesh.publish()
    assert set((await client.recv()).names) == {"a", "b", "c"}


DUPLICATES = [
    pytest.param(CDS, ["a", "a", "b"], {"a", "b"}, id="cds-repeated"),
    pytest.param(CDS, ["*", "a"], {"a", "b"}, id="cds-star-and-name"),
    pytest.param(EDS, ["a", "b", "a", "b"], {"a", "b"}, id="eds-repeated"),
    pytest.param(EDS, ["*", "b"], {"a", "b"}, id="eds-star-and-name"),
    pytest.param(RDS, ["r1", "r1", "ghost", "ghost"], {"r1", "ghost"}, id="rds-repeated-and-missing"),
]


@pytest.mark.parametrize(("type_url", "names", "expected"), DUPLICATES)
async def test_no_duplicate_names_in_a_response(
    mesh: Mesh, type_url: str, names: list[str], expected: set[str]
) -> None:
    client = await sotw(mesh)
    await client.subscribe(type_url, names)
    reply = await client.recv_ack()
    assert len(reply.names) == len(set(reply.names)), reply.names
    assert set(reply.names) == expected
    # ... and a later full-state update does not duplicate them either.
    if type_url == CDS:
        mesh.put(cluster("a", timeout=8))
        mesh.publish()
        update = await client.recv()
        assert sorted(update.names) == sorted(expected)


async def test_dropping_a_name_from_a_named_cds_subscription_sends_the_smaller_state(mesh: Mesh) -> None:
    client = await sotw(mesh)
    await client.subscribe(CDS, ["a", "b"])
    first = await client.recv()
    await client.ack(first, names=["a"])
    reply = await client.recv()
    assert reply.names == ("a",)  # full state of what is subscribed: b is gone for the client


async def test_server_side_deletion_of_a_named_eds_resource_sends_an_empty_one(mesh: Mesh) -> None:
    client = await sotw(mesh)
    await client.subscribe(EDS, ["a", "b"])
    await client.recv_ack()
    mesh.delete(EDS, "b")
    mesh.publish()
    reply = await client.recv()
    assert reply.names == ("b",)
    assert reply.resources["b"] == endpoint_pb2.ClusterLoadAssignment(cluster_name="b")


async def test_nack_carrying_new_names_is_answered_with_them(mesh: Mesh) -> None:
    client = await sotw(mesh)
    await client.subscribe(EDS, ["a"])
    await client.recv_ack()
    mesh.put(endpoints("a", 1))
    mesh.publish()
    bad = await client.recv()
    client.order[EDS] = ["a", "b"]  # Envoy's NACK carries its current resource names
    await client.nack(bad, "port 1 rejected")
    reply = await client.recv()
    assert reply.names == ("b",)  # the rejected a is not resent


async def test_request_crossing_a_response_is_stale_and_the_ack_brings_the_names(mesh: Mesh) -> None:
    """Envoy asks for more names before it has seen the first response: that request is stale (its
    nonce is not the latest), and its ACK of the response repeats the names, which are then answered."""
    client = await sotw(mesh)
    await client.subscribe(EDS, ["a"])
    await mesh.wait_status(client.node.id, lambda s: s.types[EDS].last_sent_nonce != "", "first response")
    await client.request(EDS, ["a", "b"])  # no nonce yet: crosses the response in flight
    first = await client.recv()
    assert first.names == ("a",)
    await client.ack(first, names=["a", "b"])
    second = await client.recv()
    assert second.names == ("b",)
    await client.ack(second)
    await client.quiet()


async def test_empty_names_after_a_named_request_mean_no_resources(mesh: Mesh) -> None:
    """Legacy wildcard (an empty list meaning "everything") lasts only until the client names resources;
    after that an empty list means it wants nothing."""
    client = await sotw(mesh)
    await client.subscribe(CDS)
    first = await client.recv()
    assert set(first.names) == {"a", "b"}
    await client.ack(first, names=["a"])
    named = await client.recv()
    assert named.names == ("a",)
    await client.ack(named, names=[])
    nothing = await client.recv_ack()
    assert nothing.names == ()  # CDS full state of no subscription: the client drops its clusters
    status = await mesh.wait_status(client.node.id, lambda s: s.types[CDS].last_acked_nonce == nothing.nonce)
    assert (status.types[CDS].wildcard, status.types[CDS].subscribed) == (False, ())

    mesh.put(cluster("c"))
    mesh.publish()
    await client.quiet()

    await client.resubscribe(CDS, ["*"])  # an explicit wildcard works at any time
    everything = await client.recv()
    assert set(everything.names) == {"a", "b", "c"}
