"""Conversion of one member cluster's Kubernetes objects (raw JSON dicts) into a Shard.

Pure functions. Rules (documented in docs/discovery.md):
* a namespace is in the mesh unless labelled ``isthmus.io/mesh=disabled`` (or, with
  ``require_namespace_label``, only when labelled ``isthmus.io/mesh=enabled``);
* export policy ``all`` exports every Service; ``serviceexport`` only those with an MCS ServiceExport;
* ExternalName services are skipped;
* a port's protocol comes from ``appProtocol``, else its name prefix (``http``, ``http2``, ``grpc``,
  ``tcp``), else TCP;
* endpoint health from EndpointSlice conditions: ready -> healthy; serving and terminating ->
  draining; otherwise unhealthy; an address in several slices counts once (the healthiest);
* locality: region from the node's ``topology.kubernetes.io/region``, zone from the endpoint's zone
  (else the node's), the member cluster as sub-zone; identity from the Pod's service account.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from isthmus.discovery.aggregate import Shard
from isthmus.discovery.model import (
    Endpoint,
    Health,
    Locality,
    MemberCluster,
    Protocol,
    ServiceKey,
    ServicePort,
)

MESH_LABEL = "isthmus.io/mesh"
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

Obj = Mapping[str, Any]


class ExportPolicy(enum.StrEnum):
    ALL = "all"
    SERVICE_EXPORT = "serviceexport"


@dataclass(frozen=True, slots=True)
class ClusterObjects:
    """The raw objects of one member cluster, keyed by namespace/name (or name for cluster-scoped)."""

    services: Mapping[str, Obj]
    endpoint_slices: Mapping[str, Obj]
    nodes: Mapping[str, Obj]
    pods: Mapping[str, Obj]
    namespaces: Mapping[str, Obj]
    service_exports: Mapping[str, Obj]


def _meta(obj: Obj) -> Mapping[str, Any]:
    meta = obj.get("metadata") or {}
    return meta if isinstance(meta, Mapping) else {}


def _labels(obj: Obj) -> Mapping[str, str]:
    labels = _meta(obj).get("labels") or {}
    return labels if isinstance(labels, Mapping) else {}


def port_protocol(port: Obj) -> Protocol:
    hints = [str(port.get("appProtocol") or "").lower(), str(port.get("name") or "").lower()]
    for hint in hints:
        if not hint:
            continue
        head = hint.split("-", 1)[0].split("/")[-1]
        if head in ("http2", "h2c"):
            return Protocol.HTTP2
        if head in ("http", "https"):
            return Protocol.HTTP
        if head == "grpc":
            return Protocol.GRPC
        if head == "tcp":
            return Protocol.TCP
    return Protocol.TCP


def service_ports(service: Obj) -> tuple[ServicePort, ...]:
    ports = []
    for p in (service.get("spec") or {}).get("ports") or []:
        number = int(p.get("port", 0))
        if not 0 < number < 65536 or str(p.get("protocol", "TCP")).upper() != "TCP":
            continue
        target = p.get("targetPort", number)
        ports.append(
            ServicePort(
                name=str(p.get("name") or f"port-{number}"),
                port=number,
                target_port=int(target) if isinstance(target, int) or str(target).isdigit() else number,
                protocol=port_protocol(p),
            )
        )
    return tuple(ports)


def in_mesh(namespace: Obj | None, require_label: bool) -> bool:
    value = _labels(namespace).get(MESH_LABEL, "") if namespace is not None else ""
    if require_label:
        return value == "enabled"
    return value != "disabled"


def endpoint_health(conditions: Obj) -> Health:
    ready = conditions.get("ready")
    # An unknown (absent) ready condition means ready, as kube-proxy reads it.
    if (ready is None or ready is True) and not conditions.get("terminating", False):
        return Health.HEALTHY
    if conditions.get("serving") and conditions.get("terminating"):
        return Health.DRAINING
    return Health.UNHEALTHY


_RANK = {Health.HEALTHY: 0, Health.DRAINING: 1, Health.UNHEALTHY: 2}


def shard_of(
    cluster: MemberCluster,
    objs: ClusterObjects,
    export: ExportPolicy = ExportPolicy.ALL,
    require_namespace_label: bool = False,
) -> Shard:
    services: dict[ServiceKey, tuple[ServicePort, ...]] = {}
    for svc in objs.services.values():
        meta = _meta(svc)
        key = ServiceKey(str(meta.get("namespace", "default")), str(meta.get("name", "")))
        if (svc.get("spec") or {}).get("type") == "ExternalName":
            continue
        if not in_mesh(objs.namespaces.get(key.namespace), require_namespace_label):
            continue
        if (
            export is ExportPolicy.SERVICE_EXPORT
            and f"{key.namespace}/{key.name}" not in objs.service_exports
        ):
            continue
        ports = service_ports(svc)
        if ports:
            services[key] = ports

    best: dict[ServiceKey, dict[str, Endpoint]] = {key: {} for key in services}
    for eps in objs.endpoint_slices.values():
        if eps.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
            continue
        key = ServiceKey(
            str(_meta(eps).get("namespace", "default")), _labels(eps).get(SERVICE_NAME_LABEL, "")
        )
        if key not in services:
            continue
        slice_ports = tuple(
            sorted(
                (str(p.get("name") or ""), int(p["port"]))
                for p in eps.get("ports") or []
                if p.get("port") is not None
            )
        )
        named = _named_ports(services[key], slice_ports)
        for item in eps.get("endpoints") or []:
            addresses = item.get("addresses") or []
            if not addresses:
                continue
            node = objs.nodes.get(str(item.get("nodeName") or ""))
            node_labels = _labels(node) if node is not None else {}
            ref = item.get("targetRef") or {}
            pod = objs.pods.get(f"{ref.get('namespace', key.namespace)}/{ref.get('name')}") if ref else None
            endpoint = Endpoint(
                address=str(addresses[0]),
                locality=Locality(
                    region=node_labels.get(REGION_LABEL, cluster.region),
                    zone=str(item.get("zone") or node_labels.get(ZONE_LABEL, cluster.zone)),
                    cluster=cluster.name,
                ),
                ports=named,
                health=endpoint_health(item.get("conditions") or {}),
                service_account=str(((pod or {}).get("spec") or {}).get("serviceAccountName") or "default"),
                workload=str(ref.get("name") or ""),
            )
            known = best[key].get(endpoint.address)
            if known is None or _RANK[endpoint.health] < _RANK[known.health]:
                best[key][endpoint.address] = endpoint
    endpoints = {key: tuple(sorted(eps.values())) for key, eps in best.items()}
    return Shard(cluster, services, endpoints)


def _named_ports(
    ports: tuple[ServicePort, ...], slice_ports: tuple[tuple[str, int], ...]
) -> tuple[tuple[str, int], ...]:
    """Map slice ports (named like the service's ports, or unnamed for a single-port service)."""
    by_name = dict(slice_ports)
    out = []
    for port in ports:
        if port.name in by_name:
            out.append((port.name, by_name[port.name]))
        elif len(ports) == 1 and "" in by_name:
            out.append((port.name, by_name[""]))
    return tuple(out)
