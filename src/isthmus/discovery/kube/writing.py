"""The loop every writer into one member cluster runs (discovery.kube.mcs ServiceImports,
discovery.kube.route_status): wait until woken (something to write changed) or until the resync
interval passes (then forget what was written, so it is read again and edits by others undone);
write; on a failure log once, show it in ``error``, reconnect with the cluster's current
credentials and back off, never blocking discovery or another cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes_asyncio import client

log = logging.getLogger(__name__)


def reason(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    why = getattr(exc, "reason", None) or type(exc).__name__
    return f"{status} {why}" if status else f"{why}: {exc}"


class ClusterWriter:
    """The loop; a writer says what it writes (``what``), does one write (``write``) and may forget
    what it wrote (``forget``: after the resync interval and after a failure)."""

    what = "objects"

    def __init__(
        self,
        cluster: str,
        connect: Callable[[], Awaitable[client.ApiClient]],
        *,
        resync: float = 300.0,
        backoff: tuple[float, float] = (1.0, 30.0),
    ) -> None:
        self.cluster, self.connect = cluster, connect
        self.resync, self.backoff = resync, backoff
        self._wake = asyncio.Event()
        self._api: client.ApiClient | None = None
        self.error = ""

    def interval(self) -> float:
        """How long to wait for a wake-up before forgetting what was written."""
        return self.resync

    def ready(self) -> bool:
        """Whether it knows what to write yet."""
        return True

    def forget(self) -> None:
        """Read again, before the next write, what the cluster holds."""

    def why(self, exc: Exception) -> str:
        return reason(exc)

    async def write(self, api: Any) -> None:
        raise NotImplementedError

    async def objects(self) -> Any:
        if self._api is None:
            self._api = await self.connect()
        return client.CustomObjectsApi(self._api)

    async def run(self) -> None:
        delay = self.backoff[0]
        try:
            while True:
                try:  # asyncio.timeout: wait_for can swallow a cancellation on Python 3.11
                    async with asyncio.timeout(self.interval()):
                        await self._wake.wait()
                except TimeoutError:
                    self.forget()
                self._wake.clear()
                if not self.ready():
                    continue
                try:
                    await self.write(await self.objects())
                    if self.error:
                        log.info("cluster %s: writing %s again", self.cluster, self.what)
                    self.error, delay = "", self.backoff[0]
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    why = self.why(exc)
                    if why != self.error:
                        log.warning("cluster %s: writing %s failed: %s", self.cluster, self.what, why)
                    self.error = why
                    self.forget()
                    if self._api is not None:  # reconnect: with the cluster's current credentials
                        await self._api.close()
                        self._api = None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.backoff[1])
                    self._wake.set()
        finally:
            if self._api is not None:
                await self._api.close()
