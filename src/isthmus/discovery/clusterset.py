"""Clusterset IPs: one virtual address per service of the mesh, the same in every member cluster.

A sidecar's DNS answers ``NAME.NS.svc.clusterset.local`` (and the cluster.local name of a service
its own cluster does not define) with this address, and its outbound listener routes connections
to it like connections to the service's ClusterIP (MCS: the ServiceImport's IP).

The address is a pure function of the set of service keys, so every replica of isthmus, given the
same mesh, picks the same addresses: each key hashes (SHA-256 of ``namespace/name``) to a home slot
in the range; keys are placed in (home slot, key) order, and a key whose home is taken takes the
next free slot. Adding a service moves another one's address only when their probe sequences meet,
which in a range much larger than the mesh is rare (the default /16 holds 65,534 addresses).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
from collections.abc import Iterable

from isthmus.discovery.model import ServiceKey

log = logging.getLogger(__name__)

# Class E space, never routed on the internet; istio's auto-allocated service addresses use it too.
DEFAULT_RANGE = "240.240.0.0/16"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def network(text: str) -> Network:
    """A range for clusterset IPs (ValueError with a reason when it is not one or too small)."""
    net = ipaddress.ip_network(text, strict=True)
    if net.num_addresses < 4:
        raise ValueError(f"clusterset range {text} is too small")
    return net


DEFAULT_NETWORK = network(DEFAULT_RANGE)


@functools.lru_cache(maxsize=65536)
def _home(key: ServiceKey, size: int) -> int:
    digest = hashlib.sha256(f"{key.namespace}/{key.name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % size


def allocate(keys: Iterable[ServiceKey], net: Network) -> dict[ServiceKey, str]:
    """An address of ``net`` for each key (its network and broadcast addresses never); keys beyond
    the range's capacity get none, and a warning says how many."""
    size = net.num_addresses - 2
    taken: set[int] = set()
    out: dict[ServiceKey, str] = {}
    ordered = sorted(keys, key=lambda k: (_home(k, size), k))
    for key in ordered[:size]:
        slot = _home(key, size)
        while slot in taken:
            slot = (slot + 1) % size
        taken.add(slot)
        out[key] = str(net.network_address + 1 + slot)
    if len(ordered) > size:
        log.warning("clusterset range %s is full: %d services get no clusterset IP", net, len(ordered) - size)
    return out
