"""East-west gateways and sidecars as Kubernetes objects declare them (pure functions on raw JSON).

* A member cluster's east-west gateway is the Service labelled ``isthmus.io/gateway=eastwest``
  (the first by namespace/name if there are several). Its address, in order of preference: the
  LoadBalancer ingress IP (or hostname); else, for a NodePort (or LoadBalancer still pending)
  Service, a node's ExternalIP (else InternalIP) with the node port. The port is the Service port
  named ``tls`` (else the one numbered 15443, else the first).
* Its readiness, the same for every replica of isthmus: whether any endpoint of that Service's
  EndpointSlices is ready (its pods pass their readiness probe: Envoy's /ready). None when the
  Service has no EndpointSlices (no selector): then nothing is known.
* A pod has a sidecar when it carries the annotation ``isthmus.io/inbound-port`` (the port of its
  sidecar's inbound mTLS listener), as the sidecar injector writes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from isthmus.discovery.model import Gateway

GATEWAY_LABEL = "isthmus.io/gateway"
GATEWAY_VALUE = "eastwest"
INBOUND_PORT_ANNOTATION = "isthmus.io/inbound-port"
GATEWAY_PORT = 15443

Obj = Mapping[str, Any]


def _meta(obj: Obj) -> Mapping[str, Any]:
    meta = obj.get("metadata") or {}
    return meta if isinstance(meta, Mapping) else {}


def is_gateway_service(service: Obj) -> bool:
    labels = _meta(service).get("labels") or {}
    return isinstance(labels, Mapping) and labels.get(GATEWAY_LABEL) == GATEWAY_VALUE


def _gateway_port(service: Obj) -> Mapping[str, Any] | None:
    ports = [p for p in (service.get("spec") or {}).get("ports") or [] if isinstance(p, Mapping)]
    by_name = next((p for p in ports if p.get("name") == "tls"), None)
    by_number = next((p for p in ports if p.get("port") == GATEWAY_PORT), None)
    return by_name or by_number or (ports[0] if ports else None)


def _node_address(nodes: Mapping[str, Obj]) -> str | None:
    for kind in ("ExternalIP", "InternalIP"):
        for name in sorted(nodes):
            for address in (nodes[name].get("status") or {}).get("addresses") or []:
                if address.get("type") == kind and address.get("address"):
                    return str(address["address"])
    return None


def gateway_service(services: Mapping[str, Obj]) -> str | None:
    """The store key (namespace/name) of the cluster's gateway Service, the one ``gateway_of`` reads."""
    for key in sorted(services):
        if is_gateway_service(services[key]) and _gateway_port(services[key]) is not None:
            return key
    return None


def gateway_ready(slices: Iterable[Obj]) -> bool | None:
    """Whether any endpoint of the gateway Service's EndpointSlices is ready (None: no slices)."""
    found = False
    for endpoint_slice in slices:
        found = True
        for endpoint in endpoint_slice.get("endpoints") or []:
            ready = (endpoint.get("conditions") or {}).get("ready")
            if ready is None or ready is True:
                return True
    return False if found else None


def gateway_of(services: Mapping[str, Obj], nodes: Mapping[str, Obj]) -> Gateway | None:
    """The cluster's east-west gateway, from its labelled Service (None if there is none yet)."""
    for key in sorted(services):
        service = services[key]
        if not is_gateway_service(service):
            continue
        port = _gateway_port(service)
        if port is None:
            continue
        for ingress in ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []:
            address = ingress.get("ip") or ingress.get("hostname")
            if address:
                return Gateway(str(address), int(port.get("port", GATEWAY_PORT)))
        node_port = port.get("nodePort")
        if (service.get("spec") or {}).get("type") in ("NodePort", "LoadBalancer") and node_port:
            address = _node_address(nodes)
            if address is not None:
                return Gateway(address, int(node_port))
    return None


def sidecar_port(pod: Obj | None) -> int:
    """The pod's sidecar inbound port from its annotation; 0 without a (valid) one."""
    if pod is None:
        return 0
    value = str((_meta(pod).get("annotations") or {}).get(INBOUND_PORT_ANNOTATION, ""))
    return int(value) if value.isdigit() and 0 < int(value) < 65536 else 0
