"""File source: a YAML description of clusters, services and endpoints, turned into a MeshView.

Used for workloads outside Kubernetes, for the built-in example mesh and for tests. Besides
clusters, services and endpoints it may list SMI-like ``traffic_splits`` and Gateway API
``routes`` (HTTPRoute, GRPCRoute objects attached to services; discovery.gamma).
The file is re-read when its modification time or size changes (polling, so it
works on every filesystem and inside ConfigMap mounts); a file that fails to
parse is reported and the last good view is kept.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from isthmus.discovery import authorization, gamma
from isthmus.discovery.model import (
    AuthorizationPolicy,
    ClusterAddresses,
    Endpoint,
    Gateway,
    Health,
    Locality,
    MemberCluster,
    MeshView,
    Protocol,
    Service,
    ServiceKey,
    ServicePort,
    ServiceRoute,
    TrafficSplit,
)

log = logging.getLogger(__name__)

# libyaml's loader when PyYAML was built with it (about 10x faster on big meshes), else pure Python.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class MeshFileError(ValueError):
    """The mesh file is not valid; the message says where and why."""


def example_mesh_text() -> str:
    """The built-in example mesh shipped with the package."""
    return resources.files("isthmus").joinpath("examples/mesh.yaml").read_text()


def _require(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise MeshFileError(f"{where}: missing required field {key!r}")
    return obj[key]


def _as_list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise MeshFileError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _as_dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MeshFileError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _port_number(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise MeshFileError(f"{where}: {value!r} is not a port number (1-65535)")
    return value


def parse_mesh(text: str, source: str = "<mesh>") -> MeshView:
    """Parse the YAML mesh description into a MeshView, or raise MeshFileError."""
    try:
        doc = yaml.load(text, Loader=_LOADER) or {}
    except yaml.YAMLError as exc:
        raise MeshFileError(f"{source}: not valid YAML: {exc}") from exc
    doc = _as_dict(doc, source)

    clusters: dict[str, MemberCluster] = {}
    for i, raw in enumerate(_as_list(doc.get("clusters"), f"{source}: clusters")):
        where = f"{source}: clusters[{i}]"
        c = _as_dict(raw, where)
        name = str(_require(c, "name", where))
        if name in clusters:
            raise MeshFileError(f"{where}: duplicate cluster {name!r}")
        gateway = None
        if c.get("gateway") is not None:
            g = _as_dict(c["gateway"], f"{where}.gateway")
            gateway = Gateway(
                address=str(_require(g, "address", f"{where}.gateway")),
                port=_port_number(g.get("port", 15443), f"{where}.gateway.port"),
            )
        clusters[name] = MemberCluster(
            name=name, region=str(c.get("region", "")), zone=str(c.get("zone", "")), gateway=gateway
        )

    services: dict[ServiceKey, Service] = {}
    for i, raw in enumerate(_as_list(doc.get("services"), f"{source}: services")):
        where = f"{source}: services[{i}]"
        s = _as_dict(raw, where)
        key = ServiceKey(str(s.get("namespace", "default")), str(_require(s, "name", where)))
        if key in services:
            raise MeshFileError(f"{where}: duplicate service {key}")
        ports = []
        for j, rp in enumerate(_as_list(s.get("ports"), f"{where}.ports")):
            pw = f"{where}.ports[{j}]"
            p = _as_dict(rp, pw)
            number = _port_number(_require(p, "port", pw), f"{pw}.port")
            ports.append(
                ServicePort(
                    name=str(p.get("name", f"port-{number}")),
                    port=number,
                    target_port=_port_number(p.get("target_port", number), f"{pw}.target_port"),
                    protocol=_parse_enum(Protocol, p.get("protocol", "http"), f"{pw}.protocol"),
                )
            )
        if not ports:
            raise MeshFileError(f"{where}: a service needs at least one port")
        endpoints = []
        for j, re_ in enumerate(_as_list(s.get("endpoints"), f"{where}.endpoints")):
            ew = f"{where}.endpoints[{j}]"
            e = _as_dict(re_, ew)
            cluster_name = str(_require(e, "cluster", ew))
            member = clusters.get(cluster_name)
            if member is None:
                raise MeshFileError(f"{ew}: unknown cluster {cluster_name!r} (declare it under clusters)")
            raw_ports = _as_dict(e.get("ports", {}), f"{ew}.ports")
            if "port" in e:
                raw_ports = {p.name: e["port"] for p in ports} | raw_ports
            ep_ports = tuple(
                sorted((str(k), _port_number(v, f"{ew}.ports.{k}")) for k, v in raw_ports.items())
            )
            endpoints.append(
                Endpoint(
                    address=str(_require(e, "address", ew)),
                    locality=Locality(
                        region=str(e.get("region", member.region)),
                        zone=str(e.get("zone", member.zone)),
                        cluster=cluster_name,
                    ),
                    ports=ep_ports,
                    health=_parse_enum(Health, e.get("health", "healthy"), f"{ew}.health"),
                    service_account=str(e.get("service_account", "default")),
                    workload=str(e.get("workload", "")),
                    sidecar_port=_port_number(e["sidecar_port"], f"{ew}.sidecar_port")
                    if "sidecar_port" in e
                    else 0,
                )
            )
        services[key] = Service(
            key=key,
            ports=tuple(ports),
            endpoints=tuple(endpoints),
            addresses=_cluster_ips(s.get("cluster_ips"), clusters, f"{where}.cluster_ips"),
        )
    splits = _traffic_splits(doc, services, source)
    routes, policies = _routes(doc, services, source), _policies(doc, source)
    return MeshView.build(services.values(), clusters.values(), splits, routes, policies)


def _routes(doc: dict[str, Any], services: dict[ServiceKey, Service], source: str) -> list[ServiceRoute]:
    """``routes``: Gateway API HTTPRoutes and GRPCRoutes as Kubernetes holds them (``kind``,
    ``metadata``, ``spec``), attached to services by parentRefs (discovery.gamma). Strict, as the
    rest of the file: a route that would not be Accepted, or that names a service not declared
    here, is an error."""
    out: list[ServiceRoute] = []
    for i, raw in enumerate(_as_list(doc.get("routes"), f"{source}: routes")):
        where = f"{source}: routes[{i}]"
        read = gamma.read(_as_dict(raw, where))
        if read.reason:
            raise MeshFileError(f"{where}: not accepted ({read.reason}): {read.message}")
        if not read.parents:
            raise MeshFileError(f"{where}: no parentRef is a Service (kind: Service)")
        for route in read.routes:
            named = [route.service, *(b.service for rule in route.rules for b in rule.backends)]
            named += [b.service for rule in route.rules for b, _ in rule.mirrors]
            for key in named:
                if key not in services:
                    raise MeshFileError(f"{where}: service {key} is not declared under services")
            if any(rule.broken for rule in route.rules):
                raise MeshFileError(f"{where}: {'; '.join(r.broken for r in route.rules if r.broken)}")
        out.extend(read.routes)
    return out


def _policies(doc: dict[str, Any], source: str) -> list[AuthorizationPolicy]:
    """``authorization_policies``: ``{name, namespace, selector: {service_account}, rules:
    [{callers: [{namespace, service_account}], to: {ports, paths, methods}}]}``, the spec of an
    AuthorizationPolicy (discovery.authorization; docs/authorization.md)."""
    out = []
    for i, raw in enumerate(_as_list(doc.get("authorization_policies"), f"{source}: authorization_policies")):
        where = f"{source}: authorization_policies[{i}]"
        p = dict(_as_dict(raw, where))
        namespace, name = str(p.pop("namespace", "default")), str(_require(p, "name", where))
        p.pop("name")
        try:
            out.append(authorization.policy(namespace, name, p))
        except authorization.PolicyError as exc:
            raise MeshFileError(f"{where}: {exc}") from None
    return out


def _cluster_ips(raw: Any, clusters: dict[str, MemberCluster], where: str) -> ClusterAddresses:
    """``cluster_ips: {CLUSTER: [IP, ...]}``: the service's virtual addresses in each member cluster
    (what a Kubernetes Service's ClusterIPs are; captured sidecars route connections to them)."""
    out = []
    for name, ips in sorted(_as_dict(raw or {}, where).items()):
        if str(name) not in clusters:
            raise MeshFileError(f"{where}: unknown cluster {name!r} (declare it under clusters)")
        listed = []
        for ip in _as_list(ips, f"{where}.{name}"):
            try:
                listed.append(str(ipaddress.ip_address(str(ip))))
            except ValueError:
                raise MeshFileError(f"{where}.{name}: {ip!r} is not an IP address") from None
        out.append((str(name), tuple(listed)))
    return tuple(out)


def _traffic_splits(
    doc: dict[str, Any], services: dict[ServiceKey, Service], source: str
) -> list[TrafficSplit]:
    """``traffic_splits``: SMI TrafficSplits, ``{namespace, service, backends: [{service, weight}]}``."""
    out: dict[ServiceKey, TrafficSplit] = {}
    for i, raw in enumerate(_as_list(doc.get("traffic_splits"), f"{source}: traffic_splits")):
        where = f"{source}: traffic_splits[{i}]"
        t = _as_dict(raw, where)
        root = ServiceKey(str(t.get("namespace", "default")), str(_require(t, "service", where)))
        if root not in services:
            raise MeshFileError(f"{where}: root service {root} is not declared under services")
        if root in out:
            raise MeshFileError(f"{where}: a second traffic split for {root}")
        backends = []
        for j, rb in enumerate(_as_list(t.get("backends"), f"{where}.backends")):
            bw = f"{where}.backends[{j}]"
            b = _as_dict(rb, bw)
            name = str(_require(b, "service", bw))
            weight = b.get("weight", 1)
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                raise MeshFileError(f"{bw}.weight: {weight!r} is not a non-negative integer")
            if ServiceKey(root.namespace, name) not in services:
                raise MeshFileError(
                    f"{bw}: backend service {name!r} is not declared in namespace {root.namespace}"
                )
            backends.append((name, weight))
        if not backends or not any(w for _, w in backends):
            raise MeshFileError(f"{where}: needs at least one backend with a weight above 0")
        out[root] = TrafficSplit(root, tuple(backends))
    return list(out.values())


def _parse_enum(kind: Any, value: Any, where: str) -> Any:
    try:
        return kind(str(value).lower())
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise MeshFileError(f"{where}: {value!r} is not one of {allowed}") from None


def load_mesh_file(path: Path) -> MeshView:
    return parse_mesh(path.read_text(), str(path))


def file_stat(path: Path) -> tuple[float, int] | None:
    """What the watch compares to tell a changed file: (mtime, size), None if unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime, st.st_size


async def watch_mesh_file(
    path: Path,
    on_view: Callable[[MeshView], Awaitable[None] | None],
    interval: float = 1.0,
    loaded: tuple[float, int] | None = None,
) -> None:
    """Poll ``path`` and call ``on_view`` with each new valid MeshView. Runs until cancelled.

    ``loaded``: the file_stat taken before the caller loaded the file itself; that version is
    not loaded again (at mesh scale a parse costs seconds of CPU)."""
    last_stat = loaded
    while True:
        stat = file_stat(path)
        if stat is None:
            log.warning("mesh file %s unreadable (keeping the last good view)", path)
        if stat is not None and stat != last_stat:
            last_stat = stat
            try:
                view = await asyncio.to_thread(load_mesh_file, path)
            except (MeshFileError, OSError) as exc:
                log.error("mesh file rejected, keeping the last good view: %s", exc)
            else:
                result = on_view(view)
                if result is not None:
                    await result
        await asyncio.sleep(interval)
