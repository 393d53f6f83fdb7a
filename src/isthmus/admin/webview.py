"""The web view of the mesh on the admin server: ``GET /ui`` (and its script and style sheet under
``/ui/``), plain HTML/JS/CSS from admin/static/, no build step. The page holds no data: it reads the
status pages (admin.debug) from the browser, with the admin token the user types in when the admin
API is authenticated, so the page itself is served to anyone who can reach the admin port."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
PATHS = frozenset({"/ui", *(f"/ui/{name}" for name in FILES)})  # open: they hold no data
HEADERS = {
    # Only this origin's own script and style, and fetches to this origin; no framing.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return (resources.files("isthmus.admin") / "static" / name).read_bytes()


def ui_routes() -> list[web.RouteDef]:
    files = {name: _read(name) for name in FILES}

    async def page(request: web.Request) -> web.Response:
        name = request.match_info.get("name", "index.html")
        if name not in files:
            raise web.HTTPNotFound()
        return web.Response(body=files[name], content_type=FILES[name], headers=HEADERS)

    return [web.get("/ui", page), web.get("/ui/", page), web.get("/ui/{name}", page)]
