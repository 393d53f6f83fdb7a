"""Admin endpoints: GET /healthz (the process is alive), GET /readyz (a mesh view is loaded and
the xDS server is serving), both with a small JSON body for humans; GET /metrics (Prometheus text
format, docs/metrics.md); and, when the wiring provides them, POST /drain/{cluster},
POST /undrain/{cluster} and GET /drain (progress).

With an ``AdminCheck`` every endpoint but the probes (and GETs of ``open_paths``: files that hold
no data, such as the web view's) needs ``authorization: Bearer <token>``: GET
asks for the right ``read``, POST for ``drain``, on the request's path; 401 (with
``WWW-Authenticate: Bearer``), 403 or 503, each with a JSON error, otherwise. /metrics is no
probe: what it tells (clusters, proxies, refusals) is the admin API's to protect, and Prometheus
sends a bearer token (``authorization.credentials_file`` of a scrape config)."""

from __future__ import annotations

import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from isthmus import metrics

# (token, right, path) -> (200/401/403/503, who or why)
AdminCheck = Callable[[str | None, str, str], Awaitable[tuple[int, str]]]
PROBES = frozenset({"/healthz", "/readyz"})
METRICS_MAX_AGE = 1.0  # seconds: /metrics is built at most this often (per format)


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str


@dataclass(frozen=True, slots=True)
class DrainActions:
    start: Callable[[str, bool], dict[str, object]]  # (cluster, drain?) -> progress; KeyError: unknown
    status: Callable[[], dict[str, dict[str, object]]]


def make_admin_app(
    readiness: Callable[[], Readiness],
    info: Callable[[], dict[str, object]],
    drains: DrainActions | None = None,
    check: AdminCheck | None = None,
    open_paths: frozenset[str] = frozenset(),
) -> web.Application:
    @web.middleware
    async def authenticate(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        public = request.path in PROBES or (request.method == "GET" and request.path in open_paths)
        if check is None or public:
            return await handler(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        right = "read" if request.method in ("GET", "HEAD") else "drain"
        status, detail = await check(
            token.strip() if scheme.lower() == "bearer" else None, right, request.path
        )
        if status == 401:
            return web.json_response({"error": detail}, status=401, headers={"WWW-Authenticate": "Bearer"})
        if status != 200:
            return web.json_response({"error": detail}, status=status)
        return await handler(request)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        state = readiness()
        body = {"ready": state.ready, "reason": state.reason, **info()}
        return web.json_response(body, status=200 if state.ready else 503)

    scraped: dict[str, tuple[float, bytes, str]] = {}  # Accept -> (when, body, content type)

    async def metrics_text(request: web.Request) -> web.Response:
        # Built at most once a second per format: a scrape storm costs the pushes nothing more.
        accept, now = request.headers.get("Accept", ""), time.monotonic()
        found = scraped.get(accept)
        if found is None or now - found[0] >= METRICS_MAX_AGE:
            if len(scraped) > 16:  # Accept headers are the caller's: keep a few
                scraped.clear()
            found = scraped[accept] = (now, *metrics.exposition(accept))
        return web.Response(body=found[1], headers={"Content-Type": found[2]})

    app = web.Application(middlewares=[authenticate])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_text)
    if drains is not None:
        actions = drains

        async def drain(request: web.Request) -> web.Response:
            cluster = request.match_info["cluster"]
            try:
                progress = actions.start(cluster, request.path.startswith("/drain/"))
            except KeyError:
                return web.json_response({"error": f"no member cluster named {cluster!r}"}, status=404)
            return web.json_response(progress, status=202)

        async def drain_status(_: web.Request) -> web.Response:
            return web.json_response(actions.status())

        app.router.add_post("/drain/{cluster}", drain)
        app.router.add_post("/undrain/{cluster}", drain)
        app.router.add_get("/drain", drain_status)
    return app


async def start_admin(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    return runner
