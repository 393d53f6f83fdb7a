"""Streams follow topics: after random mesh changes, every proxy (sidecars and gateways of two
member clusters, in both modes) holds exactly what generation from scratch gives it, although a
change wakes only the streams whose resources it changed, and a stream several views behind plans
only the names changed since the set it holds."""

from __future__ import annotations

import asyncio
import copy
import random
from typing import Any

import grpc
import yaml

from isthmus.discovery.file import example_mesh_text, parse_mesh
from isthmus.xds import types
from isthmus.xds.cache import ConfigCache
from isthmus.xds.server import AdsServer

from .client import CLIENTS, AdsClient, Reply, make_node
from .test_incremental import apply

TYPES = (types.CLUSTER, types.ENDPOINT, types.LISTENER)
NODES = [
    ("web-east", "east", "sidecar", "web"),
    ("web-west", "west", "sidecar", "web"),
    ("reviews-west", "west", "sidecar", "reviews"),
    ("db-east", "east", "sidecar", "db"),
    ("gw-east", "east", "gateway", "gw"),
    ("gw-west", "west", "gateway", "gw"),
]


def mutate(rng: random.Random, mesh: dict[str, Any], step: int) -> None:
    services = mesh["services"]
    service = rng.choice(services)
    action = rng.choice(["move", "move", "add", "remove", "health", "new-service", "drop-service"])
    endpoints = service["endpoints"]
    if action == "move" and endpoints:
        endpoint = rng.choice(endpoints)
        prefix = "127.10" if endpoint["cluster"] == "east" else "127.20"
        endpoint["address"] = f"{prefix}.{1 + step % 9}.{10 + step}"
    elif action == "add":
        cluster = rng.choice(["east", "west"])
        prefix = "127.10" if cluster == "east" else "127.20"
        sa = service["name"]
        endpoints.append({"cluster": cluster, "address": f"{prefix}.50.{step}", "service_account": sa})
    elif action == "remove" and endpoints:
        endpoints.remove(rng.choice(endpoints))
    elif action == "health" and endpoints:
        endpoint = rng.choice(endpoints)
        endpoint["health"] = "draining" if endpoint.get("health") != "draining" else "healthy"
    elif action == "new-service":
        services.append(
            {
                "name": f"extra-{step}",
                "namespace": "shop",
                "ports": [{"name": "http", "port": 7000 + step, "protocol": "http"}],
                "endpoints": [{"cluster": rng.choice(["east", "west"]), "address": f"127.10.60.{step}"}],
            }
        )
    elif action == "drop-service" and len(services) > 3:
        services.remove(rng.choice(services[3:]))


def expected(cache: ConfigCache, type_url: str, proxy: Any) -> dict[str, bytes]:
    return {name: r.body for name, r in cache.resources(type_url, proxy).items()}


async def test_every_proxy_holds_what_generation_from_scratch_gives_it(mode: str) -> None:
    rng = random.Random(16)
    mesh = yaml.safe_load(example_mesh_text())
    cache = ConfigCache(parse_mesh(yaml.safe_dump(mesh)))
    server = AdsServer(cache, address="127.0.0.1:0")
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    clients: dict[str, AdsClient] = {}
    held: dict[str, dict[str, dict[str, bytes]]] = {}
    try:
        for node_id, cluster, role, service in NODES:
            client = CLIENTS[mode](
                channel,
                make_node(
                    node_id,
                    cluster=cluster,
                    role=role,
                    namespace="shop",
                    service=service,
                    service_account=service,
                ),
            )
            clients[node_id] = client
            held[node_id] = {}
            for type_url in TYPES:
                await client.subscribe(type_url)  # wildcard
        proxies: dict[str, Any] = {}
        for _ in range(100):
            proxies = {s.proxy.node_id: s.proxy for s in server.streams() if s.proxy is not None}
            if len(proxies) == len(NODES):
                break
            await asyncio.sleep(0.02)
        assert len(proxies) == len(NODES)

        async def settle() -> None:
            replies = await asyncio.gather(*(c.drain(within=0.15) for c in clients.values()))
            for node_id, got in zip(clients, replies, strict=True):
                for reply in got:
                    apply_bytes(held[node_id], reply, mode)

        await settle()
        for step in range(30):
            before = copy.deepcopy(mesh)
            # Views one after another: a stream still waiting for an ACK plans across several
            # sets at once (ResourceSet.history).
            for k in range(rng.choice([1, 1, 2, 3])):
                mutate(rng, mesh, 3 * step + k)
                cache.set_view(parse_mesh(yaml.safe_dump(mesh)))
            await settle()
            scratch = ConfigCache(parse_mesh(yaml.safe_dump(mesh)))
            for node_id, proxy in proxies.items():
                for type_url in TYPES:
                    want = expected(scratch, type_url, proxy)
                    have = held[node_id].get(type_url, {})
                    if mode == "sotw" and type_url == types.ENDPOINT:
                        # SotW EDS never says a name is gone: compare the names that exist.
                        have = {n: b for n, b in have.items() if n in want}
                    assert have == want, (step, node_id, types.short(type_url), before != mesh)
    finally:
        for client in clients.values():
            await client.close()
        await channel.close()
        await server.stop(grace=1.0)


def apply_bytes(held: dict[str, dict[str, bytes]], reply: Reply, mode: str) -> None:
    """What an Envoy does with a response (test_incremental.apply), with full-state LDS too."""
    if mode == "sotw" and reply.type_url == types.LISTENER:
        held.setdefault(reply.type_url, {}).clear()
    apply(held, reply, mode)
