"""The bootstrap's readiness listener (`isthmus bootstrap --readiness-port`), which an injected
sidecar's kubelet probe uses: not ready (the port closed: Envoy opens listeners once initialized)
until Envoy has its configuration from isthmus; 200 after; nothing else of the admin API is
reachable through it. (The bootstrap also sets no initial fetch timeout; with Envoy 1.40 an Envoy
that never reaches its control plane stays initializing without it too, so that is not tested.)"""

from __future__ import annotations

import aiohttp
import pytest

from conftest import LOOPBACK, free_port

pytestmark = pytest.mark.envoy


async def get(port: int, path: str) -> int:
    """The HTTP status, 0 if the port is closed."""
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://{LOOPBACK}:{port}{path}") as resp:
            return resp.status
    except aiohttp.ClientConnectorError:
        return 0


async def test_ready_only_once_configured_and_nothing_else_exposed(
    procs, mesh, upstreams, eventually, holds
) -> None:
    web = await upstreams.start("web-1", "127.0.0.1")
    mesh.write(mesh.service("web", web, port=80))
    cp = await procs.control_plane(mesh.path)
    cp.kill()  # its port, but nobody serving it yet
    port = free_port()
    envoy = await procs.envoy(
        procs.bootstrap(xds_port=cp.xds_port, delta=True, extra=["--readiness-port", str(port)])
    )

    async def not_ready() -> None:
        assert await get(port, "/ready") in (0, 503)
        assert await envoy.admin.active_clusters() == {}

    await holds(not_ready, what="no control plane, not ready", duration=3)
    cp.start()
    await cp.wait_ready()

    async def ready() -> None:
        assert await get(port, "/ready") == 200
        assert mesh.cluster("web", 80) in await envoy.admin.active_clusters()

    await eventually(ready, what="ready once isthmus configured it", within=30)
    for path in ("/stats", "/config_dump", "/quitquitquit", "/ready/x"):
        assert await get(port, path) == 404, path
