"""List-then-watch of one resource kind on one API server, kept in a local store.

Watch semantics, done by hand on the raw responses of kubernetes_asyncio's API
methods (``_preload_content=False``) rather than through its ``Watch`` helper,
whose silent 410 retry could go back in time:

* LIST, remember the list's resourceVersion, then WATCH from it with bookmarks;
* every event and BOOKMARK advances the resourceVersion; a watch that ends
  (server timeout) resumes from it;
* the owner's ``on_change`` hears the store key of the object each event
  added, modified or deleted, and ``None`` ("anything may have changed") after
  a list that changed the store;
* given a ``trim`` (one per kind, in trim.py; as client-go's informer transform
  functions), the store holds every listed object and every ADDED or MODIFIED
  event's object as trim made it: only the fields its consumers read. Changes
  are judged on the trimmed objects: a list whose objects differ from the store
  only in fields nobody reads (a Pod's status, a Node's heartbeat, managedFields)
  reports no change, and an event whose trimmed object equals the stored one
  calls no ``on_change``; rightly so, as nothing that is read has changed;
* an ERROR event with code 410 (Expired/Gone), or a 410 status, means the
  history is gone: RELIST, replace the store (the keys that vanished during the
  gap are deletions, reported with everything else as ``None``), never going
  back to an older resourceVersion;
* a watch that delivers nothing (not even a bookmark) for ``idle_timeout`` is
  treated as hung and restarted;
* a 429 TooManyRequests (a real kube-apiserver answers it while its storage for a
  kind is (re)initializing: after a restart, for a newly installed CRD) is a healthy
  server asking to wait: the reflector tells its owner (``on_wait``, not a failure),
  sleeps for the answer's Retry-After (1 s if absent, at most ``backoff_max``) and
  retries without growing its backoff;
* any other failure retries with jittered exponential backoff; the reflector
  reports each failure and each recovery to its owner; ``wake()`` cuts a backoff
  short (its owner calls it when the server is answering again);
* timeouts use ``asyncio.timeout``, not ``asyncio.wait_for``: on Python 3.11,
  wait_for swallows a cancellation that arrives when the awaited line is already
  there (a bookmark), and the reflector would outlive its cancelled watcher.

A reflector given its member ``cluster`` counts its watch events, relists and failures in the
isthmus_member_cluster_* metrics (by cluster and kind); the home cluster's reflectors (Secrets,
the configuration API) are not counted there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from isthmus import metrics

log = logging.getLogger(__name__)

Obj = dict[str, Any]
ListFn = Callable[..., Awaitable[Any]]
OnChange = Callable[[Collection[str] | None], None]  # the changed store keys; None: all of them


class Gone(Exception):
    """The resourceVersion is too old: relist."""


class WatchError(Exception):
    """The API server sent an ERROR event other than 410."""


class HttpStatusError(Exception):
    """A non-2xx answer to a LIST or WATCH (401, 403, 404, 500, ...); ``status`` as in ApiException."""

    def __init__(self, status: int, reason: str, retry_after: str | None = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = {"Retry-After": retry_after} if retry_after else {}


def retry_after(exc: BaseException, default: float, most: float) -> float:
    """The seconds a 429 answer asks to wait (its Retry-After header), within [0.1, ``most``]."""
    headers = getattr(exc, "headers", None) or {}
    try:
        seconds = float(headers.get("Retry-After", default))
    except (TypeError, ValueError):
        seconds = default
    return min(max(seconds, 0.1), most)


async def _check(response: Any) -> None:
    status = int(getattr(response, "status", 200))
    if status < 300:
        return
    try:
        text = await response.text()
        reason = str(json.loads(text).get("message", text))[:300]
    except Exception:
        reason = getattr(response, "reason", "") or "error"
    finally:
        response.release()
    headers = getattr(response, "headers", None) or {}
    raise HttpStatusError(status, reason, headers.get("Retry-After"))


@dataclass(frozen=True, slots=True)
class Timing:
    watch_timeout: int = 300  # seconds; the server ends each watch after this
    idle_timeout: float = 120.0  # no event nor bookmark for this long: the watch is hung
    request_timeout: float = 30.0  # LIST and connection timeout
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    probe_interval: float = 1.0  # while unreachable, the owner asks the server this often if it is back


def object_key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace")
    return f"{namespace}/{meta.get('name')}" if namespace else str(meta.get("name"))


class Reflector:
    """Keeps ``store`` equal to the server's objects of one kind; calls ``on_change`` after each change."""

    def __init__(
        self,
        kind: str,
        list_fn: ListFn,
        on_change: OnChange,
        on_error: Callable[[str, BaseException], None] | None = None,
        on_ok: Callable[[str], None] | None = None,
        timing: Timing | None = None,
        on_wait: Callable[[str, BaseException], None] | None = None,
        cluster: str | None = None,
        trim: Callable[[Obj], Obj] | None = None,
    ) -> None:
        self.kind = kind
        self._trim = trim
        self._list_fn = list_fn
        self._on_change = on_change
        self._on_error = on_error
        self._on_ok = on_ok
        self._on_wait = on_wait
        self._wake = asyncio.Event()
        self.timing = timing or Timing()
        self.store: dict[str, Obj] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()
        self.relists = 0
        self.heard: float | None = None  # when the API server last answered: a list, an event, a bookmark
        self.events = 0
        self.bookmarks = 0
        self.backing_off = False
        self.last_error: BaseException | None = None
        self._counted = cluster is not None  # in the member cluster metrics
        if cluster is not None:
            self._events_total = metrics.WATCH_EVENTS.labels(cluster, kind)
            self._relists_total = metrics.RELISTS.labels(cluster, kind)
            self._errors_total = metrics.WATCH_ERRORS.labels(cluster, kind)

    def wake(self) -> None:
        """Retry now if backing off (the server is known to answer again)."""
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        self.backing_off = True
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._wake.wait()
        finally:
            self.backing_off = False

    async def run(self) -> None:
        delay = self.timing.backoff_initial
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                await self._watch()
                delay = self.timing.backoff_initial
            except asyncio.CancelledError:
                raise
            except Gone:
                log.info("%s: resourceVersion %s expired; relisting", self.kind, self.resource_version)
                need_list = True
            except Exception as exc:
                status = getattr(exc, "status", None)
                if status == 410:  # ApiException for a 410 response
                    need_list = True
                    continue
                if status == 429:
                    wait = retry_after(exc, 1.0, self.timing.backoff_max)
                    if self._on_wait is not None:
                        self._on_wait(self.kind, exc)
                    log.debug("%s: %s; retrying in %.1fs as asked", self.kind, exc, wait)
                    await asyncio.sleep(wait)  # the server's word, not cut short by wake()
                    continue
                self.last_error = exc
                if self._counted:
                    self._errors_total.inc()
                if self._on_error is not None:
                    self._on_error(self.kind, exc)
                log.debug("%s: %r; retrying in %.1fs", self.kind, exc, delay)
                await self._sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.timing.backoff_max)
                # A failure of unknown kind may hide a gap: the next attempt resumes the watch from
                # the last resourceVersion, and a 410 from there relists.
                need_list = need_list or not self.resource_version

    async def _list(self) -> None:
        response = await self._list_fn(_preload_content=False, _request_timeout=self.timing.request_timeout)
        await _check(response)
        try:
            async with asyncio.timeout(self.timing.request_timeout):
                body = await response.json()
        finally:
            response.release()
        version = str((body.get("metadata") or {}).get("resourceVersion", ""))
        items = body.get("items") or []
        trim = self._trim
        fresh: dict[str, Obj] = {}
        for i, obj in enumerate(items):
            if trim is not None:
                items[i] = None  # the whole object goes as soon as its trimmed copy is made
                fresh[object_key(obj)] = trim(obj)
            else:
                fresh[object_key(obj)] = obj
        changed = fresh != self.store  # trimmed objects: a change of unread fields is none
        self.store = fresh  # objects missing from the list were deleted during the gap
        self.resource_version = version
        if self._counted and self.relists:
            self._relists_total.inc()
        self.relists += 1
        self.heard = time.time()
        self.synced.set()
        if self._on_ok is not None:
            self._on_ok(self.kind)
        if changed:
            self._on_change(None)

    async def _watch(self) -> None:
        response = await self._list_fn(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.timing.watch_timeout,
            _preload_content=False,
            _request_timeout=(self.timing.request_timeout, self.timing.idle_timeout),  # (connect, read)
        )
        await _check(response)
        try:
            if self._on_ok is not None:
                self._on_ok(self.kind)
            while True:
                try:
                    async with asyncio.timeout(self.timing.idle_timeout):
                        line = await response.content.readline()
                except TimeoutError:
                    raise WatchError(f"no event or bookmark for {self.timing.idle_timeout:.0f}s") from None
                if not line:
                    return  # the server ended the watch (timeoutSeconds): resume from resource_version
                if line.strip():
                    self.heard = time.time()
                    self._apply(json.loads(line))
        finally:
            response.release()

    def _apply(self, event: Obj) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone(obj.get("message", "expired"))
            raise WatchError(f"{obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        version = str((obj.get("metadata") or {}).get("resourceVersion", ""))
        if version:
            self.resource_version = version
        if kind == "BOOKMARK":
            self.bookmarks += 1
            return
        self.events += 1
        if self._counted:
            self._events_total.inc()
        key = object_key(obj)
        if kind == "DELETED":
            self.store.pop(key, None)
        elif kind in ("ADDED", "MODIFIED"):
            kept = self._trim(obj) if self._trim is not None else obj
            if self.store.get(key) == kept:
                return  # only fields nobody reads changed
            self.store[key] = kept
        else:
            return
        self._on_change((key,))
