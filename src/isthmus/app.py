"""Wiring: builds the cache, the mesh source, the ADS server and the admin app, and runs them
as one task group until stopped. Constructors do no I/O; ``run`` does it all."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from isthmus.admin.app import Readiness, make_admin_app, start_admin
from isthmus.discovery.file import example_mesh_text, load_mesh_file, parse_mesh, watch_mesh_file
from isthmus.discovery.model import MeshView
from isthmus.settings import ServeSettings, parse_hostport
from isthmus.xds.cache import ConfigCache
from isthmus.xds.server import AdsServer, Limits

log = logging.getLogger(__name__)


class ControlPlane:
    """One isthmus instance: mesh source -> cache -> ADS server, plus the admin endpoints."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.cache = ConfigCache()
        self.ads = AdsServer(self.cache, settings.xds_address, Limits(send_timeout=settings.send_timeout))
        self.view_loaded = False
        self.started = asyncio.Event()

    def apply_view(self, view: MeshView) -> None:
        changed = self.cache.set_view(view)
        self.view_loaded = True
        if changed:
            log.info(
                "mesh version %s: %d services in %d clusters",
                view.version,
                len(view.services),
                len(view.clusters),
            )

    def readiness(self) -> Readiness:
        if not self.view_loaded:
            return Readiness(False, "no mesh view loaded yet")
        if self.ads.port is None:
            return Readiness(False, "xDS server not listening")
        return Readiness(True, "serving")

    def info(self) -> dict[str, object]:
        return {
            "mesh_version": self.cache.view.version,
            "services": len(self.cache.view.services),
            "clusters": sorted(self.cache.view.clusters),
            "proxies": len(self.ads.status()),
        }

    async def run(self, stop: asyncio.Event) -> None:
        mesh: Path | None = self.settings.mesh
        if mesh is None:
            log.info("no discovery configured: serving the built-in example mesh (see --mesh)")
            self.apply_view(parse_mesh(example_mesh_text(), "<built-in example mesh>"))
        else:
            self.apply_view(await asyncio.to_thread(load_mesh_file, mesh))
        await self.ads.start()
        host, port = parse_hostport(self.settings.admin_address, "--admin-address")
        runner = await start_admin(make_admin_app(self.readiness, self.info), host, port)
        log.info("admin listening on %s:%d (/healthz, /readyz)", host, port)
        self.started.set()
        try:
            async with asyncio.TaskGroup() as tasks:
                if mesh is not None:
                    tasks.create_task(
                        watch_mesh_file(mesh, self.apply_view, self.settings.mesh_poll_interval),
                        name="mesh-file",
                    )
                await stop.wait()
                raise _Stopped
        except* _Stopped:
            pass
        finally:
            log.info("shutting down: closing xDS streams (Envoy reconnects), then the admin server")
            await self.ads.stop(self.settings.shutdown_grace)
            await runner.cleanup()


class _Stopped(Exception):
    """Raised inside the task group to cancel its tasks on shutdown."""
