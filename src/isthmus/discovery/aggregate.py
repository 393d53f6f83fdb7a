"""The aggregate: endpoint shards per (source, member cluster), merged and debounced into MeshViews.

Every source (the file source, one Kubernetes watcher per member cluster) owns
shards keyed by (source, cluster) and replaces a whole shard at a time; a removed
cluster drops its shards. Changes are debounced (at once after a quiet period, else once quiet
again, bounded by a maximum delay) into one immutable MeshView; a flush that changes nothing produces
no new version, because MeshView versions are content hashes.

Services merge by namespace/name across shards ("namespace sameness"): the port
list of the oldest export wins (MCS), between equals the first cluster's by name; the
endpoints of every shard are concatenated, each keeping its own locality; so are
the ClusterIPs each cluster gives it. Every merged service gets its clusterset IP
(discovery.clusterset) from the set of service keys.

``merge`` does this for a whole set of shards (the reference). The Aggregator does
it incrementally: replacing a shard notes the services whose ports or endpoints
differ from the old shard's (by identity first, then equality: sources reuse the
tuples of unchanged services), and a flush re-merges only those, keeping the other
Service objects (and their digests) of the previous view.

For the convergence metric, the Aggregator notes when the first change of each debounced batch
reached it (time.monotonic(), whatever its own clock), and ``published_event()`` returns it while
``on_view`` runs for the view of that batch. At each flush it sets the member cluster gauges
(isthmus_member_cluster_state, isthmus_member_cluster_weight_ratio) of the clusters that changed.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

from isthmus import metrics
from isthmus.discovery import clusterset
from isthmus.discovery.model import (
    FULL_WEIGHT,
    AuthorizationPolicy,
    ClusterAddresses,
    Endpoint,
    MemberCluster,
    MeshView,
    Service,
    ServiceKey,
    ServicePort,
    ServiceRoute,
    TrafficSplit,
)

log = logging.getLogger(__name__)

ShardKey = tuple[str, str]  # (source, member cluster)
WITHDRAWN = "withdrawn"  # isthmus_member_cluster_state of a cluster whose endpoints are withdrawn

_event: contextvars.ContextVar[float | None] = contextvars.ContextVar("isthmus_view_event", default=None)


def published_event() -> float | None:
    """Inside an Aggregator's ``on_view``: when (time.monotonic()) the first change behind the view
    being published reached the aggregate; None elsewhere (a view not published by an Aggregator)."""
    return _event.get()


K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Shard:
    """Everything one source knows about one member cluster."""

    cluster: MemberCluster
    services: Mapping[ServiceKey, tuple[ServicePort, ...]] = field(default_factory=dict)
    endpoints: Mapping[ServiceKey, tuple[Endpoint, ...]] = field(default_factory=dict)
    splits: tuple[TrafficSplit, ...] = ()
    # GAMMA routes (HTTPRoute, GRPCRoute) read in this cluster, attached to services of the mesh.
    routes: tuple[ServiceRoute, ...] = ()
    # Authorization policies read in this cluster (AuthorizationPolicy, SMI TrafficTarget), each
    # with its creationTimestamp (RFC 3339) for conflicts across clusters.
    policies: tuple[tuple[AuthorizationPolicy, str], ...] = ()
    # The ClusterIPs of the services this cluster's API server defines (a headless one: none).
    addresses: Mapping[ServiceKey, tuple[str, ...]] = field(default_factory=dict)
    # When each service was exported here (RFC 3339; its ServiceExport's creation, else its Service's).
    exported_at: Mapping[ServiceKey, str] = field(default_factory=dict)
    # The cluster's endpoints are withdrawn (unreachable past the policy's withdraw_after): for the
    # state metric; the shard is then empty anyway.
    withdrawn: bool = False


def merge_splits(shards: Iterable[Shard]) -> list[TrafficSplit]:
    """TrafficSplits of every shard; for one root service, the first cluster (by name) wins."""
    out: dict[ServiceKey, TrafficSplit] = {}
    for shard in sorted(shards, key=lambda s: s.cluster.name):
        for split in shard.splits:
            out.setdefault(split.service, split)
    return list(out.values())


def merge_routes(shards: Iterable[Shard]) -> list[ServiceRoute]:
    """The routes of every shard; a route (kind, namespace, name) read in several clusters is one
    route: the oldest wins (creationTimestamp), then the first cluster by name (the Gateway API's
    conflict rule, with the clusters as one)."""
    chosen: dict[tuple[str, str, str], tuple[tuple[str, str], list[ServiceRoute]]] = {}
    for shard in shards:
        by_object: dict[tuple[str, str, str], list[ServiceRoute]] = {}
        for route in shard.routes:
            by_object.setdefault((route.kind, route.namespace, route.name), []).append(route)
        for key, routes in by_object.items():
            rank = (routes[0].created or NEVER, shard.cluster.name)
            if key not in chosen or rank < chosen[key][0]:
                chosen[key] = (rank, routes)
    return [route for _, routes in chosen.values() for route in routes]


def merge_policies(shards: Iterable[Shard]) -> list[AuthorizationPolicy]:
    """The policies of every shard; one (kind, namespace, name) read in several clusters is one
    policy: the oldest wins, then the first cluster by name (as routes)."""
    chosen: dict[tuple[str, str, str], tuple[tuple[str, str], AuthorizationPolicy]] = {}
    for shard in shards:
        for policy, created in shard.policies:
            key, rank = (policy.kind, policy.namespace, policy.name), (created or NEVER, shard.cluster.name)
            if key not in chosen or rank < chosen[key][0]:
                chosen[key] = (rank, policy)
    return [policy for _, policy in chosen.values()]


def merge(
    shards: Iterable[Shard],
    extra_clusters: Iterable[MemberCluster] = (),
    clusterset_range: clusterset.Network = clusterset.DEFAULT_NETWORK,
) -> MeshView:
    """Merge shards into one MeshView (pure)."""
    clusters: dict[str, MemberCluster] = {c.name: c for c in extra_clusters}
    all_shards = sorted(shards, key=lambda s: s.cluster.name)
    for shard in all_shards:
        clusters.setdefault(shard.cluster.name, shard.cluster)
    keys = {key for shard in all_shards for key in shard.services}
    vips = clusterset.allocate(keys, clusterset_range)
    services = [merge_service(key, all_shards, vips.get(key, "")) for key in keys]
    return MeshView.build(
        [s for s in services if s is not None],
        [c for c in clusters.values() if c.name],
        merge_splits(all_shards),
        merge_routes(all_shards),
        merge_policies(all_shards),
    )


NEVER = "~"  # exported_at of a service with no timestamp: after every RFC 3339 time


def merge_service(key: ServiceKey, shards: Iterable[Shard], vip: str = "") -> Service | None:
    """Merge one service across shards given in merge order (by cluster name); None if none defines
    it. Its ports are the oldest export's (MCS: the oldest ServiceExport wins a conflict), between
    equals (or without times: the file source) the first cluster's by name."""
    ports: tuple[ServicePort, ...] | None = None
    oldest = ""
    endpoints: list[Endpoint] = []
    addresses: ClusterAddresses = ()
    for shard in shards:
        ips = shard.addresses.get(key)
        if ips is not None:
            addresses += ((shard.cluster.name, ips),)
        shard_ports = shard.services.get(key)
        if shard_ports is not None:
            since = shard.exported_at.get(key, NEVER)
            if ports is None or since < oldest:
                ports, oldest = shard_ports, since
            elif shard_ports != ports:
                log.debug(
                    "service %s: ports differ in cluster %s; keeping the oldest", key, shard.cluster.name
                )
        endpoints.extend(shard.endpoints.get(key, ()))
    return (
        None
        if ports is None
        else Service(key, ports, tuple(sorted(endpoints)), tuple(sorted(addresses)), vip)
    )


def changed_keys(old: Mapping[K, V], new: Mapping[K, V]) -> Iterator[K]:
    """Keys whose values differ between two mappings (identity checked first: it is the common case)."""
    if old is new:
        return
    for key, value in new.items():
        before = old.get(key)
        if before is not value and before != value:
            yield key
    for key in old:
        if key not in new:
            yield key


def shard_changes(old: Shard | None, new: Shard | None) -> set[ServiceKey]:
    """The services whose merge may differ after replacing ``old`` by ``new`` (either may be absent)."""
    empty = Shard(MemberCluster(""))
    old, new = old if old is not None else empty, new if new is not None else empty
    return {
        *changed_keys(old.services, new.services),
        *changed_keys(old.endpoints, new.endpoints),
        *changed_keys(old.addresses, new.addresses),
        *changed_keys(old.exported_at, new.exported_at),
    }


def gamma_routes(view: MeshView) -> tuple[ServiceRoute, ...]:
    """The view's routes that came as routes (not its TrafficSplits, which it holds as read)."""
    return tuple(r for routes in view.routes.values() for r in routes if r.kind != "TrafficSplit")


def shards_of_view(view: MeshView) -> list[Shard]:
    """Split a whole MeshView (the file source's) into one shard per member cluster.

    A service is declared in every shard (its ports), its endpoints only in their own cluster's;
    with no cluster declared, everything goes to one shard of an unnamed cluster.
    """
    members = list(view.clusters.values()) or [MemberCluster("")]
    out = []
    for member in members:
        ports = {key: s.ports for key, s in view.services.items()}
        eps = {
            key: tuple(e for e in s.endpoints if e.locality.cluster == member.name or len(members) == 1)
            for key, s in view.services.items()
        }
        first = member is members[0]
        splits = tuple(view.splits.values()) if first else ()
        routes = gamma_routes(view) if first else ()
        policies = tuple((p, "") for ps in view.policies.values() for p in ps) if first else ()
        here = member.name
        ips = {key: s.addresses_in(here) for key, s in view.services.items() if s.defined_in(here)}
        endpoints = {k: v for k, v in eps.items() if v}
        out.append(Shard(member, ports, endpoints, splits, routes, policies, ips))
    return out


class Aggregator:
    """Holds the shards and publishes debounced MeshViews to ``on_view``, merging incrementally."""

    def __init__(
        self,
        on_view: Callable[[MeshView], None],
        quiet: float = 0.1,
        max_delay: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        clusterset_range: clusterset.Network = clusterset.DEFAULT_NETWORK,
    ) -> None:
        self.on_view = on_view
        self._range = clusterset_range
        self._reallocate = False  # the range changed: every clusterset IP is chosen again
        self._vips: dict[ServiceKey, str] = {}
        self.quiet = quiet
        self.max_delay = max_delay
        self._clock = clock
        self._shards: dict[ShardKey, Shard] = {}
        self._services: dict[ServiceKey, Service] = {}  # merged, in key order
        self._stale: set[ServiceKey] = set()  # to re-merge at the next flush
        self._dirty = asyncio.Event()
        self._first_change: float | None = None
        self._first_event: float | None = None  # the same moment by time.monotonic() (metrics)
        self._last_change = 0.0
        self._last_flush = float("-inf")  # when the last flush ended (the leading edge's reference)
        self._gauges: dict[str, tuple[str, float]] = {}  # cluster -> (state, weight ratio) set
        self.version = ""
        self._gateways_down: frozenset[str] = frozenset()
        self._weights: dict[str, int] = {}
        self.flushes = 0

    @property
    def shards(self) -> Mapping[ShardKey, Shard]:
        return dict(self._shards)

    def _put(self, key: ShardKey, shard: Shard | None) -> None:
        """Replace (or with None remove) one shard, noting the services it changes."""
        old = self._shards.pop(key, None) if shard is None else self._shards.get(key)
        if shard is not None:
            self._shards[key] = shard
        self._stale |= shard_changes(old, shard)

    def set_shard(self, source: str, shard: Shard) -> None:
        self._put((source, shard.cluster.name), shard)
        self._changed()

    def update_cluster(self, source: str, cluster: MemberCluster) -> None:
        """Replace a shard's cluster record (its health, gateway) and keep its endpoints."""
        key = (source, cluster.name)
        old = self._shards.get(key)
        self._put(key, replace(old, cluster=cluster) if old is not None else Shard(cluster))
        self._changed()

    def remove_shard(self, source: str, cluster: str) -> None:
        if (source, cluster) in self._shards:
            self._put((source, cluster), None)
            self._changed()

    def set_source(self, source: str, shards: Iterable[Shard]) -> None:
        """Replace every shard of ``source`` (the file source reloads as a whole)."""
        fresh = {(source, shard.cluster.name): shard for shard in shards}
        for key in [k for k in self._shards if k[0] == source and k not in fresh]:
            self._put(key, None)
        for key, shard in fresh.items():
            self._put(key, shard)
        self._changed()

    def remove_source(self, source: str) -> None:
        for key in [k for k in self._shards if k[0] == source]:
            self._put(key, None)
            self._changed()

    def _changed(self) -> None:
        now = self._clock()
        if self._first_change is None:
            self._first_change = now
            self._first_event = time.monotonic()
        self._last_change = now
        self._dirty.set()

    def _remerge(self) -> None:
        """Re-merge the stale services; keep ``_services`` in key order."""
        order = sorted(self._shards.values(), key=lambda s: s.cluster.name)
        added = removed = False
        for key in self._stale:
            service = merge_service(key, order)
            if service is None:
                removed = self._services.pop(key, None) is not None or removed
            else:
                added = added or key not in self._services
                self._services[key] = service
        if added:
            self._services = {key: self._services[key] for key in sorted(self._services)}
        touched: Iterable[ServiceKey] = self._stale
        if added or removed or self._reallocate:  # the set of keys (or the range) changed: addresses move
            self._reallocate = False
            self._vips = clusterset.allocate(self._services, self._range)
            touched = list(self._services)
        for key in touched:
            service = self._services.get(key)
            vip = self._vips.get(key, "")
            if service is not None and service.vip != vip:
                self._services[key] = replace(service, vip=vip)
        self._stale.clear()

    def _clusters(self) -> list[MemberCluster]:
        """One record per named cluster: the first shard's in merge order, as ``merge`` does, with
        the gateways known to be down marked."""
        clusters: dict[str, MemberCluster] = {}
        for shard in sorted(self._shards.values(), key=lambda s: s.cluster.name):
            clusters.setdefault(shard.cluster.name, shard.cluster)
        return [self._overlay(c) for c in clusters.values() if c.name]

    def _overlay(self, cluster: MemberCluster) -> MemberCluster:
        # A readiness every replica sees alike wins over this replica's own view of the streams.
        down = (
            (not cluster.gateway_ready)
            if cluster.gateway_ready is not None
            else cluster.name in self._gateways_down
        )
        weight = self._weights.get(cluster.name, cluster.weight)
        if down == cluster.gateway_down and weight == cluster.weight:
            return cluster
        return replace(cluster, gateway_down=down, weight=weight)

    def set_cluster_weight(self, cluster: str, weight: int) -> None:
        """Drain (or undrain) a member cluster: ``weight`` percent of its normal share (100: normal)."""
        if not 0 <= weight <= FULL_WEIGHT:
            raise ValueError(f"weight {weight} is not a percentage")
        if self._weights.get(cluster, FULL_WEIGHT) != weight:
            if weight == FULL_WEIGHT:
                self._weights.pop(cluster, None)
            else:
                self._weights[cluster] = weight
            self._changed()

    def set_debounce(self, quiet: float, max_delay: float) -> None:
        """Debounce with these from the next event on."""
        self.quiet, self.max_delay = quiet, max_delay

    def set_clusterset_range(self, network: clusterset.Network) -> None:
        """Choose services' clusterset IPs from ``network`` from now on (all of them again)."""
        if network != self._range:
            self._range = network
            self._reallocate = True
            self._changed()

    def set_gateways_down(self, clusters: Iterable[str]) -> None:
        """The member clusters whose east-west gateway is known to be dead (see app.GatewayLiveness)."""
        down = frozenset(clusters)
        if down != self._gateways_down:
            self._gateways_down = down
            self._changed()

    def flush(self) -> MeshView:
        """Build and publish a view now (also used by tests and at startup)."""
        self._first_change = None
        event, self._first_event = self._first_event, None
        self._dirty.clear()
        self._remerge()
        clusters = self._clusters()
        shards = self._shards.values()
        view = MeshView.of(
            self._services, clusters, merge_splits(shards), merge_routes(shards), merge_policies(shards)
        )
        self.flushes += 1
        self._set_gauges(clusters)
        self._last_flush = self._clock()
        if view.version != self.version:
            self.version = view.version
            token = _event.set(event)
            try:
                self.on_view(view)
            finally:
                _event.reset(token)
        return view

    def _set_gauges(self, clusters: Iterable[MemberCluster]) -> None:
        """The member cluster gauges of the clusters whose state or weight changed; the series of
        clusters gone are removed."""
        withdrawn = {s.cluster.name for s in self._shards.values() if s.withdrawn}
        now = {
            c.name: (WITHDRAWN if c.name in withdrawn else c.state.value, c.weight / FULL_WEIGHT)
            for c in clusters
        }
        for name in [n for n in self._gauges if n not in now]:
            for state in metrics.CLUSTER_STATES:
                metrics.MEMBER_CLUSTER_STATE.remove(name, state)
            metrics.MEMBER_CLUSTER_WEIGHT.remove(name)
            del self._gauges[name]
        for name, (state, weight) in now.items():
            if self._gauges.get(name) == (state, weight):
                continue
            for known in metrics.CLUSTER_STATES:
                metrics.MEMBER_CLUSTER_STATE.labels(name, known).set(1 if known == state else 0)
            metrics.MEMBER_CLUSTER_WEIGHT.labels(name).set(weight)
            self._gauges[name] = (state, weight)

    async def run(self) -> None:
        """Debounce loop. Leading edge: a change that comes after at least ``quiet`` seconds without
        a flush is flushed at once (a lone event pays no quiet period). A change that comes sooner
        belongs to a burst: it is flushed once no change has come for ``quiet`` seconds, or
        ``max_delay`` after the first one, however busy. So a burst costs its leading flush, one
        every ``max_delay`` while it lasts, and a trailing one."""
        while True:
            await self._dirty.wait()
            first = self._first_change
            if first is not None and first - self._last_flush >= self.quiet:
                self.flush()  # the mesh was quiet: push this at once
                continue
            while True:
                first = self._first_change if self._first_change is not None else self._clock()
                now = self._clock()
                wait = min(self._last_change + self.quiet, first + self.max_delay) - now
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            self.flush()
