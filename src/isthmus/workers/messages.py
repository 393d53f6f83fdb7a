"""What the main process and an xDS worker say to each other, and how it is framed.

Each message is a pickle, framed by its length (4 bytes, big-endian), on the worker's stdin (main
-> worker) and stdout (worker -> main): pipes only the two processes hold. A view travels as what
changed since the view the worker holds (``ViewDelta``); the first one, and the first after a
worker restarts, is the whole view.
"""

from __future__ import annotations

import asyncio
import itertools
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isthmus.discovery.model import MemberCluster, MeshView, Service, ServiceKey, TrafficSplit

_LENGTH = struct.Struct(">I")
MAX_MESSAGE = 1 << 30


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything a worker serves with (the first message it reads)."""

    index: int
    host: str
    port: int
    send_timeout: float
    send_budget: int
    shutdown_grace: float
    cert_ttl: float
    ca: tuple[str, str, str] | None = None  # (root certificate PEM, root key PEM, trust domain)
    mtls: bool = True  # the CA issues the proxies' certificates (SDS)
    xds_sans: tuple[str, ...] = ()  # serve TLS with a certificate of the CA for these names
    token_file: Path | None = None  # proxies authenticate with a token of this file
    gateway_identities: tuple[tuple[str, str, str], ...] = ()
    # Service-account tokens reviewed by the main process (TokenReview), for this audience.
    token_audience: str | None = None
    log_level: int = 20


@dataclass(frozen=True, slots=True)
class ViewDelta:
    """A mesh view as what changed since the worker's last one (``full``: nothing is kept)."""

    version: str
    full: bool
    services: tuple[Service, ...]
    removed: tuple[ServiceKey, ...]
    clusters: tuple[MemberCluster, ...] | None  # None: as before
    splits: tuple[TrafficSplit, ...] | None  # None: as before

    @classmethod
    def between(cls, before: MeshView | None, after: MeshView) -> ViewDelta:
        if before is None:
            return cls(
                after.version,
                True,
                tuple(after.services.values()),
                (),
                tuple(after.clusters.values()),
                tuple(after.splits.values()),
            )
        old = before.services
        changed = tuple(s for k, s in after.services.items() if old.get(k) is not s)
        removed = tuple(k for k in old if k not in after.services)
        clusters = None if before.clusters == after.clusters else tuple(after.clusters.values())
        splits = None if before.splits == after.splits else tuple(after.splits.values())
        return cls(after.version, False, changed, removed, clusters, splits)

    def apply(self, before: MeshView | None) -> MeshView:
        """The view this delta describes, given the one it was made against."""
        if before is None or self.full:
            services: dict[ServiceKey, Service] = {}
            clusters: tuple[MemberCluster, ...] = self.clusters or ()
            splits: tuple[TrafficSplit, ...] = self.splits or ()
        else:
            services = dict(before.services)
            clusters = self.clusters if self.clusters is not None else tuple(before.clusters.values())
            splits = self.splits if self.splits is not None else tuple(before.splits.values())
        for key in self.removed:
            services.pop(key, None)
        for service in self.services:
            services[service.key] = service
        view = MeshView.of(services, clusters, splits)
        if view.version != self.version:
            raise ValueError(f"view {view.version} rebuilt from a delta is not {self.version}")
        return view


@dataclass(frozen=True, slots=True)
class Localities:
    """(member cluster, node name) -> (region, zone): where an injected sidecar's node is."""

    nodes: dict[tuple[str, str], tuple[str, str]]


@dataclass(frozen=True, slots=True)
class ReviewResult:
    """A TokenReview's answer (identity.kube_tokens.ReviewAnswer), as the main process got it."""

    authenticated: bool
    username: str = ""
    error: str = ""
    unavailable: bool = False
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # The token is bound to a pod the main process has seen deleted (a stream of it was open in
    # some process): the API server's token cache may still accept it, isthmus does not.
    pod_gone: bool = False


@dataclass(frozen=True, slots=True)
class WatchPod:
    """Worker -> main: a stream of this pod's token (the pod of that uid) is open: say when the pod
    changes, and remember it gone for the streams of every process."""

    cluster: str
    namespace: str
    name: str
    uid: str


@dataclass(frozen=True, slots=True)
class PodUids:
    """Main -> worker: the uids of watched pods of ``cluster`` as its watch holds them (None: no
    such pod; "": the cluster's pods are not listed yet)."""

    cluster: str
    uids: dict[tuple[str, str], str | None]


@dataclass(frozen=True, slots=True)
class Ask:
    """A question for the other side, answered by an Answer of the same id. Main -> worker:
    ``syncz`` (its /debug/syncz rows), ``dump`` (proxy id: its config dump stream entries),
    ``csds`` (a serialized ClientStatusRequest: its part of the answer). Worker -> main: ``csds``
    ((bearer token, serialized request): the whole answer, the caller checked as the admin API
    checks it); ``review`` ((member cluster, token, audiences): a ReviewResult)."""

    id: int
    what: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Answer:
    id: int
    value: Any = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Listening:
    """The worker serves xDS (its first message)."""

    pid: int
    port: int


@dataclass(frozen=True, slots=True)
class Summary:
    """What the main process needs of a worker's streams, sent a few times a second."""

    pid: int
    view_version: str  # the mesh version the worker serves
    streams: int
    # node ids of the proxies that do not hold (and have not ACKed) the current resources, by type
    lagging: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # (member cluster, role, mode) -> connected streams
    connected: dict[tuple[str, str, str], int] = field(default_factory=dict)
    auth_failures: dict[str, int] = field(default_factory=dict)
    pod_bound_streams: int = 0  # streams of pod-bound tokens, followed until their pod goes


class Asking:
    """Questions sent and not answered yet, by id."""

    def __init__(self, send: Callable[[object], None], timeout: float) -> None:
        self._send = send
        self._timeout = timeout
        self._waiting: dict[int, asyncio.Future[Answer]] = {}
        self._ids = itertools.count(1)

    async def ask(self, what: str, *args: Any) -> Answer:
        """The answer; Answer(error=...) if none comes within the timeout."""
        question = Ask(next(self._ids), what, args)
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting[question.id] = answer
        try:
            self._send(question)
            async with asyncio.timeout(self._timeout):
                return await answer
        except TimeoutError:
            return Answer(question.id, error=f"no answer to {what} within {self._timeout:.0f}s")
        finally:
            self._waiting.pop(question.id, None)

    def answered(self, answer: Answer) -> None:
        waiting = self._waiting.get(answer.id)
        if waiting is not None and not waiting.done():
            waiting.set_result(answer)

    def cancel(self) -> None:
        """The other side is gone: every question waiting gets an error."""
        for question_id, waiting in list(self._waiting.items()):
            if not waiting.done():
                waiting.set_result(Answer(question_id, error="the other process is gone"))


async def read(reader: asyncio.StreamReader) -> Any:
    """The next message, or None at the end of the stream."""
    try:
        header = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError:
        return None
    (size,) = _LENGTH.unpack(header)
    if size > MAX_MESSAGE:
        raise ValueError(f"a message of {size} bytes exceeds {MAX_MESSAGE}")
    return pickle.loads(await reader.readexactly(size))


def frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body
