"""Waiting in the real-Kubernetes tier: ``until`` polls an async check until it gives a result."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def until(
    check: Callable[[], Awaitable[T | None]],
    what: str,
    timeout: float = 60.0,
    *,
    retry_on: tuple[type[Exception], ...] = (),
    state: Callable[[], object] | None = None,
) -> T:
    """The first truthy result of ``check`` (polled every 0.2 s); AssertionError after ``timeout``,
    with ``state()`` in its message. ``retry_on``: errors that mean "not yet" (e.g. a new CRD's 404)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = await check()
            if result:
                return result
            last = result
        except retry_on as exc:
            last = exc
        if time.monotonic() > deadline:
            seen = f"; last: {last!r}" + (f"; state: {state()}" if state is not None else "")
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{seen}")
        await asyncio.sleep(0.2)
