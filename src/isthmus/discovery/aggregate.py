"""The aggregate: endpoint shards per (source, member cluster), merged and debounced into MeshViews.

Every source (the file source, one Kubernetes watcher per member cluster) owns
shards keyed by (source, cluster) and replaces a whole shard at a time; a removed
cluster drops its shards. Changes are debounced (a quiet period, bounded by a
maximum delay) into one immutable MeshView; a flush that changes nothing produces
no new version, because MeshView versions are content hashes.

Services merge by namespace/name across shards ("namespace sameness"): the port
list of the alphabetically first cluster that defines the service wins, and the
endpoints of every shard are concatenated, each keeping its own locality.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from isthmus.discovery.model import Endpoint, MemberCluster, MeshView, Service, ServiceKey, ServicePort

log = logging.getLogger(__name__)

ShardKey = tuple[str, str]  # (source, member cluster)


@dataclass(frozen=True, slots=True)
class Shard:
    """Everything one source knows about one member cluster."""

    cluster: MemberCluster
    services: Mapping[ServiceKey, tuple[ServicePort, ...]] = field(default_factory=dict)
    endpoints: Mapping[ServiceKey, tuple[Endpoint, ...]] = field(default_factory=dict)


def merge(shards: Iterable[Shard], extra_clusters: Iterable[MemberCluster] = ()) -> MeshView:
    """Merge shards into one MeshView (pure)."""
    ports: dict[ServiceKey, tuple[ServicePort, ...]] = {}
    endpoints: dict[ServiceKey, list[Endpoint]] = {}
    clusters: dict[str, MemberCluster] = {c.name: c for c in extra_clusters}
    for shard in sorted(shards, key=lambda s: s.cluster.name):
        clusters.setdefault(shard.cluster.name, shard.cluster)
        for key, service_ports in shard.services.items():
            if key not in ports:
                ports[key] = service_ports
            elif ports[key] != service_ports:
                log.debug(
                    "service %s: ports differ in cluster %s; keeping the first", key, shard.cluster.name
                )
        for key, eps in shard.endpoints.items():
            endpoints.setdefault(key, []).extend(eps)
    services = [
        Service(key, service_ports, tuple(endpoints.get(key, ()))) for key, service_ports in ports.items()
    ]
    return MeshView.build(services, [c for c in clusters.values() if c.name])


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
        out.append(Shard(member, ports, {k: v for k, v in eps.items() if v}))
    return out


class Aggregator:
    """Holds the shards and publishes debounced MeshViews to ``on_view``."""

    def __init__(
        self,
        on_view: Callable[[MeshView], None],
        quiet: float = 0.1,
        max_delay: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_view = on_view
        self.quiet = quiet
        self.max_delay = max_delay
        self._clock = clock
        self._shards: dict[ShardKey, Shard] = {}
        self._dirty = asyncio.Event()
        self._first_change: float | None = None
        self._last_change = 0.0
        self.version = ""
        self.flushes = 0

    @property
    def shards(self) -> Mapping[ShardKey, Shard]:
        return dict(self._shards)

    def set_shard(self, source: str, shard: Shard) -> None:
        self._shards[(source, shard.cluster.name)] = shard
        self._changed()

    def update_cluster(self, source: str, cluster: MemberCluster) -> None:
        """Replace a shard's cluster record (its health, gateway) and keep its endpoints."""
        key = (source, cluster.name)
        old = self._shards.get(key)
        self._shards[key] = replace(old, cluster=cluster) if old is not None else Shard(cluster)
        self._changed()

    def remove_shard(self, source: str, cluster: str) -> None:
        if self._shards.pop((source, cluster), None) is not None:
            self._changed()

    def set_source(self, source: str, shards: Iterable[Shard]) -> None:
        """Replace every shard of ``source`` (the file source reloads as a whole)."""
        fresh = {(source, shard.cluster.name): shard for shard in shards}
        for key in [k for k in self._shards if k[0] == source and k not in fresh]:
            del self._shards[key]
        for key, shard in fresh.items():
            if self._shards.get(key) != shard:
                self._shards[key] = shard
        self._changed()

    def remove_source(self, source: str) -> None:
        for key in [k for k in self._shards if k[0] == source]:
            del self._shards[key]
            self._changed()

    def _changed(self) -> None:
        now = self._clock()
        if self._first_change is None:
            self._first_change = now
        self._last_change = now
        self._dirty.set()

    def flush(self) -> MeshView:
        """Build and publish a view now (also used by tests and at startup)."""
        self._first_change = None
        self._dirty.clear()
        view = merge(self._shards.values())
        self.flushes += 1
        if view.version != self.version:
            self.version = view.version
            self._on_view(view)
        return view

    async def run(self) -> None:
        """Debounce loop: flush after ``quiet`` seconds without change, or ``max_delay`` after the first."""
        while True:
            await self._dirty.wait()
            while True:
                first = self._first_change if self._first_change is not None else self._clock()
                now = self._clock()
                wait = min(self._last_change + self.quiet, first + self.max_delay) - now
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            self.flush()
