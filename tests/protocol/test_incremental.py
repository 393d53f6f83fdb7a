"""Streams plan from each set's diff (only the names that changed), not from every subscribed name.

Random changes of resources and of subscriptions, in both modes: after each, once the stream is
quiet, what the client holds equals the server's current state for what it subscribes to.
"""

from __future__ import annotations

import asyncio
import random

from isthmus.xds import types
from isthmus.xds.server import Limits

from .client import AdsClient, Reply, cluster, endpoints, name_of
from .conftest import Mesh, MeshFactory

NAMES = [f"c{i}" for i in range(8)]


def apply(held: dict[str, dict[str, bytes]], reply: Reply, mode: str) -> None:
    """What an Envoy does with a response: SotW CDS replaces the set, SotW EDS adds or updates the
    named resources, Delta adds, updates and removes."""
    mine = held.setdefault(reply.type_url, {})
    if mode == "sotw" and reply.type_url == types.CLUSTER:
        mine.clear()
    for name in reply.removed:
        mine.pop(name, None)
    for name, message in reply.resources.items():
        mine[name] = message.SerializeToString(deterministic=True)


async def test_random_changes_converge_to_the_current_state(mesh: Mesh, mode: str) -> None:
    rng = random.Random(5)
    for name in NAMES[:4]:
        mesh.put(cluster(name), endpoints(name, 8000))
    mesh.publish()
    client: AdsClient = await mesh.client(mode)
    held: dict[str, dict[str, bytes]] = {}
    wanted = set(NAMES[:3])
    await client.subscribe(types.CLUSTER)
    await client.subscribe(types.ENDPOINT, sorted(wanted))
    sends = 0
    for step in range(40):
        action = rng.choice(["update", "update", "update", "add", "delete", "resubscribe", "nothing"])
        name = rng.choice(NAMES)
        if action == "update" and name in mesh.names(types.ENDPOINT):
            mesh.put(endpoints(name, 8000 + step))
        elif action == "add":
            mesh.put(cluster(name, timeout=1 + step % 3), endpoints(name, 9000 + step))
        elif action == "delete" and name in mesh.names(types.CLUSTER):
            mesh.delete(types.CLUSTER, name)
            mesh.delete(types.ENDPOINT, name)
        elif action == "resubscribe":
            wanted = set(rng.sample(NAMES, rng.randrange(1, len(NAMES))))
            await client.resubscribe(types.ENDPOINT, sorted(wanted))
        mesh.publish()
        for reply in await client.drain(within=0.1):
            apply(held, reply, mode)
            sends += len(reply.names)
        cds = {n: m.SerializeToString(deterministic=True) for n, m in mesh.state[types.CLUSTER].items()}
        assert held.get(types.CLUSTER, {}) == cds, (step, action)
        eds = held.get(types.ENDPOINT, {})
        for n in wanted:
            current = mesh.state[types.ENDPOINT].get(n)
            if current is not None:
                assert eds.get(n) == current.SerializeToString(deterministic=True), (step, action, n)
            else:  # an EDS name that does not exist gets an empty assignment, never a stale one
                assert n not in eds or eds[n] == mesh.cache.placeholder(types.ENDPOINT, n).body, (step, n)
        assert all(name_of(m) for m in mesh.state[types.ENDPOINT].values())
    # Only what changed was sent: far fewer EDS resources than 60 full re-sends of the subscription.
    assert sends < 40 * len(NAMES)


async def test_a_send_budget_smaller_than_any_response_still_serves_every_stream(
    mesh_factory: MeshFactory, mode: str
) -> None:
    """With room for one response at a time, streams take turns; an ACK returns its bytes as soon as
    it is read, even while its own stream waits to send the next type (else they would deadlock)."""
    mesh = await mesh_factory(limits=Limits(send_budget=1))
    clients = [await mesh.client(mode) for _ in range(3)]
    for client in clients:
        await client.subscribe(types.CLUSTER)
        await client.subscribe(types.ENDPOINT, ["a", "b"])
        await client.subscribe(types.LISTENER)
    # Every client reads and ACKs at the same time, as Envoys do.
    replies = await asyncio.gather(*(client.drain(within=0.5) for client in clients))
    for got in replies:
        assert {reply.type_url for reply in got} == {types.CLUSTER, types.ENDPOINT, types.LISTENER}


async def test_a_change_wakes_only_the_streams_it_touches_for_the_types_it_touched(
    mesh: Mesh, mode: str
) -> None:
    """The cache tells a stream which of its types changed for it: a stream for which nothing
    changed is not woken, and a woken one asks the cache about the changed types only."""
    both = await mesh.client(mode)
    await both.subscribe(types.CLUSTER)
    await both.subscribe(types.ENDPOINT, ["a"])
    clusters_only = await mesh.client(mode)
    await clusters_only.subscribe(types.CLUSTER)
    for client in (both, clusters_only):
        await client.drain()
    assert mesh.server is not None
    pushes: dict[str, int] = {}
    asked: list[tuple[str, str]] = []
    for stream in mesh.server.streams():
        assert stream.proxy is not None
        node = stream.proxy.node_id

        async def counted(original=stream.push, node=node) -> None:  # type: ignore[no-untyped-def]
            pushes[node] = pushes.get(node, 0) + 1
            await original()

        stream.push = counted  # type: ignore[method-assign]
    resources = mesh.cache.resources

    def recorded(type_url: str, proxy):  # type: ignore[no-untyped-def]
        if proxy.node_id:  # a stream's own proxy (the cache asks for groups, whose node id is blank)
            asked.append((proxy.node_id, type_url))
        return resources(type_url, proxy)

    mesh.cache.resources = recorded  # type: ignore[method-assign]
    mesh.put(endpoints("a", 9999))
    mesh.publish()
    [reply] = await both.drain()
    assert reply.type_url == types.ENDPOINT
    assert list(reply.names) == ["a"]
    assert await clusters_only.drain() == []
    woken = {node for node, n in pushes.items() if n}
    assert len(woken) == 1, f"only the stream that receives the new endpoints is woken: {pushes}"
    assert {t for _, t in asked} == {types.ENDPOINT}, "nothing but EDS is asked for"
