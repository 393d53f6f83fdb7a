"""Serialized resources: each resource version is encoded once and its bytes shared by every stream.

A Resource carries the resource message's bytes and, pre-encoded, the exact bytes
of its entry in a SotW DiscoveryResponse (an ``Any`` in field 2) and in a Delta
DeltaDiscoveryResponse (a ``Resource`` in field 2). A response is then the
concatenation of shared entries plus a few small per-stream fields (nonce,
version), so pushing to a thousand proxies never re-serializes a resource.
The encoding is plain protobuf wire format; tests parse every response with
the generated message classes to hold it to that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): strings, bytes and embedded messages."""
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _str_field(number: int, value: str) -> bytes:
    return _len_field(number, value.encode()) if value else b""


# google.protobuf.Any: type_url = 1, value = 2.
def encode_any(type_url: str, value: bytes) -> bytes:
    return _str_field(1, type_url) + _len_field(2, value)


@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class Resource:
    """One version of one named resource, serialized once."""

    type_url: str
    name: str
    version: str
    body: bytes
    sotw_entry: bytes = field(repr=False)
    delta_entry: bytes = field(repr=False)

    @classmethod
    def from_bytes(cls, type_url: str, name: str, body: bytes) -> Resource:
        version = hashlib.blake2b(body, digest_size=8).hexdigest()
        any_bytes = encode_any(type_url, body)
        # DiscoveryResponse.resources = 2 (repeated Any).
        sotw = _len_field(2, any_bytes)
        # envoy.service.discovery.v3.Resource: version = 1, resource = 2, name = 3.
        delta = _len_field(2, _str_field(1, version) + _len_field(2, any_bytes) + _str_field(3, name))
        return cls(type_url, name, version, body, sotw, delta)

    @classmethod
    def from_message(cls, type_url: str, name: str, message: Any) -> Resource:
        return cls.from_bytes(type_url, name, message.SerializeToString(deterministic=True))


def sotw_response(type_url: str, version_info: str, nonce: str, resources: Iterable[Resource]) -> bytes:
    """Encode a DiscoveryResponse: version_info = 1, resources = 2, type_url = 4, nonce = 5."""
    return b"".join(
        (
            _str_field(1, version_info),
            b"".join(r.sotw_entry for r in resources),
            _str_field(4, type_url),
            _str_field(5, nonce),
        )
    )


def delta_response(
    type_url: str,
    system_version_info: str,
    nonce: str,
    resources: Iterable[Resource],
    removed: Iterable[str] = (),
) -> bytes:
    """Encode a DeltaDiscoveryResponse: system_version_info = 1, resources = 2, type_url = 4,
    nonce = 5, removed_resources = 6."""
    return b"".join(
        (
            _str_field(1, system_version_info),
            b"".join(r.delta_entry for r in resources),
            _str_field(4, type_url),
            b"".join(_len_field(6, name.encode()) for name in removed),
            _str_field(5, nonce),
        )
    )


def state_version(resources: Iterable[Resource]) -> str:
    """A version for a set of resources: a hash of their names and versions."""
    h = hashlib.blake2b(digest_size=8)
    for r in sorted(resources, key=lambda r: r.name):
        h.update(r.name.encode())
        h.update(b"\0")
        h.update(r.version.encode())
        h.update(b"\0")
    return h.hexdigest()
