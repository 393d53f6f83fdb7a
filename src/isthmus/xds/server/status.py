"""Per-proxy status kept by the ADS server: what was sent, what was ACKed, the last NACK.

Plain mutable records owned by one stream each; ``AdsServer.status()`` hands out
copies, so readers (admin pages, tests) never see a half-updated record.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Nack:
    """A rejected response: the version and nonce Envoy refused, and why."""

    version: str
    nonce: str
    code: int
    message: str
    at: float


@dataclass(slots=True)
class TypeStatus:
    last_sent_version: str = ""
    last_sent_nonce: str = ""
    last_sent_at: float | None = None
    last_acked_version: str = ""
    last_acked_nonce: str = ""
    last_acked_at: float | None = None
    last_nack: Nack | None = None
    responses: int = 0
    nacks: int = 0
    subscribed: tuple[str, ...] = ()
    wildcard: bool = False


@dataclass(slots=True)
class ProxyStatus:
    """One connected ADS stream."""

    stream_id: int
    mode: str  # "sotw" or "delta"
    peer: str
    connected_since: float = field(default_factory=time.time)
    node_id: str = ""
    cluster: str = ""
    role: str = ""
    types: dict[str, TypeStatus] = field(default_factory=dict)

    def type(self, type_url: str) -> TypeStatus:
        status = self.types.get(type_url)
        if status is None:
            status = self.types[type_url] = TypeStatus()
        return status

    def snapshot(self) -> ProxyStatus:
        return copy.deepcopy(self)
