"""What the ADS server asks about who is on a stream, before any state exists for it.

The server knows nothing of tokens or Kubernetes: it hands the stream's gRPC metadata to a
``StreamAuthenticator`` once, when the stream opens, and gets back an ``Authorizer`` for the
proxy's Node (which arrives with the first request). Either may raise ``AuthFailure``: the stream
is then closed with its status (UNAUTHENTICATED, PERMISSION_DENIED) before a resource is sent.
``isthmus.identity`` implements these.
"""

from __future__ import annotations

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


Authorizer = Callable[[Proxy], None]  # raises AuthFailure if the Node does not match the credentials


class StreamAuthenticator(Protocol):
    def __call__(self, metadata: Mapping[str, str]) -> Awaitable[Authorizer]: ...
