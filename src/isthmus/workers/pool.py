"""The main process's side of the xDS workers: starts them, feeds them views, reads their reports.

Each worker gets every mesh view, as what changed since the view it holds; a worker that is busy
gets only the newest (views replace each other). A worker that dies is started again after a
second and gets the whole view. What the main process asks of its streams (which proxies lag
behind the current resources, which gateways are connected) merges its own with the workers'
last Summary; a worker whose Summary is of another mesh version than the current one counts as
lagging as a whole, so a drain never moves on before it has the view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from isthmus import metrics
from isthmus.discovery.model import MeshView
from isthmus.identity.kube_tokens import peer_of
from isthmus.identity.pod_bindings import PodBindings
from isthmus.identity.tokens import Peer
from isthmus.workers.messages import (
    Answer,
    Ask,
    Asking,
    Listening,
    Localities,
    PodUids,
    ReviewResult,
    Summary,
    ViewDelta,
    WatchPod,
    WorkerConfig,
    frame,
    read,
)
from isthmus.xds.server.auth import Revocation

log = logging.getLogger(__name__)

RESTART_AFTER = 1.0  # seconds

# What the main process does for its workers' proxies (identity.kube_tokens.ReviewFn and
# identity.pod_bindings.PodUid, served by discovery.kube.Members).
Review = Callable[[str, str, tuple[str, ...]], Awaitable[Any]]
PodUid = Callable[[str, str, str], str | None]
# (bearer token or None, serialized ClientStatusRequest) -> (refusal code or None, detail, serialized
# response): the main process's whole CSDS answer (xds.server.csds.Csds.respond).
CsdsAnswer = Callable[[str | None, bytes], Awaitable[tuple[int | None, str, bytes]]]
ASK_TIMEOUT = 5.0  # seconds a worker may take to answer the main process's questions


@dataclass(slots=True, eq=False)
class _Worker:
    config: WorkerConfig
    process: asyncio.subprocess.Process | None = None
    listening: Listening | None = None
    summary: Summary | None = None
    sent: MeshView | None = None  # the view the worker holds (as far as it was written)
    localities_sent: Localities | None = None
    stdin: asyncio.StreamWriter | None = None
    asking: Asking | None = None  # questions to the running process
    # The pods of its streams' tokens, bound in the main process's PodBindings by uid (so that a
    # pod seen gone refuses its token in every process).
    watched: dict[tuple[str, str, str], dict[str, Revocation]] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class WorkerPool:
    """N xDS worker processes beside the main process's own ADS server."""

    def __init__(
        self, review: Review | None = None, pod_uid: PodUid | None = None, bindings: PodBindings | None = None
    ) -> None:
        self._workers: list[_Worker] = []
        self._review = review
        self._pod_uid = pod_uid
        self._bindings = bindings  # the main process's: pods seen gone, for the streams of all
        self.csds: CsdsAnswer | None = None  # set by the wiring once CSDS exists
        self._answers: set[asyncio.Task[None]] = set()
        # isthmus_xds_connected_proxies counts the workers' streams too (summed with the main one's).
        metrics.CONNECTED_PROXIES.track(self, WorkerPool._connected_sample)
        self._view: MeshView | None = None
        # The framed deltas to the current view, by the version of the view they start from.
        self._frames: tuple[MeshView | None, dict[str | None, bytes]] = (None, {})
        self._localities: Localities | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def size(self) -> int:
        return len(self._workers)

    @property
    def ready(self) -> bool:
        """Every worker is serving."""
        return bool(self._workers) and all(w.ready.is_set() for w in self._workers)

    def configure(self, configs: list[WorkerConfig]) -> None:
        """The workers to run (once the xDS port and the CA are known)."""
        assert not self._tasks, "configured before it starts"
        self._workers = [_Worker(c) for c in configs]

    def processes(self) -> list[dict[str, object]]:
        """Each worker: its pid (None while it starts) and its streams at its last Summary."""
        return [
            {
                "worker": w.config.index,
                "pid": w.listening.pid if w.listening is not None else None,
                "streams": w.summary.streams if w.summary is not None else 0,
                "mesh_version": w.summary.view_version if w.summary is not None else "",
            }
            for w in self._workers
        ]

    async def start(self) -> None:
        for worker in self._workers:
            self._tasks.append(
                asyncio.create_task(self._run(worker), name=f"xds-worker-{worker.config.index}")
            )

    async def wait_ready(self) -> None:
        """Until every worker serves (bound it with asyncio.timeout)."""
        await asyncio.gather(*(w.ready.wait() for w in self._workers))

    async def stop(self) -> None:
        """Close the workers' stdin (they close their streams and exit), then wait for them."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    # ---- what the workers are told ---------------------------------------------------------

    def set_view(self, view: MeshView) -> None:
        self._view = view
        for worker in self._workers:
            worker.wake.set()

    def set_localities(self, nodes: dict[tuple[str, str], tuple[str, str]]) -> None:
        if self._localities is not None and self._localities.nodes == nodes:
            return
        self._localities = Localities(dict(nodes))
        for worker in self._workers:
            worker.wake.set()

    def pods_changed(self, cluster: str, keys: Collection[str] | None) -> None:
        """Member cluster ``cluster``'s pod watch changed ``keys`` ("namespace/name"; None: all):
        each worker hears of the pods its streams' tokens are bound to."""
        if self._pod_uid is None:
            return
        changed = None if keys is None else {tuple(k.partition("/")[::2]) for k in keys}
        for worker in self._workers:
            mine = [
                (ns, name)
                for c, ns, name in worker.watched
                if c == cluster and (changed is None or (ns, name) in changed)
            ]
            if mine:
                self._tell_pods(worker, cluster, mine)

    def _tell_pods(self, worker: _Worker, cluster: str, pods: list[tuple[str, str]]) -> None:
        assert self._pod_uid is not None
        uids = {(ns, name): self._pod_uid(cluster, ns, name) for ns, name in pods}
        for (ns, name), uid in uids.items():
            bound = worker.watched.get((cluster, ns, name), {})
            for gone in [u for u in bound if uid not in ("", u)]:
                del bound[gone]  # the main process's bindings saw it go too
            if not bound:
                worker.watched.pop((cluster, ns, name), None)
        if worker.stdin is not None:
            worker.stdin.write(frame(PodUids(cluster, uids)))

    # ---- what they hold (the per-proxy pages: admin.debug.OtherProcesses, CSDS) -------------

    async def _ask_all(self, what: str, *args: Any) -> list[Any]:
        """Every running worker's answer (those that fail or do not answer are left out, logged)."""
        running = [w for w in self._workers if w.asking is not None]
        answers = await asyncio.gather(*(w.asking.ask(what, *args) for w in running if w.asking))
        out = []
        for worker, answer in zip(running, answers, strict=True):
            if answer.error:
                log.warning("xDS worker %d did not answer %s: %s", worker.config.index, what, answer.error)
            else:
                out.append(answer.value)
        return out

    async def syncz(self) -> list[dict[str, Any]]:
        return [row for rows in await self._ask_all("syncz") for row in rows]

    async def config_dump(self, proxy: str) -> list[bytes]:
        return [entry for entries in await self._ask_all("dump", proxy) for entry in entries]

    async def csds_parts(self, request: bytes) -> list[bytes]:
        return [bytes(part) for part in await self._ask_all("csds", request)]

    # ---- what they say ---------------------------------------------------------------------

    def lagging(self, type_url: str) -> list[str]:
        """The workers' proxies that do not hold the current resources of ``type_url``."""
        out: list[str] = []
        current = self._view.version if self._view is not None else ""
        for worker in self._workers:
            summary = worker.summary
            if summary is None or summary.view_version != current:
                out.append(f"(xDS worker {worker.config.index}: mesh version {current} not applied yet)")
                continue
            out.extend(summary.lagging.get(type_url, ()))
        return out

    def connected(self) -> dict[tuple[str, str, str], int]:
        """(member cluster, role, mode) -> the workers' connected streams."""
        out: dict[tuple[str, str, str], int] = {}
        for worker in self._workers:
            if worker.summary is not None and worker.process is not None:
                for key, n in worker.summary.connected.items():
                    out[key] = out.get(key, 0) + n
        return out

    def _connected_sample(self) -> list[tuple[tuple[str, str, str], float]]:
        known = self._view.clusters if self._view is not None else {}
        out: dict[tuple[str, str, str], float] = {}
        for (cluster, role, mode), n in self.connected().items():
            key = (cluster if cluster in known else metrics.UNKNOWN_CLUSTER, role, mode)
            out[key] = out.get(key, 0.0) + n
        return list(out.items())

    def streams(self) -> int:
        return sum(w.summary.streams for w in self._workers if w.summary is not None)

    def pod_bound_streams(self) -> int:
        return sum(w.summary.pod_bound_streams for w in self._workers if w.summary is not None)

    def auth_failures(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for worker in self._workers:
            if worker.summary is not None:
                for reason, n in worker.summary.auth_failures.items():
                    out[reason] = out.get(reason, 0) + n
        return out

    # ---- one worker ------------------------------------------------------------------------

    async def _run(self, worker: _Worker) -> None:
        while True:
            try:
                await self._serve(worker)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("xDS worker %d failed", worker.config.index)
            log.warning(
                "xDS worker %d stopped; starting it again in %.0fs", worker.config.index, RESTART_AFTER
            )
            await asyncio.sleep(RESTART_AFTER)

    async def _serve(self, worker: _Worker) -> None:
        worker.sent, worker.localities_sent, worker.summary, worker.listening = None, None, None, None
        worker.watched.clear()
        worker.ready.clear()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "isthmus.workers.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            limit=2**26,
        )
        worker.process = process
        assert process.stdin is not None
        assert process.stdout is not None
        stdin, stdout = process.stdin, process.stdout
        worker.stdin = stdin
        worker.asking = Asking(lambda message: stdin.write(frame(message)), ASK_TIMEOUT)
        try:
            stdin.write(frame(worker.config))
            await stdin.drain()
            listening = await read(stdout)
            if not isinstance(listening, Listening):
                raise RuntimeError(f"xDS worker {worker.config.index} did not start serving")
            worker.listening = listening
            worker.ready.set()
            log.info("xDS worker %d (pid %d) serving", worker.config.index, listening.pid)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._feed(worker, stdin))
                reports = tasks.create_task(self._reports(worker, stdout))
                await reports  # the worker ended its stdout: it is gone
                raise _WorkerGone
        except* _WorkerGone:
            pass
        finally:
            worker.ready.clear()
            worker.process = None
            worker.stdin = None
            if worker.asking is not None:
                worker.asking.cancel()
                worker.asking = None
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    stdin.close()
                try:
                    async with asyncio.timeout(worker.config.shutdown_grace + 5):
                        await process.wait()
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
            log.info("xDS worker %d exited (%s)", worker.config.index, process.returncode)

    async def _feed(self, worker: _Worker, stdin: asyncio.StreamWriter) -> None:
        while True:
            await worker.wake.wait()
            worker.wake.clear()
            localities = self._localities
            if localities is not None and localities is not worker.localities_sent:
                stdin.write(frame(localities))
                worker.localities_sent = localities
            view = self._view
            if view is not None and view is not worker.sent:
                stdin.write(self._delta(worker.sent, view))
                worker.sent = view
            await stdin.drain()  # a busy worker makes the next view wait here (and skip those between)

    def _delta(self, before: MeshView | None, view: MeshView) -> bytes:
        """The framed delta from ``before`` to ``view``, made once for every worker that holds
        ``before`` (they all do, unless one was busy or restarted)."""
        if self._frames[0] is not view:
            self._frames = (view, {})
        made = self._frames[1]
        key = before.version if before is not None else None  # a delta holds for any view of that content
        if key not in made:
            made[key] = frame(ViewDelta.between(before, view))
        return made[key]

    async def _reports(self, worker: _Worker, stdout: asyncio.StreamReader) -> None:
        while (message := await read(stdout)) is not None:
            if isinstance(message, Summary):
                worker.summary = message
            elif isinstance(message, Answer) and worker.asking is not None:
                worker.asking.answered(message)
            elif isinstance(message, Ask):
                task = asyncio.create_task(self._answer(worker, message))
                self._answers.add(task)
                task.add_done_callback(self._answers.discard)
            elif isinstance(message, WatchPod) and self._pod_uid is not None:
                key = (message.cluster, message.namespace, message.name)
                bound = worker.watched.setdefault(key, {})
                if message.uid not in bound:
                    known = self._bindings
                    bound[message.uid] = (
                        known.bind(*key, message.uid, elsewhere=True) if known is not None else Revocation()
                    )
                self._tell_pods(worker, message.cluster, [(message.namespace, message.name)])

    async def _answer(self, worker: _Worker, question: Ask) -> None:
        """A worker's question: a TokenReview (with the member cluster's credentials, which only
        this process holds), or a whole CSDS answer."""
        try:
            if question.what == "review" and self._review is not None:
                cluster, token, audiences = question.args
                review = await self._review(cluster, token, audiences)
                peer = peer_of(cluster, review)
                value: object = ReviewResult(
                    review.authenticated,
                    review.username,
                    review.error,
                    review.unavailable,
                    dict(review.extra),
                    pod_gone=isinstance(peer, Peer)
                    and bool(peer.pod_uid)
                    and self._bindings is not None
                    and not self._bindings.may_exist(*peer.bound_pod()),
                )
            elif question.what == "csds" and self.csds is not None:
                value = await self.csds(*question.args)
            else:
                raise ValueError(f"{question.what!r} is not answered here")
            answer = Answer(question.id, value)
        except Exception as exc:  # fail closed, and keep serving the other workers
            log.warning("xDS worker %d: %s failed: %r", worker.config.index, question.what, exc)
            answer = Answer(question.id, error=f"{question.what} failed")
        if worker.stdin is not None:
            worker.stdin.write(frame(answer))


class _WorkerGone(Exception):
    pass
