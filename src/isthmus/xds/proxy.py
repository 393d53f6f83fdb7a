"""The proxy model: who is asking for configuration, read from the Envoy Node in its first request.

`isthmus bootstrap` writes these fields into the Envoy bootstrap (node metadata
under the ``isthmus`` key, and the node locality); the server parses them here
into a frozen Proxy that generators use. ``for_type`` reduces a proxy to what one type's
generator reads, so proxies that would get identical resources of a type share one generation.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from isthmus.discovery.model import Locality
from isthmus.xds import types

METADATA_KEY = "isthmus"
DEFAULT_OUTBOUND_PORT = 15001
DEFAULT_INBOUND_PORT = 15006
DEFAULT_GATEWAY_PORT = 15443
DNS_PORT = 15053  # a captured sidecar's DNS listener (UDP, loopback): capture redirects port 53 to it


class Role(enum.StrEnum):
    SIDECAR = "sidecar"
    GATEWAY = "gateway"


class OutboundTraffic(enum.StrEnum):
    """Where a captured sidecar sends connections to addresses that are no service of the mesh."""

    ALLOW_ANY = "allow-any"  # to their original destination (passthrough)
    REGISTRY_ONLY = "registry-only"  # nowhere: the connection is closed


class InvalidNode(ValueError):
    """The Node in a request lacks what the server needs; the message says what."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """A connected Envoy: its role, workload identity and locality."""

    node_id: str
    role: Role
    namespace: str
    service: str
    service_account: str
    locality: Locality
    pod: str = ""  # the pod's name when the proxy runs in one (checked against a pod-bound token)
    node_name: str = ""  # the Kubernetes node it runs on (its locality, when the bootstrap has none)
    listen_address: str = "0.0.0.0"
    app_address: str = "127.0.0.1"  # where the sidecar's inbound listener forwards to the application
    outbound_port: int = DEFAULT_OUTBOUND_PORT
    inbound_port: int = DEFAULT_INBOUND_PORT
    capture: bool = False  # its pod's traffic is captured (inject.capture): listen by original destination
    outbound_traffic: OutboundTraffic = OutboundTraffic.ALLOW_ANY
    envoy_version: str = ""
    # for_type's results, computed once per proxy (every push asks for every type)
    _groups: dict[str, Proxy] = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)
    # Proxies are the cache's keys: hashed once, not field by field on every lookup.
    _hash: int = field(default=0, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        fields = (self.node_id, self.role, self.namespace, self.service, self.service_account, self.locality)
        rest = (self.pod, self.node_name, self.listen_address, self.app_address, self.outbound_port)
        more = (self.inbound_port, self.capture, self.outbound_traffic, self.envoy_version)
        object.__setattr__(self, "_hash", hash(fields + rest + more))

    def __hash__(self) -> int:
        return self._hash

    @property
    def cluster(self) -> str:
        return self.locality.cluster

    def for_type(self, type_url: str) -> Proxy:
        """This proxy with only the fields that type's generator reads; the rest at their defaults.

        Proxies equal under ``for_type(t)`` receive identical resources of type ``t``, so the cache
        generates once per distinct value: EDS once per (role, locality), not once per pod. Because
        the generator is given this reduced proxy, it cannot depend on a field left out.
        """
        known = self._groups.get(type_url)
        if known is not None:
            return known
        kept = _FIELDS_BY_TYPE.get(type_url)
        reduced = self
        if kept is not None:
            blank = Proxy("", self.role, "", "", "", Locality("", "", ""))
            values = {name: getattr(self, name) for name in kept if name not in _PSEUDO}
            if CLUSTER_ONLY in kept or (CLUSTER_IF_CAPTURED in kept and self.capture):
                values["locality"] = Locality(cluster=self.cluster)
            reduced = replace(blank, **values)
        self._groups[type_url] = reduced
        return reduced


def located(proxy: Proxy, node_locality: Callable[[str, str], tuple[str, str] | None]) -> Proxy | None:
    """An injected sidecar's bootstrap cannot know its locality (the pod is not scheduled when it
    is injected): it names its node, and ``node_locality(cluster, node)`` (its Node's labels) says
    where it is. The proxy as it came when it needs none; None when its node is unknown."""
    if not proxy.node_name or proxy.locality.region or proxy.locality.zone:
        return proxy
    found = node_locality(proxy.cluster, proxy.node_name)
    if found is None:
        return None
    return replace(proxy, locality=Locality(found[0], found[1], proxy.cluster))


def _int(meta: dict[str, Any], key: str, default: int) -> int:
    value = meta.get(key, default)
    # Struct numbers are doubles (15001 arrives as 15001.0) and YAML may turn them into strings.
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        as_float = float("nan")
    if isinstance(value, bool) or not as_float.is_integer():
        raise InvalidNode(f"node metadata {METADATA_KEY}.{key}={value!r} is not an integer")
    number = int(as_float)
    if not 0 < number < 65536:
        raise InvalidNode(f"node metadata {METADATA_KEY}.{key}={number} is not a port number")
    return number


def proxy_from_node(node: Any) -> Proxy:
    """Build a Proxy from an envoy.config.core.v3.Node message."""
    from google.protobuf import json_format

    if not node.id:
        raise InvalidNode("the first request on a stream must carry a Node with an id")
    metadata = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
    meta = metadata.get(METADATA_KEY, {})
    if not isinstance(meta, dict):
        raise InvalidNode(f"node metadata {METADATA_KEY} must be a struct")
    role_name = str(meta.get("role", Role.SIDECAR))
    traffic = str(meta.get("outbound_traffic", OutboundTraffic.ALLOW_ANY))
    try:
        outbound_traffic = OutboundTraffic(traffic)
    except ValueError:
        raise InvalidNode(
            f"node metadata {METADATA_KEY}.outbound_traffic={traffic!r} is not allow-any or registry-only"
        ) from None
    try:
        role = Role(role_name)
    except ValueError:
        raise InvalidNode(
            f"node metadata {METADATA_KEY}.role={role_name!r} is not sidecar or gateway"
        ) from None
    loc = node.locality
    version = ""
    if node.HasField("user_agent_build_version"):
        v = node.user_agent_build_version.version
        version = f"{v.major_number}.{v.minor_number}.{v.patch}"
    return Proxy(
        node_id=node.id,
        role=role,
        namespace=str(meta.get("namespace", "default")),
        service=str(meta.get("service", node.cluster or "")),
        service_account=str(meta.get("service_account", "default")),
        pod=str(meta.get("pod", "")),
        node_name=str(meta.get("node_name", "")),
        locality=Locality(region=loc.region, zone=loc.zone, cluster=str(meta.get("cluster", loc.sub_zone))),
        listen_address=str(meta.get("listen_address", "0.0.0.0")),
        app_address=str(meta.get("app_address", "127.0.0.1")),
        outbound_port=_int(meta, "outbound_port", DEFAULT_OUTBOUND_PORT),
        inbound_port=_int(meta, "inbound_port", DEFAULT_INBOUND_PORT),
        capture=meta.get("capture") in (True, "true"),
        outbound_traffic=outbound_traffic,
        envoy_version=version,
    )


# What each type's generator reads of the proxy (xds/generate/*): see Proxy.for_type.
# CLUSTER_ONLY: of the locality, only the member cluster (not the region and zone);
# CLUSTER_IF_CAPTURED: that, and the capture flag, for captured proxies only.
CLUSTER_ONLY = "cluster"
CLUSTER_IF_CAPTURED = "cluster-if-captured"
_PSEUDO = (CLUSTER_ONLY, CLUSTER_IF_CAPTURED)
_FIELDS_BY_TYPE: dict[str, tuple[str, ...]] = {
    types.CLUSTER: ("locality", "namespace", "service", "app_address", "listen_address", "capture"),
    "cds-shared": (CLUSTER_ONLY,),  # gateways: their member cluster's exported services
    "cds-own": ("namespace", "service", "app_address", "listen_address", "capture"),
    types.ENDPOINT: ("locality",),
    types.LISTENER: (
        CLUSTER_ONLY,
        "namespace",
        "service",
        "service_account",  # the authorization policies that select it
        "listen_address",
        "outbound_port",
        "inbound_port",
        "capture",
        "outbound_traffic",
    ),
    # Captured proxies' routes also match their own cluster's ClusterIPs (and clusterset IPs) as Hosts.
    types.ROUTE: ("namespace", "service", "service_account", "capture", CLUSTER_IF_CAPTURED),
    "rds-shared": ("namespace", "capture", CLUSTER_IF_CAPTURED),  # the outbound route table
    # Inbound routes (with mTLS): its own service's HTTP ports, and the policies of its account.
    "rds-own": ("namespace", "service", "service_account"),
    types.SECRET: ("namespace", "service_account"),
}
