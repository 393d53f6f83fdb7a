"""What each connected proxy was sent and where it stands, read from the ADS server's streams:
the facts behind the admin API's /debug/syncz and /debug/config_dump, CSDS and ``isthmus status``.

* ``sync_state``: per type, as ``istioctl proxy-status`` says it: SYNCED (the last response was
  ACKed), STALE (sent, no answer yet), NACKED (the last response was refused), NOT SENT.
* ``held``: the resources a proxy holds, per type: name, version and the bytes it was sent when
  the stream still has them (the set it last planned from, or the full state it last sent).
* ``as_json``: a resource as JSON (the proto3 JSON mapping), with secrets' private material
  replaced by "[redacted]": no key leaves through a debug page.

Readers only: nothing here changes a stream, and everything is a copy.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2, json_format

from isthmus.xds.resources import Resource
from isthmus.xds.server.status import TypeStatus
from isthmus.xds.server.stream import Stream

SYNCED, STALE, NACKED, NOT_SENT = "SYNCED", "STALE", "NACKED", "NOT SENT"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
REDACTED = "[redacted]"
# Fields of a Secret that hold private material (TlsCertificate's, and a generic secret's).
_PRIVATE = frozenset({"privateKey", "password", "ocspStaple", "secret", "pkcs12"})


def sync_state(status: TypeStatus) -> str:
    """Where one type of one proxy stands (see the module's docstring)."""
    if not status.last_sent_nonce:
        return NOT_SENT
    if status.last_nack is not None and status.last_nack.nonce == status.last_sent_nonce:
        return NACKED
    if status.last_acked_nonce == status.last_sent_nonce:
        return SYNCED
    return STALE


@dataclass(frozen=True, slots=True)
class Held:
    """One resource a proxy holds (or was last sent: a NACKed version counts, as the stream keeps it)."""

    type_url: str
    name: str
    version: str
    resource: Resource | None  # None: the stream no longer has the bytes of that version


def held(stream: Stream) -> dict[str, list[Held]]:
    """The resources ``stream``'s proxy holds, by type, each type's sorted by name."""
    out: dict[str, list[Held]] = {}
    for type_url, state in sorted(stream.states.items()):
        items = []
        for name, version in sorted(state.delivery.known.items()):
            found = state.delivery.last_full.get(name)
            if found is None or found.version != version:
                found = (
                    state.delivery.last_set.by_name.get(name) if state.delivery.last_set is not None else None
                )
            items.append(Held(type_url, name, version, found if found and found.version == version else None))
        out[type_url] = items
    return out


def streams_of(streams: Iterator[Stream] | list[Stream], node_id: str) -> list[Stream]:
    return [s for s in streams if s.status.node_id == node_id]


def as_json(resource: Resource) -> dict[str, Any]:
    """The resource as proto3 JSON (``@type`` first), secrets redacted."""
    message = any_pb2.Any(type_url=resource.type_url, value=resource.body)
    try:
        body: dict[str, Any] = json_format.MessageToDict(message)
    except (TypeError, KeyError, json_format.Error):  # a type this process cannot decode
        return {"@type": resource.type_url, "bytes": base64.b64encode(resource.body).decode()}
    return _redact(body) if resource.type_url == SECRET_TYPE else body


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (REDACTED if k in _PRIVATE else _redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value
