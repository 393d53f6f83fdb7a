"""The admin API's status pages, JSON for ``isthmus status``, scripts and the web view:

* ``GET /debug/syncz``: every connected proxy (node id, member cluster, role, xDS mode, stream, peer,
  since when) and per type the version sent and ACKed and where it stands: SYNCED, STALE (sent, not
  answered yet), NACKED (with the error), NOT SENT (xds.server.introspect).
* ``GET /debug/config_dump?proxy=ID``: what that proxy was sent, per stream and type: each
  resource's name, version and content as proto3 JSON, secrets' private keys redacted (400 without
  ``proxy``, 404 for a proxy that is not connected). Decoded in a worker thread: a large dump does
  not hold up pushes.
* ``GET /debug/clusters``: the member clusters as the mesh view has them (state, gateway, weight)
  with what discovery and drains say about them (``clusters``, from the wiring).
* ``GET /debug/mesh``: the services (ports, clusterset IP, endpoints per member cluster, which
  clusters define it) and the gateways.

Authenticated like the rest of the admin API (the app's middleware): these are reads.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable, Mapping
from typing import Any

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
                "peer": status.peer,
                "connected_since": _iso(status.connected_since),
                "types": {short_type(t): type_sync(s) for t, s in sorted(status.types.items())},
            }
        )
    return out


def _dump(snapshot: list[tuple[int, str, dict[str, list[Held]]]]) -> list[dict[str, Any]]:
    """The config dump of the streams' held resources (runs in a worker thread)."""
    return [
        {
            "stream": stream_id,
            "mode": mode,
            "types": {
                short_type(type_url): [
                    {
                        "name": h.name,
                        "version": h.version,
                        "resource": as_json(h.resource) if h.resource is not None else None,
                    }
                    for h in items
                ]
                for type_url, items in types.items()
            },
        }
        for stream_id, mode, types in snapshot
    ]


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


def debug_routes(
    streams: Callable[[], list[Stream]],
    view: Callable[[], MeshView],
    clusters: Callable[[], Mapping[str, Mapping[str, Any]]],
) -> list[web.RouteDef]:
    """The routes above, reading the ADS server's ``streams``, the mesh ``view`` and ``clusters``."""

    async def get_syncz(_: web.Request) -> web.Response:
        return web.json_response(syncz(streams()))

    async def get_config_dump(request: web.Request) -> web.Response:
        proxy = request.query.get("proxy", "")
        if not proxy:
            return web.json_response({"error": "give the proxy: ?proxy=NODE_ID"}, status=400)
        if len(proxy) > MAX_PROXY_ID:
            return web.json_response({"error": f"proxy id longer than {MAX_PROXY_ID}"}, status=400)
        found = [s for s in streams() if s.status.node_id == proxy]
        if not found:
            return web.json_response({"error": f"no connected proxy {proxy!r}"}, status=404)
        snapshot = [(s.status.stream_id, s.status.mode, held(s)) for s in found]
        dumped = await asyncio.to_thread(_dump, snapshot)
        return web.json_response({"proxy": proxy, "streams": dumped})

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
        return web.json_response(await asyncio.to_thread(mesh_json, view()))

    return [
        web.get("/debug/syncz", get_syncz),
        web.get("/debug/config_dump", get_config_dump),
        web.get("/debug/clusters", get_clusters),
        web.get("/debug/mesh", get_mesh),
    ]
