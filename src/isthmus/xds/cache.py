"""The resource cache: current MeshView, memoized generation, shared serialized resources.

The cache owns versions; the server owns only the protocol. For each
(type URL, Proxy.for_type(type URL)) it generates once per mesh version, serializes each
resource once, and interns the result by content hash so that identical
resources generated for different proxy groups share one Resource (one set of
bytes). A ResourceSet whose contents did not change keeps its identity across
mesh versions, which lets a stream skip an unchanged type with one ``is`` test;
one that changed carries its diff from the set before it. A new view regenerates
only the types whose declared inputs (generate.INPUTS) changed.

Streams follow topics, one per (type URL, Proxy.for_type(type URL)) they subscribe to. On every
change the cache brings each followed topic's set up to date and tells only the followers of the
topics whose set changed, naming the type: an endpoint change in one cluster wakes the proxies that
receive different endpoints, and they look at EDS only.

With a mesh CA, generators also get the trust domain and bundle, and SDS the
proxy's own certificate (issued on first use); ``rotate_certificates`` renews
those that are due and regenerates SDS only.

For the convergence metric the cache remembers, per generation that installed a view, when the
discovery event behind that view happened (``aggregate.published_event``; views installed
directly, by tests, have none): ``event_since`` gives a stream the earliest one it has not yet
converged to. Each generation of a type for a proxy group is timed
(isthmus_mesh_view_generation_seconds).
"""

from __future__ import annotations

import asyncio
import bisect
import datetime
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from isthmus import metrics
from isthmus.discovery.aggregate import published_event
from isthmus.discovery.model import MeshView, Service, ServiceKey
from isthmus.xds import types
from isthmus.xds.ca import MeshCA
from isthmus.xds.generate import GENERATORS, INPUTS, PARTS, PER_SERVICE, Generator, placeholder
from isthmus.xds.generate.identity import PLAINTEXT, MeshIdentity
from isthmus.xds.proxy import Proxy, Role
from isthmus.xds.resources import Resource, state_version

log = logging.getLogger(__name__)

HISTORY = 8  # sets a ResourceSet's diff reaches back
SMALL_STEP = 0.25  # of a set's names, the most a diff across sets holds
EVENTS_KEPT = 1024  # discovery events remembered for convergence (a stream further behind undercounts)


@dataclass(frozen=True, slots=True, eq=False)
class ResourceSet(Mapping[str, Resource]):
    """All resources of one type for one proxy group, by name, with a version for the whole set.

    A set generated after another one for the same proxies says what differs from it: ``base`` is
    that set's version, ``changed`` the names added or changed, ``removed`` the names gone. A stream
    that planned against ``base`` looks at these names only, not at every name it subscribes to.
    ``history`` goes further back, so that a stream some sets behind (still waiting for an ACK
    when the views came) does the same: the versions of up to HISTORY sets before, newest first,
    each with the names changed or removed since, as long as those are few (SMALL_STEP of the set).
    """

    type_url: str
    by_name: Mapping[str, Resource]
    version: str
    base: str = ""
    changed: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()
    history: tuple[tuple[str, frozenset[str]], ...] = ()

    @classmethod
    def after(cls, type_url: str, by_name: dict[str, Resource], previous: ResourceSet | None) -> ResourceSet:
        """The set of ``by_name``; ``previous`` itself if the contents are the same, else diffed from it."""
        version = state_version(by_name.values())
        if previous is None:
            return cls(type_url, MappingProxyType(by_name), version)
        if version == previous.version and by_name.keys() == previous.by_name.keys():
            return previous
        old = previous.by_name
        # Identical bytes are one interned Resource, so identity tells what changed.
        changed = frozenset(n for n, r in by_name.items() if old.get(n) is not r)
        removed = frozenset(n for n in old if n not in by_name)
        step = changed | removed
        history: list[tuple[str, frozenset[str]]] = [(previous.version, step)]
        small = max(len(by_name), len(old)) * SMALL_STEP
        for older, names in previous.history[: HISTORY - 1]:
            names = names | step
            if len(names) > small:
                break  # planning every name costs about as much
            history.append((older, names))
        return cls(
            type_url, MappingProxyType(by_name), version, previous.version, changed, removed, tuple(history)
        )

    def touched_since(self, version: str) -> frozenset[str] | None:
        """The names changed or removed since the set of ``version``; None if it is not known."""
        for older, names in self.history:
            if older == version:
                return names
        return None

    def __getitem__(self, name: str) -> Resource:
        return self.by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.by_name)

    def __len__(self) -> int:
        return len(self.by_name)


@dataclass(frozen=True, slots=True)
class _Change:
    """How the current view differs from the one before: services whose content changed (by key),
    and which type groups (INPUTS keys) read nothing that changed."""

    before: MeshView
    keys: frozenset[ServiceKey]
    unaffected: frozenset[str]


Notify = Callable[[str], None]  # called with the type URL of a followed topic whose set changed


@dataclass(slots=True, eq=False)
class _Topic:
    """One (type URL, proxy group) that streams follow: its set as last published, and who follows."""

    current: ResourceSet | None  # None: not generated yet (the cache is held)
    followers: set[Notify] = field(default_factory=set)


# Every group the cache generates (a type URL, or a part of one) -> its type URL.
_TYPE_OF: Mapping[str, str] = {
    **{type_url: type_url for type_url in GENERATORS},
    **{group: type_url for type_url, parts in PARTS.items() for group, _ in parts},
}


def _with_rules(by_key: Mapping[Any, tuple[Any, ...]]) -> list[tuple[Any, list[tuple[Any, Any]]]]:
    """Routes or policies by key, with their rules: the model's equality leaves ``rules`` out (so
    that they sort), and a route or policy edited in place differs in its rules only."""
    return [(key, [(item, item.rules) for item in items]) for key, items in by_key.items()]


def _change(before: MeshView, after: MeshView) -> _Change:
    old, new = before.services, after.services
    keys = [k for k, s in new.items() if (o := old.get(k)) is not s and (o is None or o.digest != s.digest)]
    keys += [k for k in old if k not in new]
    routes_changed = _with_rules(before.routes) != _with_rules(after.routes)
    policies_changed = _with_rules(before.policies) != _with_rules(after.policies)
    unaffected = frozenset(
        group
        for group, inputs in INPUTS.items()
        if not (inputs.routes and routes_changed)
        and not (inputs.policies and policies_changed)
        and all(inputs.service(old.get(k)) == inputs.service(new.get(k)) for k in keys)
    )
    return _Change(before, frozenset(keys), unaffected)


class ConfigCache:
    """Generates, serializes and shares resources; tells the followers of a topic when its set changed."""

    def __init__(
        self,
        view: MeshView | None = None,
        generators: Mapping[str, Generator] | None = None,
        ca: MeshCA | None = None,
    ) -> None:
        self._generators = dict(generators if generators is not None else GENERATORS)
        self.ca = ca
        self._identity = ca.identity() if ca is not None else PLAINTEXT
        self._view = view if view is not None else MeshView.build((), ())
        self._generation = 0
        self._memo: dict[tuple[str, Proxy], ResourceSet] = {}
        self._previous: dict[tuple[str, Proxy], ResourceSet] = {}
        self._merged: dict[tuple[str, Proxy], tuple[tuple[ResourceSet, ...], ResourceSet]] = {}
        # Per group, for types generated service by service: (context, {service: (Service, resources)}).
        self._services: dict[
            tuple[str, Proxy], tuple[Any, dict[ServiceKey, tuple[Service, dict[str, Resource]]]]
        ] = {}
        self._merged_before: dict[tuple[str, Proxy], tuple[tuple[ResourceSet, ...], ResourceSet]] = {}
        self._interned: weakref.WeakValueDictionary[tuple[str, str, str], Resource] = (
            weakref.WeakValueDictionary()
        )
        self._topics: dict[tuple[str, Proxy], _Topic] = {}
        self.serving = True  # False (hold): streams answer nothing until serve()
        self._change: _Change | None = None  # since the last view; None: regenerate everything
        self.serializations = 0  # resources serialized, for tests and metrics
        # Generations that installed a view with a known discovery event, and those events'
        # time.monotonic() (both ascending; the last EVENTS_KEPT).
        self._event_generations: list[int] = []
        self._event_times: list[float] = []

    @property
    def view(self) -> MeshView:
        return self._view

    @property
    def generation(self) -> int:
        """Increments on every effective change; streams compare it to skip idle wakeups."""
        return self._generation

    def type_urls(self) -> frozenset[str]:
        return frozenset(self._generators)

    def set_view(self, view: MeshView) -> bool:
        """Install a new MeshView. Returns False (and wakes nobody) when nothing changed."""
        if view.version and view.version == self._view.version:
            return False
        self._change = _change(self._view, view)
        self._view = view
        self._bump()
        event = published_event()
        if event is not None:
            if len(self._event_generations) >= EVENTS_KEPT:
                del self._event_generations[: EVENTS_KEPT // 2], self._event_times[: EVENTS_KEPT // 2]
            self._event_generations.append(self._generation)
            self._event_times.append(event)
        metrics.MESH_VIEWS.inc()
        metrics.MESH_VIEW_INFO.clear()
        metrics.MESH_VIEW_INFO.labels(view.version).set(1)
        return True

    def event_since(self, after: int, upto: int) -> float | None:
        """The time (time.monotonic()) of the earliest discovery event behind the views installed
        at generations after ``after`` up to ``upto``; None if none of them had one."""
        i = bisect.bisect_right(self._event_generations, after)
        if i < len(self._event_generations) and self._event_generations[i] <= upto:
            return self._event_times[i]
        return None

    def invalidate(self) -> None:
        """Regenerate everything (used when generators' inputs change outside the view)."""
        self._change = None
        self._bump()

    def _bump(self, only: str | None = None) -> None:
        """Forget generated sets (of type ``only``, or all; a new view keeps those it left as they
        were) and tell the followers of every topic whose set changed."""
        self._generation += 1
        if only is None:
            self._previous, self._merged_before = self._memo, self._merged
            self._memo = {key: s for key, s in self._memo.items() if self._kept(*key)}
            # Unions of parts: those whose parts are all kept stay; the others are kept one more
            # generation, for identity only.
            self._merged = {key: m for key, m in self._merged.items() if self._parts_kept(key[1], m[0])}
        else:
            for key in [k for k in self._memo if _TYPE_OF.get(k[0]) == only]:
                self._previous[key] = self._memo.pop(key)
            for key in [k for k in self._merged if k[0] == only]:
                self._merged_before[key] = self._merged.pop(key)
            if self._change is not None:  # what changed is outside the view: regenerate ``only``
                self._change = replace(self._change, unaffected=self._change.unaffected - {only})
        self._publish(only)

    def _kept(self, group: str, proxy: Proxy) -> bool:
        """Whether the set of ``group`` for ``proxy`` of the last generation is still current."""
        type_url = _TYPE_OF.get(group)
        standard = type_url is not None and self._generators.get(type_url) is GENERATORS.get(type_url)
        return standard and self._unaffected(group, proxy)

    def _parts_kept(self, proxy: Proxy, sets: tuple[ResourceSet, ...]) -> bool:
        parts = PARTS.get(sets[0].type_url, ()) if sets else ()
        return len(parts) == len(sets) and all(
            self._memo.get((group, proxy.for_type(group))) is part
            for (group, _), part in zip(parts, sets, strict=True)
        )

    def _publish(self, only: str | None) -> None:
        if not self.serving:
            return  # the views are partial: nothing is generated for them (serve() publishes)
        for (type_url, group), topic in self._topics.items():
            if only is not None and type_url != only:
                continue
            current = self.resources(type_url, group)
            before = topic.current if topic.current is not None else self._before(type_url, group)
            topic.current = current
            if current is not before:
                for notify in topic.followers:
                    notify(type_url)

    def _before(self, type_url: str, group: Proxy) -> ResourceSet | None:
        """The set of ``type_url`` for ``group`` of the generation before this one, if its streams
        asked for one (a topic not published since serve() was handed that, or nothing yet)."""
        if self._generators[type_url] is GENERATORS.get(type_url) and PARTS.get(type_url):
            known = self._merged_before.get((type_url, group))
            return known[1] if known is not None else None
        return self._previous.get((type_url, group))

    def use_ca(self, ca: MeshCA) -> None:
        """Turn mTLS on with this CA (at startup): every type is regenerated."""
        self.ca = ca
        self._identity = ca.identity()
        self._change = None
        self._bump()

    def rotate_certificates(self) -> int:
        """Renew the workload certificates that are due; push SDS to the proxies that hold them."""
        if self.ca is None:
            return 0
        rotated = self.ca.rotate_due()
        if rotated:
            self._bump(only=types.SECRET)
        return len(rotated)

    async def renew_certificates(self, cert_ttl: float) -> None:
        """Forever: renew workload certificates when due (at half their lifetime). Certificates
        issued while this sleeps are due no sooner than half a lifetime later, so checking at
        least every quarter lifetime (and every 30 s) is on time."""
        longest = min(30.0, cert_ttl / 4)
        while True:
            due = self.ca.next_rotation() if self.ca is not None else None
            wait = longest if due is None else (due - datetime.datetime.now(datetime.UTC)).total_seconds()
            await asyncio.sleep(min(max(wait, 0.5), longest))
            self.rotate_certificates()

    def _identity_for(self, type_url: str, proxy: Proxy) -> MeshIdentity:
        if self.ca is not None and type_url == types.SECRET and proxy.role is Role.SIDECAR:
            return self.ca.identity(self.ca.certificate(proxy.namespace, proxy.service_account))
        return self._identity

    def hold(self) -> None:
        """Streams answer nothing until ``serve()``: the views so far are partial (a restarted
        control plane whose member clusters have not all synced would send proxies a mesh without
        them, and they would apply it)."""
        self.serving = False

    def serve(self) -> None:
        """Streams answer from now on: every one is told its types changed."""
        if self.serving:
            return
        self.serving = True
        # Each stream generates what it needs when it plans (not all at once here, on the event
        # loop); a topic is published from the next view on.
        for (type_url, _), topic in self._topics.items():
            for notify in list(topic.followers):
                notify(type_url)

    def follow(self, type_url: str, proxy: Proxy, notify: Notify) -> None:
        """Call ``notify(type_url)`` whenever the resources of ``type_url`` for ``proxy`` change,
        until ``unfollow``. Proxies of one group (Proxy.for_type) share one topic."""
        key = (type_url, proxy.for_type(type_url))
        topic = self._topics.get(key)
        if topic is None:
            current = self.resources(type_url, key[1]) if self.serving else None
            topic = self._topics[key] = _Topic(current)
        topic.followers.add(notify)

    def unfollow(self, type_url: str, proxy: Proxy, notify: Notify) -> None:
        key = (type_url, proxy.for_type(type_url))
        topic = self._topics.get(key)
        if topic is not None:
            topic.followers.discard(notify)
            if not topic.followers:
                del self._topics[key]

    @property
    def topics(self) -> int:
        """Topics followed (distinct (type URL, proxy group) pairs of the connected streams)."""
        return len(self._topics)

    def _intern(self, type_url: str, name: str, body: bytes) -> Resource:
        candidate = Resource.from_bytes(type_url, name, body)
        key = (type_url, name, candidate.version)
        existing = self._interned.get(key)
        if existing is not None:
            return existing
        self._interned[key] = candidate
        return candidate

    def resources(self, type_url: str, proxy: Proxy) -> ResourceSet:
        """The resources of ``type_url`` for ``proxy`` at the current mesh version."""
        generator = self._generators[type_url]
        parts = PARTS.get(type_url) if generator is GENERATORS.get(type_url) else None
        if not parts:
            return self._generate(type_url, type_url, generator, proxy)
        # Generated in parts, each shared by its own group; the union is kept per proxy group and
        # rebuilt only when a part changed (parts keep their identity when their contents do).
        key = (type_url, proxy.for_type(type_url))
        current = self._merged.get(key)
        if current is not None:  # made (or kept) in this generation
            return current[1]
        sets = tuple(self._generate(name, type_url, part, proxy) for name, part in parts)
        known = self._merged_before.get(key)
        if known is not None and all(a is b for a, b in zip(known[0], sets, strict=True)):
            self._merged[key] = known
            return known[1]
        by_name: dict[str, Resource] = {}
        for part_set in sets:
            by_name.update(part_set.by_name)
        result = ResourceSet.after(type_url, by_name, known[1] if known is not None else None)
        self._merged[key] = (sets, result)
        return result

    def _unaffected(self, group: str, proxy: Proxy) -> bool:
        """Whether the last view change left the resources of ``group`` for ``proxy`` as they were."""
        change, inputs = self._change, INPUTS.get(group)
        if change is None or inputs is None or group not in change.unaffected:
            return False
        if inputs.own is None:
            return True
        own = ServiceKey(proxy.namespace, proxy.service)
        if own not in change.keys:
            return True
        return inputs.own(change.before.services.get(own), proxy) == inputs.own(
            self._view.services.get(own), proxy
        )

    def _generate(self, group: str, type_url: str, generator: Generator, proxy: Proxy) -> ResourceSet:
        """One generation for the proxies of ``proxy.for_type(group)``, memoized per mesh version."""
        shared = proxy.for_type(group)  # proxies that get identical resources share one generation
        key = (group, shared)
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        previous = self._previous.get(key)
        standard = self._generators[type_url] is GENERATORS.get(type_url)
        if previous is not None and standard and self._unaffected(group, shared):
            self._memo[key] = previous
            return previous
        started = time.perf_counter()
        try:
            identity = self._identity_for(type_url, proxy)
            per_service = PER_SERVICE.get(type_url) if generator is GENERATORS.get(type_url) else None
            if per_service is not None:
                by_name = self._by_service(key, type_url, shared, identity, *per_service)
            else:
                by_name = {}
                for name, message in generator(self._view, shared, identity).items():
                    by_name[name] = self._serialize(type_url, name, message)
        except Exception:
            # A generator bug must not take streams down: keep serving the last good set.
            log.exception("generator for %s failed for proxies like %s", group, proxy.node_id or shared)
            if previous is not None:
                self._memo[key] = previous
                return previous
            by_name = {}
        result = ResourceSet.after(type_url, by_name, previous)
        self._memo[key] = result
        metrics.xds_type(types.short(type_url)).generation.observe(time.perf_counter() - started)
        return result

    def _serialize(self, type_url: str, name: str, message: Any) -> Resource:
        self.serializations += 1
        return self._intern(type_url, name, message.SerializeToString(deterministic=True))

    def _by_service(
        self,
        key: tuple[str, Proxy],
        type_url: str,
        proxy: Proxy,
        identity: MeshIdentity,
        context: Callable[..., Any],
        for_service: Callable[..., Mapping[str, Any]],
    ) -> dict[str, Resource]:
        """Generate service by service, reusing the resources of every service whose Service object
        is the one generated last time, as long as the context (the rest of the view) is equal."""
        ctx = context(self._view, proxy, identity)
        known_ctx, known = self._services.get(key, (None, {}))
        reusable = known if known_ctx == ctx else {}
        table: dict[ServiceKey, tuple[Service, dict[str, Resource]]] = {}
        by_name: dict[str, Resource] = {}
        for service in self._view.services.values():
            hit = reusable.get(service.key)
            if hit is None or hit[0] is not service:
                messages = for_service(service, proxy, ctx)
                hit = (service, {n: self._serialize(type_url, n, m) for n, m in messages.items()})
            table[service.key] = hit
            by_name.update(hit[1])
        self._services[key] = (ctx, table)
        return by_name

    def placeholder(self, type_url: str, name: str) -> Resource:
        """The empty resource answering a request for an EDS/RDS name that does not exist."""
        key = (type_url, name, "placeholder")
        existing = self._interned.get(key)
        if existing is not None:
            return existing
        message = placeholder(type_url, name)
        resource = Resource.from_message(type_url, name, message)
        self._interned[key] = resource
        return resource
