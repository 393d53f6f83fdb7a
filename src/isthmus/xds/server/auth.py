"""What the ADS server asks about who is on a stream, before any state exists for it.

The server knows nothing of tokens or Kubernetes: it hands the stream's gRPC metadata to a
``StreamAuthenticator`` once, when the stream opens, and gets back an ``Authorizer`` for the
proxy's Node (which arrives with the first request). Either may raise ``AuthFailure``: the stream
is then closed with its status (UNAUTHENTICATED, PERMISSION_DENIED) before a resource is sent.
An Authorizer may return a ``Revocation``: the credentials can be withdrawn while the stream is
open (a pod-bound token whose pod was deleted), and the stream then ends with its failure.
``isthmus.identity`` implements these.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import grpc

from isthmus.xds.proxy import Proxy


class AuthFailure(Exception):
    """The stream may not be served; ``reason`` is a short label for logs and counters."""

    def __init__(self, code: grpc.StatusCode, reason: str, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.reason = reason
        self.details = details


class Revocation:
    """Set once the credentials a stream was admitted with are no longer valid; the stream's
    wake-up events are set so it ends at once."""

    def __init__(self) -> None:
        self.failure: AuthFailure | None = None
        self._events: set[asyncio.Event] = set()

    def revoke(self, failure: AuthFailure) -> None:
        if self.failure is None:
            self.failure = failure
        for event in self._events:
            event.set()

    def watch(self, event: asyncio.Event) -> None:
        self._events.add(event)
        if self.failure is not None:
            event.set()

    def unwatch(self, event: asyncio.Event) -> None:
        self._events.discard(event)


# Raises AuthFailure if the Node does not match the credentials; a Revocation if they can be withdrawn.
Authorizer = Callable[[Proxy], Revocation | None]


class StreamAuthenticator(Protocol):
    def __call__(self, metadata: Mapping[str, str]) -> Awaitable[Authorizer]: ...
