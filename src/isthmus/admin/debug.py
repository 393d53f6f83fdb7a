"""The admin API's status pages, JSON for ``isthmus status``, scripts and the web view:

* ``GET /debug/syncz``: every connected proxy (node id, member cluster, role, xDS mode, stream, peer,
  since when) and per type the version sent and ACKed and where it stands: SYNCED, STALE (sent, not
  answered yet), NACKED (with the error), NOT SENT (xds.server.introspect).
* ``GET /debug/config_dump?proxy=ID``: what that proxy was sent, per stream and type: each
  resource's name, version and content as proto3 JSON, secrets' private keys redacted (400 without
  ``proxy``, 404 for a proxy that is not connected).
* ``GET /debug/clusters``: the member clusters as the mesh view has them (state, gateway, weight)
  with what discovery and drains say about them (``clusters``, from the wiring).
* ``GET /debug/mesh``: the services (ports, clusterset IP, endpoints per member cluster, which
  clusters define it) and the gateways.

Authenticated like the rest of the admin API (the app's middleware): these are reads.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web

from isthmus.discovery.model import MeshView
from isthmus.xds.server.introspect import Held, as_json, held, sync_state
from isthmus.xds.server.status import TypeStatus
from isthmus.xds.server.stream import Stream

SHORT = {
    "type.googleapis.com/envoy.config.cluster.v3.Cluster": "CDS",
    "type.googleapis.com/envoy.config.listener.v3.Listener": "LDS",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": "EDS",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": "RDS",
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret": "SDS",
}
MAX_PROXY_ID = 1024
SYNCZ_MAX_AGE = 1.0  # seconds: /debug/syncz is built at most this often
DECODE_BATCH = 32  # resources decoded between two yields to the event loop
DUMPS_PER_SECOND, DUMP_BURST = 2.0, 4  # config dumps served, over all callers


def short_type(type_url: str) -> str:
    return SHORT.get(type_url, type_url.rsplit("/", 1)[-1])


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def type_sync(status: TypeStatus) -> dict[str, Any]:
    out: dict[str, Any] = {
        "state": sync_state(status),
        "sent": status.last_sent_version,
        "acked": status.last_acked_version,
        "sent_at": _iso(status.last_sent_at),
        "acked_at": _iso(status.last_acked_at),
        "responses": status.responses,
        "nacks": status.nacks,
    }
    if status.last_nack is not None:
        nack = status.last_nack
        out["last_nack"] = {"version": nack.version, "message": nack.message, "at": _iso(nack.at)}
    return out


def syncz(streams: list[Stream]) -> list[dict[str, Any]]:
    out = []
    for stream in streams:
        status = stream.status
        if not status.node_id:
            continue  # not identified yet
        out.append(
            {
                "proxy": status.node_id,
                "cluster": status.cluster,
                "role": status.role,
                "mode": status.mode,
                "stream": status.stream_id,
                "process": os.getpid(),  # with --xds-workers, which process serves it
                "peer": status.peer,
                "connected_since": _iso(status.connected_since),
                "types": {short_type(t): type_sync(s) for t, s in sorted(status.types.items())},
            }
        )
    return out


def mesh_json(view: MeshView) -> dict[str, Any]:
    services = []
    for key, service in view.services.items():
        per_cluster: dict[str, int] = {}
        for endpoint in service.endpoints:
            per_cluster[endpoint.locality.cluster] = per_cluster.get(endpoint.locality.cluster, 0) + 1
        services.append(
            {
                "service": str(key),
                "ports": [
                    {
                        "name": p.name,
                        "port": p.port,
                        "target_port": p.target_port,
                        "protocol": p.protocol.value,
                    }
                    for p in service.ports
                ],
                "clusterset_ip": service.vip,
                "defined_in": [cluster for cluster, _ in service.addresses],
                "endpoints": dict(sorted(per_cluster.items())),
            }
        )
    gateways = {
        name: {"address": f"{c.gateway.address}:{c.gateway.port}", "down": c.gateway_down}
        for name, c in sorted(view.clusters.items())
        if c.gateway is not None
    }
    return {"version": view.version, "services": services, "gateways": gateways}


class Decoded:
    """Resources as JSON bytes, by (type, name, version): a resource's version is its content hash,
    so an entry never goes stale; the least recently used go first past ``size``."""

    def __init__(self, size: int = 50_000) -> None:
        self.size = size
        self._entries: collections.OrderedDict[tuple[str, str, str], bytes] = collections.OrderedDict()

    def get(self, item: Held) -> tuple[bytes, bool]:
        """The item's JSON, and whether it had to be decoded now."""
        key = (item.type_url, item.name, item.version)
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            return found, False
        resource = as_json(item.resource) if item.resource is not None else None
        body = json.dumps({"name": item.name, "version": item.version, "resource": resource}).encode()
        if item.resource is not None:
            self._entries[key] = body
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return body, True


class _Bucket:
    """A token bucket: ``rate`` per second, at most ``burst`` at once."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens, self._at = float(burst), clock()

    def take(self) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


class OtherProcesses(Protocol):
    """The other processes serving xDS (isthmus.workers): their parts of the per-proxy pages."""

    async def syncz(self) -> list[dict[str, Any]]: ...

    async def config_dump(self, proxy: str) -> list[bytes]:
        """The dump's stream entries (as ``dump_streams`` writes them) of ``proxy``'s streams there."""
        ...


async def dump_streams(
    snapshot: list[tuple[int, str, dict[str, list[Held]]]], decoded: Decoded
) -> AsyncIterator[bytes]:
    """The JSON of each stream of a config dump (``{"stream": .., "mode": .., "types": {..}}``),
    decoding each resource version once and yielding to the event loop every few resources."""
    fresh = 0
    for stream_id, mode, types in snapshot:
        head = {"stream": stream_id, "mode": mode}
        chunks = [json.dumps(head).encode()[:-1] + b', "types": {']
        for j, (type_url, items) in enumerate(types.items()):
            parts = []
            for item in items:
                body, new = decoded.get(item)
                parts.append(body)
                fresh += new
                if fresh >= DECODE_BATCH:  # let pushes run between batches
                    fresh = 0
                    await asyncio.sleep(0)
            name = json.dumps(short_type(type_url)).encode()
            chunks.append((b", " if j else b"") + name + b": [" + b", ".join(parts) + b"]")
        chunks.append(b"}}")
        yield b"".join(chunks)


def dump_snapshot(streams: list[Stream], proxy: str) -> list[tuple[int, str, dict[str, list[Held]]]]:
    return [(s.status.stream_id, s.status.mode, held(s)) for s in streams if s.status.node_id == proxy]


def debug_routes(
    streams: Callable[[], list[Stream]],
    view: Callable[[], MeshView],
    clusters: Callable[[], Mapping[str, Mapping[str, Any]]],
    clock: Callable[[], float] = time.monotonic,
    others: OtherProcesses | None = None,
) -> list[web.RouteDef]:
    """The routes above, reading the ADS server's ``streams``, the mesh ``view`` and ``clusters``,
    and the parts of ``others`` (the xDS worker processes), if any.

    What these pages cost the pushes is bounded, however often they are asked for: syncz is built
    at most once a second (it may be that old), the mesh page once per mesh version, and a config
    dump decodes each resource version once (cached), one dump at a time, yielding to the event
    loop every few resources and streaming its answer; past two dumps a second (a burst of four),
    the answer is 429 with Retry-After.
    """
    syncz_cache: list[tuple[float, bytes]] = []
    mesh_cache: list[tuple[str, bytes]] = []
    decoded = Decoded()
    one_dump = asyncio.Lock()
    dumps = _Bucket(DUMPS_PER_SECOND, DUMP_BURST, clock)

    def json_bytes(body: bytes) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def get_syncz(_: web.Request) -> web.Response:
        now = clock()
        if not syncz_cache or now - syncz_cache[0][0] >= SYNCZ_MAX_AGE:
            rows = syncz(streams())
            if others is not None:
                rows += await others.syncz()
            syncz_cache[:] = [(now, json.dumps(rows).encode())]
        return json_bytes(syncz_cache[0][1])

    async def get_config_dump(request: web.Request) -> web.StreamResponse:
        proxy = request.query.get("proxy", "")
        if not proxy:
            return web.json_response({"error": "give the proxy: ?proxy=NODE_ID"}, status=400)
        if len(proxy) > MAX_PROXY_ID:
            return web.json_response({"error": f"proxy id longer than {MAX_PROXY_ID}"}, status=400)
        snapshot = dump_snapshot(streams(), proxy)
        if not snapshot and others is None:
            return web.json_response({"error": f"no connected proxy {proxy!r}"}, status=404)
        wait = dumps.take()
        if wait > 0:
            return web.json_response(
                {"error": f"at most {DUMPS_PER_SECOND:g} config dumps a second; try again"},
                status=429,
                headers={"Retry-After": str(max(1, round(wait)))},
            )
        elsewhere = await others.config_dump(proxy) if others is not None else []
        if not snapshot and not elsewhere:
            return web.json_response({"error": f"no connected proxy {proxy!r}"}, status=404)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        async with one_dump:
            await response.write(b'{"proxy": ' + json.dumps(proxy).encode() + b', "streams": [')
            i = 0
            async for entry in dump_streams(snapshot, decoded):
                await response.write((b", " if i else b"") + entry)
                i += 1
            for entry in elsewhere:
                await response.write((b", " if i else b"") + entry)
                i += 1
            await response.write(b"]}")
        await response.write_eof()
        return response

    async def get_clusters(_: web.Request) -> web.Response:
        known = clusters()
        out = {}
        for name, cluster in sorted(view().clusters.items()):
            out[name] = {
                "state": cluster.state.value,
                "gateway": f"{cluster.gateway.address}:{cluster.gateway.port}" if cluster.gateway else None,
                "gateway_down": cluster.gateway_down,
                "weight": cluster.weight,
                **known.get(name, {}),
            }
        for name, extra in known.items():
            out.setdefault(name, dict(extra))
        return web.json_response(dict(sorted(out.items())))

    async def get_mesh(_: web.Request) -> web.Response:
        current = view()
        if not mesh_cache or mesh_cache[0][0] != current.version:
            mesh_cache[:] = [(current.version, json.dumps(mesh_json(current)).encode())]
        return json_bytes(mesh_cache[0][1])

    return [
        web.get("/debug/syncz", get_syncz),
        web.get("/debug/config_dump", get_config_dump),
        web.get("/debug/clusters", get_clusters),
        web.get("/debug/mesh", get_mesh),
    ]
