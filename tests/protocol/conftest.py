"""Fixtures for the xDS protocol tests: a real AdsServer on port 0 over a cache the test controls.

The cache's generators read a plain dict (``mesh.state``); a test edits it with
``mesh.put``/``mesh.delete`` and publishes with ``mesh.publish()`` (``cache.invalidate()``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from isthmus.xds import types
from isthmus.xds.cache import ConfigCache
from isthmus.xds.server import AdsServer, Limits
from isthmus.xds.server.status import ProxyStatus

from .client import (
    CLIENTS,
    RECV_TIMEOUT,
    AdsClient,
    cluster,
    endpoints,
    eventually,
    listener,
    make_node,
    name_of,
    route,
    secret,
    type_of,
)


def default_resources() -> list[Any]:
    return [
        cluster("a"),
        cluster("b"),
        endpoints("a", 8080),
        endpoints("b", 8081),
        listener("http", 8080),
        listener("tcp", 9000),
        route("r1", "a", "b"),
        route("r2", "a"),
        secret("cert"),
        secret("key"),
    ]


class Mesh:
    """The server under test plus the state its cache generates from."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {t: {} for t in types.PUSH_ORDER}
        self.put(*default_resources())
        self.cache = ConfigCache(generators={t: self._generator(t) for t in types.PUSH_ORDER})
        self.server: AdsServer | None = None
        self.port = 0
        self._channels: list[grpc.aio.Channel] = []
        self._clients: list[AdsClient] = []
        self._nodes = 0

    def _generator(self, type_url: str) -> Callable[[Any, Any], dict[str, Any]]:
        return lambda view, proxy, identity: dict(self.state[type_url])

    # ---- the mesh ------------------------------------------------------------------------

    def put(self, *messages: Any) -> None:
        for message in messages:
            self.state[type_of(message)][name_of(message)] = message

    def delete(self, type_url: str, *names: str) -> None:
        for name in names:
            del self.state[type_url][name]

    def publish(self) -> None:
        self.cache.invalidate()

    def names(self, type_url: str) -> set[str]:
        return set(self.state[type_url])

    # ---- the server ----------------------------------------------------------------------

    async def start(self, limits: Limits | None = None, **server_kwargs: Any) -> None:
        self.server = AdsServer(self.cache, address="127.0.0.1:0", limits=limits, **server_kwargs)
        self.port = await self.server.start()

    async def client(self, mode: str, node: Any = None) -> AdsClient:
        """A new stream on a new channel; each gets a distinct node id unless ``node`` is given."""
        if node is None:
            self._nodes += 1
            node = make_node(f"{mode}-{self._nodes}")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self._channels.append(channel)
        client = CLIENTS[mode](channel, node)
        self._clients.append(client)
        return client

    def status(self, node_id: str) -> ProxyStatus | None:
        assert self.server is not None
        found = [s for s in self.server.status() if s.node_id == node_id]
        assert len(found) <= 1, found
        return found[0] if found else None

    async def wait_status(
        self, node_id: str, check: Callable[[ProxyStatus], bool] = lambda s: True, what: str = "status"
    ) -> ProxyStatus:
        """The status of ``node_id``'s stream once ``check`` holds for it (bounded wait)."""

        def probe() -> ProxyStatus | None:
            status = self.status(node_id)
            return status if status is not None and check(status) else None

        return await eventually(probe, RECV_TIMEOUT, f"{what} of {node_id}")

    async def wait_gone(self, node_id: str) -> None:
        assert self.server is not None
        await eventually(lambda: self.status(node_id) is None, RECV_TIMEOUT, f"stream of {node_id} to end")

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
        for channel in self._channels:
            await channel.close()
        if self.server is not None:
            await self.server.stop(grace=1.0)


MeshFactory = Callable[..., Awaitable[Mesh]]


@pytest.fixture
async def mesh_factory() -> AsyncIterator[MeshFactory]:
    """Start a Mesh with custom server arguments (limits=..., max_request_bytes=...)."""
    meshes: list[Mesh] = []

    async def make(**kwargs: Any) -> Mesh:
        mesh = Mesh()
        meshes.append(mesh)
        await mesh.start(**kwargs)
        return mesh

    yield make
    for mesh in meshes:
        await mesh.close()


@pytest.fixture
async def mesh(mesh_factory: MeshFactory) -> Mesh:
    return await mesh_factory()


@pytest.fixture(params=["sotw", "delta"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)
