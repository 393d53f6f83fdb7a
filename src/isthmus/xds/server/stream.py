"""One ADS stream: subscriptions, nonces, ACK/NACK, ordering and flow control.

The stream is a single coroutine woken by one Event, set either by the request
reader (a bounded queue of requests) or by the cache, which the stream follows for each type it
serves and which names the type whose resources changed for this proxy (so a change that is the
same for this proxy as before wakes nothing, and a woken stream plans only the types named). On
each wakeup it applies the queued requests, then pushes what changed, in ADS order:

* at most one un-ACKed response per type; newer changes coalesce behind it;
* additions and updates first, in PUSH_ORDER (CDS, EDS, LDS, RDS, SDS);
  removals only once nothing is waiting for an ACK (make-before-break);
* a changed Cluster makes its ClusterLoadAssignment be sent again, because
  Envoy keeps a modified cluster warming until it receives one;
* a NACKed version is never resent: the stream keeps it as "known" and pushes
  again only when the desired resource changes;
* a stream whose client holds the predecessor of the current set plans only the
  names that set's diff lists (and the names it touched itself), not every name.

SotW and Delta differ only in how requests are read and responses framed
(sotw.py and delta.py); everything else lives here.

Metrics (isthmus.metrics), per response and per ACK, never per resource: responses and NACKs by
type, ACK latency (response handed to gRPC -> its ACK read), and convergence: after a push, a stream
with no response waiting for an ACK holds everything of the cache's current generation; if it was
sent something since the cache first told it of a change, it observes the time since the earliest
discovery event of the views installed from then on (ConfigCache.event_since), unless that event
is older than the stream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from isthmus import metrics
from isthmus.xds import types
from isthmus.xds.cache import ConfigCache, ResourceSet
from isthmus.xds.proxy import InvalidNode, Proxy, proxy_from_node
from isthmus.xds.resources import Resource
from isthmus.xds.server.auth import AuthFailure, Authorizer, Revocation
from isthmus.xds.server.status import Nack, ProxyStatus, TypeStatus

log = logging.getLogger(__name__)

_nonces = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds that keep one bad or slow client from hurting the others."""

    max_resource_names: int = 100_000
    request_queue: int = 64
    send_timeout: float = 30.0
    # Bytes of responses sent and not yet ACKed, over all streams (see SendBudget).
    send_budget: int = 64 * 2**20


class SendBudget:
    """Bounds the bytes of responses sent and not yet ACKed, over all streams.

    Every response is framed into its own buffer (a full CDS or EDS at mesh scale is about 1 MB)
    that gRPC keeps until the client has read it. When a thousand proxies connect at once, the
    server frames responses faster than they are read; without a bound its memory grows with the
    number of proxies times the size of their configuration. A response waits (first come, first
    served) until the bytes in flight leave room for it; one larger than the whole budget waits
    until nothing else is in flight. A response's bytes return on its ACK or NACK, or when its
    stream ends. ACKs are taken off where requests are read, not in the stream's loop, which may
    itself be waiting for budget.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Responses waiting for room."""
        return len(self._waiting)

    def take(self, size: int) -> int | None:
        """``size`` (at most the limit) taken at once if there is room and nobody waits, else None."""
        size = min(size, self.limit)
        if not self._waiting and (not self.used or self.used + size <= self.limit):
            self.used += size
            return size
        return None

    async def acquire(self, size: int) -> int:
        taken = self.take(size)
        if taken is not None:
            return taken
        size = min(size, self.limit)
        ready = asyncio.get_running_loop().create_future()
        entry = (size, ready)
        self._waiting.append(entry)
        try:
            await ready
        except asyncio.CancelledError:
            if ready.done() and not ready.cancelled():
                self.release(size)  # granted as we were cancelled: give it back
            else:
                self._waiting.remove(entry)
                self._grant()
            raise
        return size

    def release(self, size: int) -> None:
        self.used -= size
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            size, ready = self._waiting[0]
            if self.used and self.used + size > self.limit:
                return
            self._waiting.popleft()
            if not ready.done():
                self.used += size
                ready.set_result(None)


class StreamError(Exception):
    """Ends the stream with a gRPC status; never the process."""

    def __init__(self, code: grpc.StatusCode, details: str, auth_reason: str = "") -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.auth_reason = auth_reason  # the credentials did not do (auth.AuthFailure.reason)


@dataclass(slots=True)
class Subscription:
    """What the client asked for of one type."""

    started: bool = False  # the type's first request was read
    wildcard: bool = False
    legacy_wildcard: bool = False  # wildcard by an empty first request (ends as the protocol says)
    names: set[str] = field(default_factory=set)
    digest: str = ""  # of wildcard and names: part of the response version


@dataclass(slots=True)
class Delivery:
    """What the client holds of one type (or was last sent), and how far planning has got."""

    # name -> version the client holds (or was last sent: a NACKed version stays here so it is
    # never resent in a loop). For SotW full-state types, last_full keeps the Resources sent.
    known: dict[str, str] = field(default_factory=dict)
    last_full: Mapping[str, Resource] = field(default_factory=dict)
    missing_reported: set[str] = field(default_factory=set)  # names reported as not existing
    last_set: ResourceSet | None = None  # the cache's set the last plan looked at
    # Incremental planning: ``known`` is up to date with the ResourceSet of version ``basis``
    # except for the ``touched`` names; "" when the subscription changed (plan every name).
    basis: str = ""
    touched: set[str] = field(default_factory=set)
    dirty: bool = False  # something to plan: the cache told of a change, or the client asked
    deferred_removals: bool = False  # removals wait until every addition is ACKed
    responded: bool = False  # anything was ever sent for this type


@dataclass(slots=True)
class InFlight:
    """The last response of one type: whether it waits for its ACK, and what it holds meanwhile."""

    nonce: str | None = None  # the nonce of the response waiting for its ACK; None: nothing waits
    last_nonce: str = ""  # the latest nonce sent (a SotW request with another one is stale)
    held: int = 0  # bytes of the response in flight, taken from the SendBudget
    sent_at: float = 0.0  # time.monotonic() when the response in flight was handed to gRPC


@dataclass(slots=True)
class TypeState:
    """What one type looks like on one stream: the subscription, the delivery, the response in
    flight, and the status and metrics readers see."""

    type_url: str
    status: TypeStatus
    subscription: Subscription = field(default_factory=Subscription)
    delivery: Delivery = field(default_factory=Delivery)
    in_flight: InFlight = field(default_factory=InFlight)
    meters: metrics.XdsType = field(init=False)  # this type's metrics

    def __post_init__(self) -> None:
        self.meters = metrics.xds_type(types.short(self.type_url))

    def resubscribed(self) -> None:
        """The subscription changed: the next plan looks at every name."""
        sub = self.subscription
        ordered = tuple(sorted(sub.names))
        sub.digest = names_digest(sub.wildcard, ordered)
        self.delivery.basis = ""
        self.delivery.dirty = True
        self.status.wildcard = sub.wildcard
        self.status.subscribed = ordered


@dataclass(slots=True)
class Plan:
    """What to send for one type: resources to add or update, and names to remove."""

    resources: list[Resource]
    removed: list[str]
    version: str
    updated: list[str] = field(default_factory=list)  # names whose version changed for the client


def names_digest(wildcard: bool, ordered: tuple[str, ...]) -> str:
    h = hashlib.blake2b(b"*" if wildcard else b"", digest_size=8)
    for name in ordered:
        h.update(name.encode())
        h.update(b"\0")
    return h.hexdigest()


def response_version(state: TypeState, current: ResourceSet) -> str:
    """The version of what a stream's subscription selects from ``current``: a function of the
    set's version and the subscription, so computing it costs nothing per subscribed name."""
    if state.subscription.wildcard and not state.subscription.names:
        return current.version
    return hashlib.blake2b(
        f"{current.version}/{state.subscription.digest}".encode(), digest_size=8
    ).hexdigest()


class Stream:
    """Base class; subclasses implement ``handle_request`` and ``encode``."""

    mode = ""

    def __init__(
        self,
        stream_id: int,
        cache: ConfigCache,
        context: grpc.aio.ServicerContext[Any, Any],
        limits: Limits,
        closing: asyncio.Event,
        on_proxy: Callable[[Stream], None] | None = None,
        budget: SendBudget | None = None,
        authorize: Authorizer | None = None,
        locate: Callable[[Proxy], Proxy] | None = None,
    ) -> None:
        self.cache = cache
        self._locate = locate  # fills in what the Node left out (its locality, from its node)
        self._authorize = authorize  # checks the Node against the stream's credentials (auth.py)
        self._revocation: Revocation | None = None  # set by the authenticator if they are withdrawn
        self.context = context
        self.limits = limits
        self.budget = budget if budget is not None else SendBudget(limits.send_budget)
        self.closing = closing
        self.proxy: Proxy | None = None
        self.status = ProxyStatus(stream_id=stream_id, mode=self.mode, peer=context.peer() or "")
        self.states: dict[str, TypeState] = {}
        self._wakeup = asyncio.Event()
        self._requests: asyncio.Queue[Any] = asyncio.Queue(maxsize=limits.request_queue)
        self._on_proxy = on_proxy
        self._reader_done = False
        self._reader_error: Exception | None = None
        # Convergence: the cache generation before the first change the cache told the stream of
        # since it last held everything (None: it holds everything), whether it was sent anything
        # since, and when it started (events before it are not its to count).
        self._behind_since: int | None = None
        self._sent_since_synced = False
        self._started_at = time.monotonic()

    # ---- protocol-specific -------------------------------------------------------------

    def handle_request(self, request: Any) -> None:
        raise NotImplementedError

    def plan(self, state: TypeState, current: ResourceSet, allow_removals: bool) -> Plan | None:
        raise NotImplementedError

    def encode(self, state: TypeState, plan: Plan, nonce: str) -> bytes:
        raise NotImplementedError

    # ---- shared request handling ---------------------------------------------------------

    def _identify(self, request: Any) -> None:
        if self.proxy is not None:
            return
        if not request.HasField("node"):
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry a Node")
        try:
            proxy = proxy_from_node(request.node)
        except InvalidNode as exc:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if self._authorize is not None:
            try:
                self._revocation = self._authorize(proxy)
            except AuthFailure as exc:
                log.warning("stream %d: %s refused: %s", self.status.stream_id, proxy.node_id, exc.details)
                raise StreamError(exc.code, exc.details, exc.reason) from None
            metrics.AUTHENTICATIONS.labels("ok").inc()
            if self._revocation is not None:
                self._revocation.watch(self._wakeup)
        if self._locate is not None:
            proxy = self._locate(proxy)
        self.proxy = proxy
        self.status.node_id = self.proxy.node_id
        self.status.cluster = self.proxy.cluster
        self.status.role = self.proxy.role.value
        if self._on_proxy is not None:
            self._on_proxy(self)
        log.info(
            "stream %d: %s proxy %s connected (%s)",
            self.status.stream_id,
            self.mode,
            self.proxy.node_id,
            self.status.peer,
        )

    def _state(self, type_url: str) -> TypeState:
        if not type_url:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "type_url is required on an ADS stream")
        if type_url not in self.cache.type_urls():
            served = ", ".join(sorted(types.short(t) for t in self.cache.type_urls()))
            raise StreamError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unsupported type_url {type_url!r} (this server serves {served})",
            )
        state = self.states.get(type_url)
        if state is None:
            assert self.proxy is not None  # identified by the first request
            state = self.states[type_url] = TypeState(type_url, self.status.type(type_url))
            self.cache.follow(type_url, self.proxy, self._changed)
        return state

    def _changed(self, type_url: str) -> None:
        """The cache: the resources of ``type_url`` for this proxy changed."""
        self.states[type_url].delivery.dirty = True
        if self._behind_since is None:
            self._behind_since = self.cache.generation - 1
        self._wakeup.set()

    def _check_names(self, count: int) -> None:
        if count > self.limits.max_resource_names:
            raise StreamError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{count} resource names in one request exceed the limit ({self.limits.max_resource_names})",
            )

    def _answered(self, request: Any) -> None:
        """An ACK or NACK returns its response's bytes to the budget as soon as it is read, even
        while this stream's loop waits for budget itself (else streams could wait on each other)."""
        state = self.states.get(request.type_url)
        if state is not None and state.in_flight.held and request.response_nonce == state.in_flight.nonce:
            self._release(state)

    def _release(self, state: TypeState) -> None:
        """The bytes of ``state``'s last response are no longer in flight."""
        if state.in_flight.held:
            self.budget.release(state.in_flight.held)
            state.in_flight.held = 0

    def _ack(self, state: TypeState, version: str, nonce: str) -> None:
        self._release(state)
        state.in_flight.nonce = None
        state.meters.ack_latency.observe(time.monotonic() - state.in_flight.sent_at)
        state.status.last_acked_version = version
        state.status.last_acked_nonce = nonce
        state.status.last_acked_at = time.time()

    def _nack(self, state: TypeState, nonce: str, error: Any) -> None:
        self._release(state)
        state.in_flight.nonce = None
        state.status.nacks += 1
        state.meters.nacks.inc()
        state.status.last_nack = Nack(
            version=state.status.last_sent_version,
            nonce=nonce,
            code=error.code,
            message=error.message,
            at=time.time(),
        )
        log.warning(
            "stream %d: %s NACKed %s version %s: %s",
            self.status.stream_id,
            self.status.node_id,
            types.short(state.type_url),
            state.status.last_sent_version,
            error.message,
        )

    # ---- desired state -------------------------------------------------------------------

    def candidates(self, state: TypeState, current: ResourceSet) -> set[str] | None:
        """The names whose desired resource may differ from what ``known`` says, or None for all
        (the first plan, a new subscription, or a set too many sets after the one planned against)."""
        if not state.delivery.basis:
            return None
        if state.delivery.basis == current.version:
            names = set(state.delivery.touched)
        elif (since := current.touched_since(state.delivery.basis)) is not None:
            names = state.delivery.touched | since
        else:
            return None
        return names if state.subscription.wildcard else names & state.subscription.names

    def desired_one(self, state: TypeState, current: ResourceSet, name: str) -> Resource | None:
        resource = current.by_name.get(name)
        if (
            resource is None
            and state.type_url in types.PLACEHOLDER_ON_MISSING
            and name in state.subscription.names
        ):
            resource = self.cache.placeholder(state.type_url, name)
        return resource

    def planned(self, state: TypeState, current: ResourceSet) -> None:
        """``known`` now reflects ``current`` for every name."""
        state.delivery.basis = current.version
        state.delivery.touched.clear()

    def desired(self, state: TypeState, current: ResourceSet) -> dict[str, Resource]:
        wanted: dict[str, Resource] = dict(current.by_name) if state.subscription.wildcard else {}
        for name in state.subscription.names:
            if name in wanted:
                continue
            resource = current.by_name.get(name)
            if resource is None and state.type_url in types.PLACEHOLDER_ON_MISSING:
                resource = self.cache.placeholder(state.type_url, name)
            if resource is not None:
                wanted[name] = resource
        return wanted

    # ---- the loop ------------------------------------------------------------------------

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for request in requests:
                self._answered(request)
                await self._requests.put(request)
                self._wakeup.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # client vanished, malformed frame: end this stream only
            log.debug("stream %d: reader ended: %r", self.status.stream_id, exc)
            self._reader_error = exc
        finally:
            self._reader_done = True
            self._wakeup.set()

    async def run(self, requests: AsyncIterator[Any]) -> None:
        self._started_at = time.monotonic()
        reader = asyncio.create_task(self._read(requests), name=f"ads-reader-{self.status.stream_id}")
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                if self.closing.is_set():
                    raise StreamError(grpc.StatusCode.UNAVAILABLE, "control plane shutting down; reconnect")
                if self._revocation is not None and self._revocation.failure is not None:
                    revoked = self._revocation.failure
                    raise StreamError(revoked.code, revoked.details, revoked.reason)
                while not self._requests.empty():
                    self.handle_request(self._requests.get_nowait())
                if self._requests.empty() and self._reader_done:
                    if isinstance(self._reader_error, DecodeError):
                        detail = f"malformed request: {self._reader_error}"
                        raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, detail)
                    return
                if self.proxy is not None and self.cache.serving:
                    await self.push()
        finally:
            for type_url, state in self.states.items():
                self._release(state)
                if self.proxy is not None:
                    self.cache.unfollow(type_url, self.proxy, self._changed)
            if self._revocation is not None:
                self._revocation.unwatch(self._wakeup)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def push(self) -> None:
        generation = self.cache.generation
        await self._push()
        if self._sent_since_synced or self._behind_since is not None:
            self._converged(generation)

    def _converged(self, generation: int) -> None:
        """After a push planned against ``generation``: with nothing waiting for an ACK and nothing
        the cache told of left to plan, the proxy holds all of it (a push that sends nothing
        awaits nothing, so the generation is the same)."""
        if any(s.in_flight.nonce is not None or s.delivery.dirty for s in self.states.values()):
            return
        behind = self._behind_since
        if self._sent_since_synced and behind is not None:
            event = self.cache.event_since(behind, generation)
            if event is not None and event >= self._started_at:
                metrics.CONVERGENCE.observe(time.monotonic() - event)
        self._behind_since = None
        self._sent_since_synced = False

    async def _push(self) -> None:
        assert self.proxy is not None
        # Pass 1: additions and updates in ADS order.
        for type_url in types.PUSH_ORDER:
            maybe = self.states.get(type_url)
            if maybe is None or not maybe.subscription.started or maybe.in_flight.nonce is not None:
                continue
            state = maybe
            if not state.delivery.dirty:  # neither the cache nor the client changed anything of this type
                continue
            current = self.cache.resources(type_url, self.proxy)
            state.delivery.last_set = current
            state.delivery.dirty = False
            plan = self.plan(state, current, allow_removals=False)
            if plan is not None:
                await self.send(state, plan)
        # Pass 2: removals, once every addition has been ACKed.
        if any(s.in_flight.nonce is not None for s in self.states.values()):
            return
        for type_url in types.PUSH_ORDER:
            deferred = self.states.get(type_url)
            if (
                deferred is None
                or not deferred.delivery.deferred_removals
                or deferred.delivery.last_set is None
            ):
                continue
            deferred.delivery.deferred_removals = False
            plan = self.plan(deferred, deferred.delivery.last_set, allow_removals=True)
            if plan is not None:
                await self.send(deferred, plan)

    async def send(self, state: TypeState, plan: Plan) -> None:
        nonce = f"{next(_nonces):x}"
        self._release(state)
        size = sum(len(r.body) for r in plan.resources)
        taken = self.budget.take(size)  # without a wait (and a coroutine) when there is room
        state.in_flight.held = taken if taken is not None else await self.budget.acquire(size)
        data = self.encode(state, plan, nonce)
        # Recorded before the write: the client may ACK (and readers see the status) before it returns.
        flight, status = state.in_flight, state.status
        flight.sent_at = time.monotonic()
        flight.nonce = flight.last_nonce = nonce
        state.delivery.responded = True
        status.last_sent_version = plan.version
        status.last_sent_nonce = nonce
        status.last_sent_at = time.time()
        status.responses += 1
        state.meters.responses.inc()
        self._sent_since_synced = True
        try:
            # asyncio.timeout, not wait_for: no task per write (wait_for's was 15 % of a change at W1)
            async with asyncio.timeout(self.limits.send_timeout):
                await self.context.write(data)
        except TimeoutError:
            raise StreamError(
                grpc.StatusCode.UNAVAILABLE,
                f"client did not read a {types.short(state.type_url)} response within "
                f"{self.limits.send_timeout:.0f}s; closing this stream",
            ) from None
        if state.type_url == types.CLUSTER and plan.updated:
            self._rewarm_endpoints(plan.updated)

    def _rewarm_endpoints(self, clusters: list[str]) -> None:
        """Envoy keeps a changed cluster warming until it gets its ClusterLoadAssignment: resend it."""
        eds = self.states.get(types.ENDPOINT)
        if eds is None:
            return
        for name in clusters:
            eds.delivery.known.pop(name, None)
        eds.delivery.touched.update(clusters)
        eds.delivery.dirty = True
