"""AdsServer.status(): per-stream identity, per-type sent/ACKed versions and nonces, the last NACK."""

from __future__ import annotations

import time

import grpc

from isthmus.xds import types

from .client import cluster, make_node
from .conftest import Mesh

CDS, EDS = types.CLUSTER, types.ENDPOINT


async def test_status_follows_the_stream(mesh: Mesh, mode: str) -> None:
    before = time.time()
    client = await mesh.client(mode, node=make_node("gw-1", cluster="west", role="gateway"))
    await client.subscribe(CDS)
    first = await client.recv()
    after = time.time()

    status = await mesh.wait_status("gw-1")
    assert status.mode == mode
    assert (status.node_id, status.cluster, status.role) == ("gw-1", "west", "gateway")
    assert before <= status.connected_since <= after
    cds = status.types[CDS]
    assert (cds.last_sent_version, cds.last_sent_nonce) == (first.version, first.nonce)
    assert (cds.last_acked_version, cds.last_acked_nonce) == ("", "")
    assert (cds.responses, cds.nacks, cds.last_nack) == (1, 0, None)
    assert (cds.wildcard, cds.subscribed) == (True, ())

    await client.ack(first)
    status = await mesh.wait_status("gw-1", lambda s: s.types[CDS].last_acked_nonce == first.nonce, "ACK")
    assert status.types[CDS].last_acked_version == first.version

    mesh.put(cluster("a", timeout=30))
    mesh.publish()
    second = await client.recv()
    await client.nack(second, "cluster a rejected")
    status = await mesh.wait_status("gw-1", lambda s: s.types[CDS].last_nack is not None, "NACK")
    cds = status.types[CDS]
    assert cds.last_nack is not None
    assert cds.last_nack.message == "cluster a rejected"
    assert cds.last_nack.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert (cds.last_nack.version, cds.last_nack.nonce) == (second.version, second.nonce)
    assert after <= cds.last_nack.at <= time.time()
    assert (cds.last_sent_version, cds.last_sent_nonce) == (second.version, second.nonce)
    assert (cds.last_acked_version, cds.last_acked_nonce) == (first.version, first.nonce)
    assert (cds.responses, cds.nacks) == (2, 1)
    assert status.connected_since == (await mesh.wait_status("gw-1")).connected_since

    await client.subscribe(EDS, ["b", "a"])
    eds_reply = await client.recv()
    status = await mesh.wait_status("gw-1", lambda s: EDS in s.types)
    eds = status.types[EDS]
    assert (eds.wildcard, eds.subscribed) == (False, ("a", "b"))
    assert eds.last_sent_nonce == eds_reply.nonce
    assert status.types[CDS].last_nack is not None  # other types keep their own record


async def test_status_lists_every_stream_and_only_open_ones(mesh: Mesh, mode: str) -> None:
    one = await mesh.client(mode, node=make_node("one"))
    two = await mesh.client("sotw" if mode == "delta" else "delta", node=make_node("two"))
    for client in (one, two):
        await client.subscribe(CDS)
        await client.recv()
    assert mesh.server is not None
    listed = {(s.node_id, s.mode) for s in mesh.server.status()}
    assert listed == {("one", mode), ("two", two.mode)}
    ids = [s.stream_id for s in mesh.server.status()]
    assert len(set(ids)) == 2
    assert ids == sorted(ids)
    assert len(mesh.server.proxy_status("one")) == 1

    await one.close()
    await mesh.wait_gone("one")
    assert [s.node_id for s in mesh.server.status()] == ["two"]


async def test_status_is_a_copy(mesh: Mesh, mode: str) -> None:
    client = await mesh.client(mode, node=make_node("copy-1"))
    await client.subscribe(CDS)
    reply = await client.recv()
    status = await mesh.wait_status("copy-1")
    status.types[CDS].last_sent_version = "tampered"
    status.types.clear()
    fresh = await mesh.wait_status("copy-1")
    assert fresh.types[CDS].last_sent_version == reply.version
