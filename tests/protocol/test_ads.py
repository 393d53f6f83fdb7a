"""ADS behaviour shared by SotW and Delta: ACK/NACK, push order, make-before-break, flow control.

Every test runs over both protocol variants (the ``mode`` fixture); where the two frame
the same behaviour differently (full state vs. changes only), the expectation says so.
"""

from __future__ import annotations

from isthmus.xds import types

from .client import AdsClient, SotwClient, cluster, endpoints, listener, make_node, route
from .conftest import Mesh

CDS, EDS, LDS, RDS = types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE


async def test_ack_gets_no_response(mesh: Mesh, mode: str) -> None:
    client = await mesh.client(mode)
    await client.subscribe(CDS)
    first = await client.recv()
    assert first.version
    assert first.nonce
    assert set(first.names) == {"a", "b"}

    await client.ack(first)
    await mesh.wait_status(client.node.id, lambda s: s.types[CDS].last_acked_nonce == first.nonce, "the ACK")
    await client.quiet()
    # A regeneration that changes nothing is not a reason to send either.
    mesh.publish()
    await client.quiet()


async def test_nack_is_recorded_not_resent_and_a_new_version_is_sent(mesh: Mesh, mode: str) -> None:
    client = await mesh.client(mode)
    await client.subscribe(CDS)
    good = await client.recv_ack()

    mesh.put(cluster("a", timeout=7))
    mesh.publish()
    bad = await client.recv()
    assert bad.version != good.version
    assert bad.resources["a"].connect_timeout.seconds == 7
    await client.nack(bad, "cluster a: connect_timeout out of range")

    status = await mesh.wait_status(client.node.id, lambda s: s.types[CDS].last_nack is not None, "the NACK")
    cds = status.types[CDS]
    assert cds.last_nack is not None
    assert cds.last_nack.message == "cluster a: connect_timeout out of range"
    assert cds.last_nack.nonce == bad.nonce
    assert cds.last_nack.version == bad.version
    assert cds.nacks == 1
    assert cds.last_acked_version == good.version  # the stream stays on the last accepted version
    assert cds.last_acked_nonce == good.nonce

    # The rejected version is not sent again, not even when the cache regenerates.
    await client.quiet()
    mesh.publish()
    await client.quiet()

    mesh.put(cluster("a", timeout=3))
    mesh.publish()
    fixed = await client.recv()
    assert fixed.version not in (good.version, bad.version)
    assert fixed.resources["a"].connect_timeout.seconds == 3
    await client.ack(fixed)
    status = await mesh.wait_status(
        client.node.id, lambda s: s.types[CDS].last_acked_nonce == fixed.nonce, "the ACK after the NACK"
    )
    assert status.types[CDS].last_acked_version == fixed.version
    await client.quiet()


async def _subscribe_all(mesh: Mesh, mode: str, eds: list[str], rds: list[str]) -> AdsClient:
    """A client subscribed (and ACKed) to CDS and LDS by wildcard, EDS and RDS by name."""
    client = await mesh.client(mode)
    for type_url, names in ((CDS, None), (EDS, eds), (LDS, None), (RDS, rds)):
        await client.subscribe(type_url, names)
        reply = await client.recv_ack()
        assert reply.type_url == type_url
    await client.quiet()
    return client


async def test_push_order_is_cds_eds_lds_rds(mesh: Mesh, mode: str) -> None:
    client = await _subscribe_all(mesh, mode, ["a", "b"], ["r1"])

    # Change all four types at once; put them in the reverse order for good measure.
    mesh.put(route("r1", "b"), listener("http", 8088), endpoints("b", 9999), cluster("c"))
    mesh.publish()
    replies = [await client.recv() for _ in range(4)]
    assert [r.type_url for r in replies] == [CDS, EDS, LDS, RDS]
    for reply in replies:
        await client.ack(reply)
    await client.quiet()


async def test_removal_goes_out_after_additions_are_acked(mesh: Mesh, mode: str) -> None:
    """Make-before-break: cluster b is removed only once the route moving off it is ACKed."""
    client = await mesh.client(mode)
    await client.subscribe(CDS)
    await client.recv_ack()
    await client.subscribe(RDS, ["r1"])
    await client.recv_ack()

    mesh.delete(CDS, "b")
    mesh.put(cluster("c"), route("r1", "a", "c"))
    mesh.publish()

    add = await client.recv()
    assert add.type_url == CDS
    assert add.removed == ()
    if mode == "sotw":
        assert set(add.names) == {"a", "b", "c"}  # b is kept while the route still points at it
    else:
        assert set(add.names) == {"c"}
    rds = await client.recv()
    assert rds.type_url == RDS
    assert [r.route.cluster for r in rds.resources["r1"].virtual_hosts[0].routes] == ["a", "c"]

    await client.ack(add)
    await client.quiet()  # the route is still un-ACKed: no removal yet

    await client.ack(rds)
    remove = await client.recv()
    assert remove.type_url == CDS
    if mode == "sotw":
        assert set(remove.names) == {"a", "c"}
    else:
        assert remove.names == ()
        assert remove.removed == ("b",)
    await client.ack(remove)
    await client.quiet()


async def test_removal_of_one_type_waits_for_additions_of_another(mesh: Mesh, mode: str) -> None:
    client = await mesh.client(mode)
    await client.subscribe(CDS)
    await client.recv_ack()
    await client.subscribe(LDS)
    await client.recv_ack()

    mesh.put(cluster("c"))
    mesh.delete(LDS, "tcp")
    mesh.publish()
    cds = await client.recv()
    assert cds.type_url == CDS
    await client.quiet()  # the listener removal waits for the cluster addition's ACK

    await client.ack(cds)
    lds = await client.recv_ack()
    assert lds.type_url == LDS
    if mode == "sotw":
        assert lds.names == ("http",)
    else:
        assert (lds.names, lds.removed) == ((), ("tcp",))
    await client.quiet()


async def test_removal_alone_is_sent_at_once(mesh: Mesh, mode: str) -> None:
    client = await mesh.client(mode)
    await client.subscribe(LDS)
    await client.recv_ack()

    mesh.delete(LDS, "tcp")
    mesh.publish()
    reply = await client.recv()
    if mode == "sotw":
        assert set(reply.names) == {"http"}
    else:
        assert reply.names == ()
        assert reply.removed == ("tcp",)


async def test_one_unacked_response_per_type_and_changes_coalesce(mesh: Mesh, mode: str) -> None:
    client = await mesh.client(mode)
    await client.subscribe(CDS)
    await client.recv_ack()

    mesh.put(cluster("a", timeout=2))
    mesh.publish()
    pending = await client.recv()
    assert pending.resources["a"].connect_timeout.seconds == 2

    # Two more changes while that response is un-ACKed: nothing is sent ...
    mesh.put(cluster("a", timeout=3))
    mesh.publish()
    mesh.put(cluster("b", timeout=4))
    mesh.publish()
    await client.quiet()

    # ... until the ACK, and then one response carries the latest state.
    await client.ack(pending)
    latest = await client.recv()
    assert latest.resources["a"].connect_timeout.seconds == 3
    assert latest.resources["b"].connect_timeout.seconds == 4
    expected = {"a", "b"}  # both changed since the ACKed response; SotW would send both anyway
    assert set(latest.names) == expected
    await client.ack(latest)
    await client.quiet()


async def test_changed_cluster_resends_its_endpoints(mesh: Mesh, mode: str) -> None:
    """Envoy keeps a modified cluster warming until it gets a ClusterLoadAssignment for it."""
    client = await _subscribe_all(mesh, mode, ["a", "b"], ["r1"])

    mesh.put(cluster("a", timeout=5))  # the endpoints of a do not change
    mesh.publish()
    cds = await client.recv()
    assert cds.type_url == CDS
    assert "a" in cds.names
    eds = await client.recv()
    assert eds.type_url == EDS
    assert eds.names == ("a",)
    assert eds.resources["a"] == mesh.state[EDS]["a"]
    await client.ack(cds)
    await client.ack(eds)
    await client.quiet()


async def test_cluster_change_while_endpoints_are_unacked_resends_them_after_the_ack(
    mesh: Mesh, mode: str
) -> None:
    client = await _subscribe_all(mesh, mode, ["a", "b"], ["r1"])

    mesh.put(endpoints("b", 4444))
    mesh.publish()
    eds_pending = await client.recv()
    assert (eds_pending.type_url, eds_pending.names) == (EDS, ("b",))

    mesh.put(cluster("a", timeout=5))  # while the EDS response is still un-ACKed
    mesh.publish()
    cds = await client.recv_ack()
    assert cds.type_url == CDS
    await client.quiet()  # EDS waits for its ACK ...

    await client.ack(eds_pending)
    eds = await client.recv_ack()  # ... and then re-arms cluster a
    assert (eds.type_url, eds.names) == (EDS, ("a",))
    await client.quiet()


async def test_endpoint_update_sends_only_the_changed_assignment(mesh: Mesh, mode: str) -> None:
    client = await mesh.client(mode)
    await client.subscribe(EDS, ["a", "b"])
    first = await client.recv_ack()
    assert set(first.names) == {"a", "b"}

    mesh.put(endpoints("b", 8081, 8082))
    mesh.publish()
    reply = await client.recv()
    assert reply.names == ("b",)
    assert reply.resources["b"] == mesh.state[EDS]["b"]
    await client.ack(reply)
    await client.quiet()


async def test_unrelated_change_sends_nothing(mesh: Mesh, mode: str) -> None:
    client = await mesh.client(mode)
    await client.subscribe(CDS)
    await client.recv_ack()

    mesh.put(listener("http", 8081), endpoints("a", 1234))
    mesh.publish()
    await client.quiet()
    status = mesh.status(client.node.id)
    assert status is not None
    assert status.types[CDS].responses == 1, "an unsubscribed type's change must not push CDS again"
    assert set(status.types) == {CDS}


async def test_reconnect_gets_full_state_again(mesh: Mesh, mode: str) -> None:
    node = make_node("reconnecting")
    first = await mesh.client(mode, node=node)
    await first.subscribe(CDS)
    before = await first.recv_ack()
    await first.subscribe(EDS, ["a", "b"])
    await first.recv_ack()
    await first.drain()
    await first.close()
    await mesh.wait_gone(node.id)

    mesh.put(cluster("c"))
    mesh.publish()

    second = await mesh.client(mode, node=node)
    if isinstance(second, SotwClient):
        await second.subscribe(CDS, version=before.version)  # Envoy presents the version it holds
    else:
        await second.subscribe(CDS)
    cds = await second.recv_ack()
    assert set(cds.names) == {"a", "b", "c"}
    await second.subscribe(EDS, ["a", "b"])
    eds = await second.recv_ack()
    assert set(eds.names) == {"a", "b"}
    status = await mesh.wait_status(node.id)
    assert status.mode == mode


async def test_a_held_cache_answers_nothing_until_it_serves(mesh: Mesh, mode: str) -> None:
    """A control plane whose member clusters have not all synced holds (ConfigCache.hold): proxies
    that connect get nothing of the partial view, then everything once it serves."""
    mesh.cache.hold()
    client = await mesh.client(mode)
    await client.subscribe(types.CLUSTER)
    await client.quiet()  # nothing while held, however long
    mesh.put(cluster("c"))
    mesh.publish()
    await client.quiet()
    mesh.cache.serve()
    reply = await client.recv()
    assert reply.type_url == types.CLUSTER
    assert set(reply.names) == {"a", "b", "c"}
