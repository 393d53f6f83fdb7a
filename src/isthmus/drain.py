"""Draining a member cluster for an upgrade, and bringing it back (docs/resilience.md).

A drain lowers the cluster's weight step by step (75, 50, 25, then 0 percent of its normal share;
an undrain goes back up to 100). Each step is pushed at once, and the next one waits until every
connected proxy has been sent, and has ACKed, the endpoints of the current step (or until
``ack_timeout``, reported), then ``step_seconds`` more so connections move gradually. EDS puts a
cluster being drained in the same priority as its fallback with its weight scaled down, and a
drained one after everything else: traffic leaves it without failed requests, and comes back to it
only if nothing else is left. Progress is in ``status()`` (served at GET /drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.model import FULL_WEIGHT
from isthmus.xds import types

log = logging.getLogger(__name__)

DRAIN_STEPS = (75, 50, 25, 0)
UNDRAIN_STEPS = (*reversed(DRAIN_STEPS[:-1]), FULL_WEIGHT)  # 25, 50, 75, 100


@dataclass(slots=True)
class DrainProgress:
    cluster: str
    action: str  # "drain" or "undrain"
    weight: int
    steps: list[int]
    state: str = "running"  # running, done, cancelled
    waiting_for: list[str] = field(default_factory=list)  # proxies that have not ACKed this step
    timed_out: list[str] = field(default_factory=list)  # proxies that did not ACK within the timeout
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None


class Drains:
    """Runs at most one drain or undrain per member cluster."""

    def __init__(
        self,
        aggregator: Aggregator,
        lagging: Callable[[str], list[str]],
        step_seconds: float = 2.0,
        ack_timeout: float = 30.0,
    ) -> None:
        self.aggregator = aggregator
        self.lagging = lagging  # node ids of the proxies not holding a type's current resources
        self.step_seconds = step_seconds
        self.ack_timeout = ack_timeout
        self.progress: dict[str, DrainProgress] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, cluster: str, drain: bool = True) -> DrainProgress:
        """Begin draining (or undraining) ``cluster``; a running operation on it is replaced."""
        return self.toward(cluster, 0 if drain else FULL_WEIGHT)

    def toward(self, cluster: str, target: int, start: int | None = None) -> DrainProgress:
        """Move ``cluster``'s weight to ``target`` in the usual steps, from ``start`` (a weight
        already applied, e.g. recorded before a restart) or from where it is; a running operation
        to another target is replaced, one to the same target goes on."""
        current = self.progress.get(cluster)
        if current is not None and current.state == "running" and current.steps[-1:] == [target]:
            return current
        weight = start if start is not None else current.weight if current is not None else FULL_WEIGHT
        drain = target < weight or (target == weight and target < FULL_WEIGHT)
        if drain:
            steps = [w for w in DRAIN_STEPS if target <= w < weight]
        else:
            steps = [w for w in UNDRAIN_STEPS if weight < w <= target]
        if not steps or steps[-1] != target:
            steps.append(target)
        previous = self._tasks.pop(cluster, None)
        if previous is not None:
            previous.cancel()
            if current is not None:
                current.state = "cancelled"
        progress = DrainProgress(cluster, "drain" if drain else "undrain", weight, steps)
        self.progress[cluster] = progress
        log.info("cluster %s: %s in steps %s", cluster, progress.action, steps)
        self._tasks[cluster] = asyncio.create_task(self._run(progress), name=f"drain-{cluster}")
        return progress

    async def _run(self, progress: DrainProgress) -> None:
        for weight in progress.steps:
            self.aggregator.set_cluster_weight(progress.cluster, weight)
            self.aggregator.flush()
            progress.weight = weight
            await self._until_acked(progress)
            if weight not in (0, FULL_WEIGHT):
                await asyncio.sleep(self.step_seconds)
        progress.state = "done"
        progress.finished_at = time.time()
        log.info("cluster %s: %s done (weight %d%%)", progress.cluster, progress.action, progress.weight)

    async def _until_acked(self, progress: DrainProgress) -> None:
        deadline = time.monotonic() + self.ack_timeout
        await asyncio.sleep(0.05)  # let the streams pick the new view up
        while True:
            progress.waiting_for = self.lagging(types.ENDPOINT)
            if not progress.waiting_for:
                return
            if time.monotonic() >= deadline:
                progress.timed_out = sorted(set(progress.timed_out) | set(progress.waiting_for))
                log.warning(
                    "cluster %s: %d proxies did not ACK weight %d%% within %.0fs: %s",
                    progress.cluster,
                    len(progress.waiting_for),
                    progress.weight,
                    self.ack_timeout,
                    ", ".join(progress.waiting_for[:5]),
                )
                return
            await asyncio.sleep(0.1)

    def status(self) -> dict[str, dict[str, object]]:
        return {name: asdict(p) for name, p in sorted(self.progress.items())}

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
