"""The data-path test agent: one per member cluster, run inside the cluster's network namespace.

    python agent.py --socket /tmp/isdp-.../east.sock --cluster east

It serves a small JSON API on a Unix socket (the socket file is reachable from the pytest process in the
root namespace, since the filesystem is shared), and does the network work from inside the namespace:

* ``GET  /health``                         -> {"cluster", "pid", "apps"}
* ``GET  /apps``                           -> {"apps": [{"name", "address", "port", "status", "hits"}]}
* ``POST /apps {"name", "address", "port", "status"?}``: start an HTTP upstream on address:port (port 0:
  any) answering every request with HTTP ``status`` (default 200) and JSON
  {"app", "cluster", "method", "path", "query", "host", "peer", "headers": {all request headers}};
  a request with the query parameter ``delay=SECONDS`` is answered that much later; ``"kind": "echo"``
  instead: a TCP server answering each chunk it reads with ``APP@CLUSTER `` and the chunk (``"banner":
  true``: it first says ``APP@CLUSTER hello\n`` on accepting, as server-first protocols do); its
  ``hits`` are connections accepted
* ``DELETE /apps/{name}``                  : stop that upstream
* ``POST /requests {"url", "count"?, "headers"?, "timeout"?, "concurrency"?, "method"?, "keepalive"?,
  "source"?, "follow_redirects"?}``: HTTP requests from inside the namespace (from local address
  ``source`` if given; ``follow_redirects`` false: a 3xx answer is the result)
  -> {"results": [{"status", "app", "cluster", "body", "text", "headers", "error", "errno", "elapsed"}],
  "count", "ok", "errors", "by_app", "by_status"}
* ``GET  /fetch?url=...&timeout=...``      -> {"status", "body", "headers"} or {"status": null, "error"}
* ``POST /connect {"host", "port", "timeout"?, "source"?}`` -> {"ok", "error", "errno", "local", "elapsed"}
* ``POST /exchange {"host", "port", "send"?, "timeout"?, "source"?}``: connect, send ``send`` (text), read
  until the peer closes or ``timeout`` -> {"connected", "received", "closed", "error", "elapsed"}

Standard library and aiohttp only; it must not import anything from the test tree (it runs as a
script). SIGTERM/SIGINT stop it within about a second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

log = logging.getLogger("agent")
MAX_TEXT = 4000


def _error(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"


def _errno(exc: BaseException) -> int | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return int(seen.errno)
        seen = seen.__cause__ or seen.__context__
    return None


@dataclass
class App:
    name: str
    address: str
    port: int
    status: int
    runner: web.AppRunner | None  # None: a TCP echo app (``server``)
    hits: int = 0
    kind: str = "http"
    server: asyncio.Server | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "port": self.port,
            "status": self.status,
            "hits": self.hits,
            "kind": self.kind,
        }


class Agent:
    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.apps: dict[str, App] = {}

    # ---- upstream apps ---------------------------------------------------------------------------

    async def start_app(self, name: str, address: str, port: int, status: int) -> App:
        holder: list[App] = []

        async def answer(request: web.Request) -> web.Response:
            app = holder[0]
            app.hits += 1
            with contextlib.suppress(ValueError):
                await asyncio.sleep(min(60.0, max(0.0, float(request.query.get("delay", "0")))))
            body = {
                "app": name,
                "cluster": self.cluster,
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "host": request.host,
                "peer": request.remote,
                "headers": dict(request.headers),
            }
            return web.json_response(body, status=app.status)

        server = web.Application()
        server.router.add_route("*", "/{tail:.*}", answer)
        runner = web.AppRunner(server, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        try:
            site = web.TCPSite(runner, address, port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        bound = int(runner.addresses[0][1])
        app = App(name, address, bound, status, runner)
        holder.append(app)
        self.apps[name] = app
        log.info("app %s listening on %s:%d", name, address, bound)
        return app

    async def start_echo(self, name: str, address: str, port: int, banner: bool) -> App:
        holder: list[App] = []
        prefix = f"{name}@{self.cluster} ".encode()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            holder[0].hits += 1
            try:
                if banner:
                    writer.write(prefix + b"hello\n")
                    await writer.drain()
                while chunk := await reader.read(65536):
                    writer.write(prefix + chunk)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, address, port, reuse_address=True)
        bound = int(server.sockets[0].getsockname()[1])
        app = App(name, address, bound, 0, None, kind="echo", server=server)
        holder.append(app)
        self.apps[name] = app
        log.info("echo app %s listening on %s:%d", name, address, bound)
        return app

    async def stop_app(self, name: str) -> None:
        app = self.apps.pop(name)
        if app.server is not None:
            app.server.close()
        if app.runner is not None:
            await app.runner.cleanup()

    async def close(self) -> None:
        for name in list(self.apps):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.stop_app(name), 2)

    # ---- API handlers ----------------------------------------------------------------------------

    async def h_health(self, request: web.Request) -> web.Response:
        return web.json_response({"cluster": self.cluster, "pid": os.getpid(), "apps": sorted(self.apps)})

    async def h_apps(self, request: web.Request) -> web.Response:
        return web.json_response({"apps": [a.describe() for a in self.apps.values()]})

    async def h_start_app(self, request: web.Request) -> web.Response:
        spec = await request.json()
        try:
            name, address = str(spec["name"]), str(spec["address"])
            port, status = int(spec.get("port", 0)), int(spec.get("status", 200))
            kind, banner = str(spec.get("kind", "http")), bool(spec.get("banner", False))
            assert kind in ("http", "echo"), f"kind {kind!r}"
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            return web.json_response({"error": f"bad app spec {spec!r}: {_error(exc)}"}, status=400)
        if name in self.apps:
            return web.json_response({"error": f"app {name!r} exists"}, status=409)
        try:
            if kind == "echo":
                app = await self.start_echo(name, address, port, banner)
            else:
                app = await self.start_app(name, address, port, status)
        except OSError as exc:
            return web.json_response(
                {"error": f"cannot listen on {address}:{port}: {_error(exc)}"}, status=500
            )
        return web.json_response(app.describe())

    async def h_stop_app(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.apps:
            return web.json_response({"error": f"no app {name!r}"}, status=404)
        await self.stop_app(name)
        return web.json_response({"stopped": name})

    async def h_requests(self, request: web.Request) -> web.Response:
        spec = await request.json()
        url = str(spec["url"])
        count = int(spec.get("count", 1))
        headers = {str(k): str(v) for k, v in (spec.get("headers") or {}).items()}
        timeout = float(spec.get("timeout", 5.0))
        concurrency = max(1, int(spec.get("concurrency", 1)))
        method = str(spec.get("method", "GET"))
        keepalive = bool(spec.get("keepalive", True))
        source = spec.get("source")
        follow = bool(spec.get("follow_redirects", True))
        semaphore = asyncio.Semaphore(concurrency)
        connector = TCPConnector(
            force_close=not keepalive, limit=concurrency, local_addr=(str(source), 0) if source else None
        )

        async def one(session: ClientSession) -> dict[str, Any]:
            async with semaphore:
                started = time.monotonic()
                result: dict[str, Any] = {"status": None, "app": None, "cluster": None, "error": None}
                try:
                    async with session.request(
                        method,
                        url,
                        headers=headers,
                        timeout=ClientTimeout(total=timeout),
                        allow_redirects=follow,
                    ) as resp:
                        text = await resp.text(errors="replace")
                        result["status"] = resp.status
                        result["headers"] = dict(resp.headers)
                        body = None
                        if resp.content_type == "application/json":
                            with contextlib.suppress(ValueError):
                                body = json.loads(text)
                        if isinstance(body, dict):
                            result["body"] = body
                            result["app"] = body.get("app")
                            result["cluster"] = body.get("cluster")
                        else:
                            result["text"] = text[:MAX_TEXT]
                except Exception as exc:
                    result["error"] = _error(exc)
                    result["errno"] = _errno(exc)
                result["elapsed"] = round(time.monotonic() - started, 4)
                return result

        async with ClientSession(connector=connector) as session:
            results = await asyncio.gather(*(one(session) for _ in range(count)))
        by_status = Counter(str(r["status"]) if r["status"] is not None else "error" for r in results)
        by_app = Counter(r["app"] for r in results if r["app"] is not None)
        return web.json_response(
            {
                "results": results,
                "count": len(results),
                "ok": sum(1 for r in results if r["status"] is not None and 200 <= r["status"] < 300),
                "errors": sum(1 for r in results if r["status"] is None),
                "by_app": dict(by_app),
                "by_status": dict(by_status),
            }
        )

    async def h_fetch(self, request: web.Request) -> web.Response:
        url = request.query["url"]
        timeout = float(request.query.get("timeout", "5"))
        try:
            async with (
                ClientSession(timeout=ClientTimeout(total=timeout)) as session,
                session.get(url) as resp,
            ):
                text = await resp.text(errors="replace")
                return web.json_response({"status": resp.status, "body": text, "headers": dict(resp.headers)})
        except Exception as exc:
            return web.json_response({"status": None, "error": _error(exc), "errno": _errno(exc)})

    async def h_connect(self, request: web.Request) -> web.Response:
        spec = await request.json()
        host, port = str(spec["host"]), int(spec["port"])
        timeout = float(spec.get("timeout", 2.0))
        source = spec.get("source")
        started = time.monotonic()
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, local_addr=(str(source), 0) if source else None), timeout
            )
        except Exception as exc:
            elapsed = round(time.monotonic() - started, 4)
            error = _error(exc) if not isinstance(exc, TimeoutError) else f"TimeoutError: after {timeout}s"
            return web.json_response(
                {"ok": False, "error": error, "errno": _errno(exc), "local": None, "elapsed": elapsed}
            )
        local = writer.get_extra_info("sockname")
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return web.json_response(
            {
                "ok": True,
                "error": None,
                "errno": None,
                "local": f"{local[0]}:{local[1]}" if local else None,
                "elapsed": round(time.monotonic() - started, 4),
            }
        )

    async def h_exchange(self, request: web.Request) -> web.Response:
        spec = await request.json()
        host, port = str(spec["host"]), int(spec["port"])
        send = str(spec.get("send") or "").encode()
        timeout = float(spec.get("timeout", 3.0))
        source = spec.get("source")
        started = time.monotonic()
        result: dict[str, Any] = {"connected": False, "received": "", "closed": False, "error": None}
        received = b""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, local_addr=(str(source), 0) if source else None), timeout
            )
        except Exception as exc:
            result["error"] = _error(exc)
        else:
            result["connected"] = True
            try:
                if send:
                    writer.write(send)
                    await writer.drain()
                deadline = started + timeout
                while (left := deadline - time.monotonic()) > 0:
                    chunk = await asyncio.wait_for(reader.read(65536), left)
                    if not chunk:
                        result["closed"] = True
                        break
                    received += chunk
            except TimeoutError:
                pass  # still open when the time was up
            except OSError as exc:
                result["closed"] = True  # reset by the peer
                result["error"] = _error(exc)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        result["received"] = received.decode(errors="replace")
        result["elapsed"] = round(time.monotonic() - started, 4)
        return web.json_response(result)

    def api(self) -> web.Application:
        api = web.Application()
        api.router.add_get("/health", self.h_health)
        api.router.add_get("/apps", self.h_apps)
        api.router.add_post("/apps", self.h_start_app)
        api.router.add_delete("/apps/{name}", self.h_stop_app)
        api.router.add_post("/requests", self.h_requests)
        api.router.add_get("/fetch", self.h_fetch)
        api.router.add_post("/connect", self.h_connect)
        api.router.add_post("/exchange", self.h_exchange)
        return api


async def serve(socket_path: str, cluster: str) -> None:
    agent = Agent(cluster)
    runner = web.AppRunner(agent.api(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    await web.UnixSite(runner, socket_path).start()
    log.info("agent for cluster %s (pid %d) on %s", cluster, os.getpid(), socket_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("agent stopping")
    with contextlib.suppress(Exception):
        await asyncio.wait_for(agent.close(), 3)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(runner.cleanup(), 2)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="Unix socket path of the control API")
    parser.add_argument("--cluster", required=True, help="member cluster name, reported in answers")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s agent[{args.cluster}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(serve(args.socket, args.cluster))
    return 0


if __name__ == "__main__":
    sys.exit(main())
