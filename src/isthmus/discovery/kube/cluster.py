"""One member cluster: its reflectors, its health, and the shard it feeds into the aggregate.

Health policy (docs/discovery.md):
* SYNCING until every watched kind has listed once; then SYNCED.
* Any reflector failing (refused, hung, 5xx, 401/403) makes the cluster UNREACHABLE "since T":
  its last known endpoints are kept (its workloads are most likely still running) and reported.
* Unreachable for longer than ``demote_after``: STALE, endpoints demoted to the last priority.
* Unreachable for longer than ``withdraw_after`` (if set): its endpoints are withdrawn.
* Back in touch: the reflectors resume (or relist after a 410) and the cluster is SYNCED again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from kubernetes_asyncio import client

from isthmus.discovery.aggregate import Aggregator, Shard
from isthmus.discovery.kube.convert import ClusterObjects, ExportPolicy, shard_of
from isthmus.discovery.kube.kubeconfig import Credentials
from isthmus.discovery.kube.reflector import ListFn, Reflector, Timing
from isthmus.discovery.model import ClusterState, MemberCluster

log = logging.getLogger(__name__)

SOURCE = "kube"
MCS_GROUP, MCS_VERSION, MCS_PLURAL = "multicluster.x-k8s.io", "v1alpha1", "serviceexports"


@dataclass(frozen=True, slots=True)
class ClusterPolicy:
    export: ExportPolicy = ExportPolicy.ALL
    require_namespace_label: bool = False
    demote_after: float = 300.0
    withdraw_after: float | None = None
    region: str = ""
    zone: str = ""


class ClusterWatcher:
    """Watches one member cluster's API server and keeps its shard in the aggregator."""

    def __init__(
        self,
        credentials: Credentials,
        aggregator: Aggregator,
        policy: ClusterPolicy | None = None,
        timing: Timing | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.credentials = credentials
        self.name = credentials.cluster
        self.aggregator = aggregator
        self.policy = policy or ClusterPolicy()
        self.timing = timing or Timing()
        self._clock = clock
        self.state = ClusterState.SYNCING
        self.detail = ""
        self.unreachable_since: float | None = None
        self.synced = asyncio.Event()
        self.publish = True  # False while a rotated watcher warms up beside the old one
        self._failing: set[str] = set()
        self._dirty = asyncio.Event()
        self._reflectors: dict[str, Reflector] = {}
        self._mcs_installed = True
        self._published_withdrawn = False

    # ---- health ---------------------------------------------------------------------------

    def _on_error(self, kind: str, exc: BaseException) -> None:
        if kind == MCS_PLURAL and getattr(exc, "status", None) == 404:
            if self._mcs_installed:
                log.info(
                    "cluster %s: ServiceExport CRD not installed; export policy sees no exports", self.name
                )
            self._mcs_installed = False
            self._reflectors[kind].synced.set()
            return
        self._failing.add(kind)
        reason = getattr(exc, "reason", None) or type(exc).__name__
        status = getattr(exc, "status", None)
        self.detail = f"{kind}: {status} {reason}" if status else f"{kind}: {reason} {exc}".rstrip()
        if self.unreachable_since is None:
            self.unreachable_since = self._clock()
            log.warning(
                "cluster %s: API server unreachable (%s); keeping last known endpoints",
                self.name,
                self.detail,
            )
        self._dirty.set()

    def _on_ok(self, kind: str) -> None:
        self._failing.discard(kind)
        if not self._failing and self.unreachable_since is not None:
            log.info("cluster %s: API server reachable again", self.name)
            self.unreachable_since = None
            self.detail = ""
        self._dirty.set()

    def _current_state(self) -> ClusterState:
        if self.unreachable_since is not None:
            if self._clock() - self.unreachable_since >= self.policy.demote_after:
                return ClusterState.STALE
            return ClusterState.UNREACHABLE
        if all(r.synced.is_set() for r in self._reflectors.values()):
            return ClusterState.SYNCED
        return ClusterState.SYNCING

    def withdrawn(self) -> bool:
        return (
            self.unreachable_since is not None
            and self.policy.withdraw_after is not None
            and self._clock() - self.unreachable_since >= self.policy.withdraw_after
        )

    # ---- shard ----------------------------------------------------------------------------

    def build_shard(self) -> Shard:
        member = MemberCluster(
            self.name, region=self.policy.region, zone=self.policy.zone, state=self.state, detail=self.detail
        )
        if self.withdrawn():
            return Shard(member)
        store = {kind: r.store for kind, r in self._reflectors.items()}
        objects = ClusterObjects(
            services=store.get("services", {}),
            endpoint_slices=store.get("endpointslices", {}),
            nodes=store.get("nodes", {}),
            pods=store.get("pods", {}),
            namespaces=store.get("namespaces", {}),
            service_exports=store.get(MCS_PLURAL, {}),
        )
        return shard_of(member, objects, self.policy.export, self.policy.require_namespace_label)

    def _publish(self) -> None:
        self.state = self._current_state()
        shard = self.build_shard()
        shard = replace(shard, cluster=replace(shard.cluster, state=self.state, detail=self.detail))
        self._published_withdrawn = self.withdrawn()
        if self.publish:
            self.aggregator.set_shard(SOURCE, shard)

    def publish_now(self) -> None:
        """Start publishing (after a credential rotation's warm-up) with the current state."""
        self.publish = True
        self._publish()

    # ---- run ------------------------------------------------------------------------------

    def _reflector(self, kind: str, list_fn: ListFn) -> Reflector:
        reflector = Reflector(kind, list_fn, self._dirty.set, self._on_error, self._on_ok, self.timing)
        self._reflectors[kind] = reflector
        return reflector

    async def run(self) -> None:
        api = await self.credentials.api_client()
        try:
            core = client.CoreV1Api(api)
            discovery = client.DiscoveryV1Api(api)
            custom = client.CustomObjectsApi(api)

            def exports(**kw: object) -> Awaitable[Any]:
                result: Awaitable[Any] = custom.list_cluster_custom_object(
                    MCS_GROUP, MCS_VERSION, MCS_PLURAL, **kw
                )
                return result

            reflectors = [
                self._reflector("services", core.list_service_for_all_namespaces),
                self._reflector("endpointslices", discovery.list_endpoint_slice_for_all_namespaces),
                self._reflector("nodes", core.list_node),
                self._reflector("pods", core.list_pod_for_all_namespaces),
                self._reflector("namespaces", core.list_namespace),
                self._reflector(MCS_PLURAL, exports),
            ]
            async with asyncio.TaskGroup() as tasks:
                for r in reflectors:
                    tasks.create_task(r.run(), name=f"reflector-{self.name}-{r.kind}")
                tasks.create_task(self._publisher(), name=f"publisher-{self.name}")
                tasks.create_task(self._staleness_clock(), name=f"staleness-{self.name}")
        finally:
            await api.close()

    async def _publisher(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(0.01)  # let a burst of watch events land in one shard rebuild
            self._dirty.clear()
            self._publish()
            if self.state is ClusterState.SYNCED and not self.synced.is_set():
                self.synced.set()
                log.info("cluster %s: synced", self.name)

    async def _staleness_clock(self) -> None:
        """Re-evaluate the state while unreachable, so demotion and withdrawal happen on time."""
        while True:
            await asyncio.sleep(min(1.0, self.policy.demote_after / 4))
            if self._current_state() is not self.state or self.withdrawn() != self._published_withdrawn:
                self._dirty.set()
