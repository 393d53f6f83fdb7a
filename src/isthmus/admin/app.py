"""Admin endpoints: GET /healthz (the process is alive) and GET /readyz (a mesh view is loaded and
the xDS server is serving), both with a small JSON body for humans."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str


def make_admin_app(
    readiness: Callable[[], Readiness], info: Callable[[], dict[str, object]]
) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        state = readiness()
        body = {"ready": state.ready, "reason": state.reason, **info()}
        return web.json_response(body, status=200 if state.ready else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_admin(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
