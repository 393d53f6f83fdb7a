"""One member cluster: its reflectors, its health, and the shard it feeds into the aggregate.

Health policy (docs/discovery.md):
* SYNCING until every watched kind has listed once; then SYNCED.
* Any reflector failing (refused, hung, 5xx, 401/403) makes the cluster UNREACHABLE "since T":
  its last known endpoints are kept (its workloads are most likely still running) and reported.
  Not failures: a 429 (the server asks to wait; the reflector retries after Retry-After), and for
  an optional kind (ServiceExport, TrafficSplit, HTTPRoute, GRPCRoute, AuthorizationPolicy,
  TrafficTarget, HTTPRouteGroup, TCPRoute) a 404 (CRD not installed) or a 403 (the role does not
  grant it): that feature is off for this cluster, reported once in the log and in ``degraded``,
  and the kind is retried with backoff in case it appears.
* While unreachable, the API server is asked for /version every ``probe_interval``; its first
  answer wakes the reflectors from their backoff, so the cluster is synced again within about a
  second of the server being back (not after a doubling backoff).
* Unreachable for longer than ``demote_after``: STALE, endpoints demoted to the last priority.
* Unreachable for longer than ``withdraw_after`` (if set): its endpoints are withdrawn.
* Back in touch: the reflectors resume (or relist after a 410) and the cluster is SYNCED again.

The shard is kept up to date incrementally: each watch event marks the services it may affect
stale (a Service or ServiceExport its own service; an EndpointSlice the services it belonged to
before and after, through a SliceIndex; a Pod the services whose slices reference it), and the
next publish recomputes only those (convert.update_shard). A relist, a change of a Node's
locality labels or of a Namespace's mesh label, and a policy change rebuild the whole shard
(convert.shard_of). The health state only changes the shard's cluster record.

TrafficSplits and GAMMA routes (HTTPRoute, GRPCRoute of gateway.networking.k8s.io/v1) change no
service: they are read whole at each publish, the routes through discovery.gamma with each
object's reading remembered while the watch holds the same object (convert.route_reads), so a
publish re-reads only the routes that changed. ``routes_read`` holds the cluster's readings (for a
status writer); a route refused (not Accepted) is logged once per object and generation.
Authorization policies (isthmus.io's AuthorizationPolicy; SMI's TrafficTarget with the
HTTPRouteGroups and TCPRoutes its rules name) are read the same way, through
discovery.authorization (convert.policy_reads), into the shard's ``policies`` with each object's
creationTimestamp; a refused one is logged once per object and generation.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

from kubernetes_asyncio import client

from isthmus.discovery.aggregate import Aggregator, Shard
from isthmus.discovery.gamma import ReadRoute
from isthmus.discovery.kube import trim
from isthmus.discovery.kube.convert import (
    ClusterObjects,
    ExportPolicy,
    PolicyMemo,
    ReadPolicy,
    RouteMemo,
    SliceIndex,
    key_of,
    mesh_label,
    node_locality,
    policy_reads,
    route_reads,
    shard_of,
    traffic_splits,
    update_shard,
)
from isthmus.discovery.kube.gateway import gateway_of, gateway_ready, gateway_service
from isthmus.discovery.kube.kubeconfig import Credentials
from isthmus.discovery.kube.reflector import ListFn, Obj, Reflector, Timing
from isthmus.discovery.model import ClusterState, Gateway, MemberCluster, ServiceKey, ServicePort

log = logging.getLogger(__name__)

COALESCE = 0.01  # seconds a burst of watch events may keep a shard rebuild waiting, at most

SOURCE = "kube"
MCS_GROUP, MCS_VERSION, MCS_PLURAL = "multicluster.x-k8s.io", "v1alpha1", "serviceexports"
SMI_GROUP, SMI_VERSION, SMI_PLURAL = "split.smi-spec.io", "v1alpha2", "trafficsplits"
GATEWAY_GROUP, GATEWAY_VERSION = "gateway.networking.k8s.io", "v1"
HTTP_ROUTES, GRPC_ROUTES = "httproutes", "grpcroutes"
ROUTE_KINDS = {HTTP_ROUTES: "HTTPRoute", GRPC_ROUTES: "GRPCRoute"}  # plural -> kind (list items lack it)
POLICY_GROUP, POLICY_VERSION, POLICIES = "isthmus.io", "v1alpha1", "authorizationpolicies"
ACCESS_GROUP, ACCESS_VERSION, TRAFFIC_TARGETS = "access.smi-spec.io", "v1alpha3", "traffictargets"
SPECS_GROUP, SPECS_VERSION = "specs.smi-spec.io", "v1alpha4"
HTTP_ROUTE_GROUPS, TCP_ROUTES = "httproutegroups", "tcproutes"
POLICY_KINDS = {
    POLICIES: "AuthorizationPolicy",
    TRAFFIC_TARGETS: "TrafficTarget",
    HTTP_ROUTE_GROUPS: "HTTPRouteGroup",
    TCP_ROUTES: "TCPRoute",
}
OPTIONAL_CRDS = {  # absent CRD (or not granted) = none
    MCS_PLURAL: "ServiceExport",
    SMI_PLURAL: "TrafficSplit",
    **ROUTE_KINDS,
    **POLICY_KINDS,
}

# Kinds whose objects affect every service in some way, by the part of them that matters: a change
# of that part rebuilds the whole shard, any other change (a Node's status) nothing.
_SUMMARIES: dict[str, Callable[[Obj | None], object]] = {"nodes": node_locality, "namespaces": mesh_label}
# Failures that say nothing about the server's will (it was not reached, or answered 5xx).
_TRANSIENT = (None, 500, 502, 503, 504)


def _unreached(reflector: Reflector) -> bool:
    """Backing off after failing to reach the server (not after being refused by it)."""
    return reflector.backing_off and getattr(reflector.last_error, "status", None) in _TRANSIENT


@dataclass(frozen=True, slots=True)
class ClusterPolicy:
    export: ExportPolicy = ExportPolicy.ALL
    require_namespace_label: bool = False
    demote_after: float = 300.0
    withdraw_after: float | None = None
    region: str = ""
    zone: str = ""
    gateway: Gateway | None = None  # configured east-west gateway; else the labelled Service's


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
        # Hears which pods changed ("namespace/name" keys; None: all, after a relist): identity
        # closes the streams of pod-bound tokens whose pod is gone (Members.on_pods).
        self.on_pods: Callable[[str, Collection[str] | None], None] | None = None
        # ServiceExports or Services changed: their conditions may have to be written (Members).
        self.on_exports: Callable[[str], None] | None = None
        self.on_routes: Callable[[str], None] | None = None  # routes_read changed (route status)
        self._failing: set[str] = set()
        self._dirty = asyncio.Event()
        self._reflectors: dict[str, Reflector] = {}
        self._crds_missing: set[str] = set()
        self.degraded: dict[str, str] = {}  # optional kind -> why this cluster's objects of it are unused
        self._published_withdrawn = False
        # Incremental shard: the content last built (None: rebuild it whole), with the policy it was
        # built with, the services to recompute, and what the change tracking needs.
        self._shard: Shard | None = None
        self._built_with = self.policy
        self._stale: set[ServiceKey] = set()
        self._index = SliceIndex()
        self._summaries: dict[str, dict[str, object]] = {}
        # GAMMA routes: each route object's reading, kept while the watch holds that same object;
        # the readings of the last publish (routes in mesh namespaces with a Service parent, for a
        # status writer); the (kind, namespace, name) of refused routes -> generation logged.
        self._route_memo: RouteMemo = {}
        self.routes_read: tuple[ReadRoute, ...] = ()
        self._refusals_logged: dict[tuple[str, str, str], int] = {}
        # Authorization policies: each object's reading (with the objects it came from), and the
        # (kind, namespace, name) of refused policies -> generation logged.
        self._policy_memo: PolicyMemo = {}
        self._policy_refusals_logged: dict[tuple[str, str, str], int] = {}

    def last_heard(self) -> float | None:
        """When this cluster's API server last answered a list or sent a watch event (wall clock)."""
        heard = [r.heard for r in self._reflectors.values() if r.heard is not None]
        return max(heard) if heard else None

    def set_policy(self, policy: ClusterPolicy) -> None:
        """Use ``policy`` from now on (a MeshConfig changed it): the shard is rebuilt with it."""
        if policy != self.policy:
            self.policy = policy
            self._dirty.set()

    # ---- health ---------------------------------------------------------------------------

    def _on_error(self, kind: str, exc: BaseException) -> None:
        status = getattr(exc, "status", None)
        if kind in OPTIONAL_CRDS and status in (403, 404):
            self._optional_unavailable(kind, status, exc)
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

    def _optional_unavailable(self, kind: str, status: int, exc: BaseException) -> None:
        """An optional kind the server does not serve (404) or this cluster's role does not grant
        (403): the feature is off for this cluster, which stays synced."""
        name = OPTIONAL_CRDS[kind]
        if status == 404:
            if kind not in self._crds_missing:
                log.info("cluster %s: %s CRD not installed; none are seen", self.name, name)
            self._crds_missing.add(kind)
        else:
            why = (
                f"{name}: 403 Forbidden: the credentials may not list and watch {kind}; this cluster's "
                f"{name}s are ignored until get, list, watch on {kind} is granted"
            )
            if self.degraded.get(kind) != why:
                log.warning("cluster %s: %s (%s)", self.name, why, getattr(exc, "reason", exc))
            self.degraded[kind] = why
        reflector = self._reflectors[kind]
        if reflector.store:  # what was seen before is no longer known to be true
            reflector.store.clear()
            self._on_change(kind, None)
        reflector.synced.set()
        self._answered(kind)

    def _on_wait(self, kind: str, exc: BaseException) -> None:
        """A 429: the server is up and asks to wait; the reflector retries after Retry-After."""
        log.debug("cluster %s: %s: %s; waiting as asked", self.name, kind, exc)
        self._answered(kind)

    def _on_ok(self, kind: str) -> None:
        if kind in self.degraded or kind in self._crds_missing:
            log.info("cluster %s: %s are watched now", self.name, OPTIONAL_CRDS.get(kind, kind))
            self.degraded.pop(kind, None)
            self._crds_missing.discard(kind)
        self._answered(kind)

    def _answered(self, kind: str) -> None:
        """The API server answered for ``kind``: the kind is not failing, and the others may retry now."""
        self._failing.discard(kind)
        if not self._failing and self.unreachable_since is not None:
            log.info("cluster %s: API server reachable again", self.name)
            self.unreachable_since = None
            self.detail = ""
        self._wake_reflectors()
        self._dirty.set()

    def _wake_reflectors(self) -> None:
        """Cut short the backoff of reflectors that failed to reach the server (not of those it
        refused: a 401 or 403 does not get better by asking more often)."""
        for reflector in self._reflectors.values():
            if _unreached(reflector):
                reflector.wake()

    def _current_state(self) -> ClusterState:
        if self.unreachable_since is not None:
            if self._clock() - self.unreachable_since >= self.policy.demote_after:
                return ClusterState.STALE
            return ClusterState.UNREACHABLE
        if all(r.synced.is_set() for r in self._reflectors.values()):
            return ClusterState.SYNCED
        return ClusterState.SYNCING

    def watch_stats(self) -> dict[str, dict[str, int]]:
        """Per watched kind: relists (410 Gone and recoveries), watch events, bookmarks."""
        return {
            kind: {"relists": r.relists, "events": r.events, "bookmarks": r.bookmarks}
            for kind, r in sorted(self._reflectors.items())
        }

    def withdrawn(self) -> bool:
        return (
            self.unreachable_since is not None
            and self.policy.withdraw_after is not None
            and self._clock() - self.unreachable_since >= self.policy.withdraw_after
        )

    # ---- shard ----------------------------------------------------------------------------

    def node_locality(self, node: str) -> tuple[str, str] | None:
        """(region, zone) of a Node, from its topology labels, else the cluster's own; None: unknown."""
        found = self._store("nodes").get(node)
        if found is None:
            return None
        region, zone = node_locality(found)
        return region or self.policy.region, zone or self.policy.zone

    def node_localities(self) -> dict[str, tuple[str, str]]:
        """node_locality of every Node the watch holds, by name."""
        return {name: loc for name in self._store("nodes") if (loc := self.node_locality(name)) is not None}

    def pod_uid(self, namespace: str, name: str) -> str | None:
        """The uid of pod namespace/name as the watch holds it; None: no such pod; "": pods not listed yet."""
        reflector = self._reflectors.get("pods")
        if reflector is None or not reflector.synced.is_set():
            return ""
        pod = reflector.store.get(f"{namespace}/{name}")
        return None if pod is None else str((pod.get("metadata") or {}).get("uid", ""))

    def _on_change(self, kind: str, keys: Collection[str] | None) -> None:
        """A reflector's store changed: note the services to recompute (or drop the shard: rebuild)."""
        if kind == "pods" and self.on_pods is not None:
            self.on_pods(self.name, keys)
        if kind in (MCS_PLURAL, "services") and self.on_exports is not None:
            self.on_exports(self.name)
        if self._shard is not None:
            touched = self._services_touched(kind, keys) if keys is not None else None
            if touched is None:
                self._shard = None
            else:
                self._stale |= touched
        self._dirty.set()

    def _services_touched(self, kind: str, keys: Collection[str]) -> set[ServiceKey] | None:
        """The services whose entries the changed objects may change; None: possibly every one."""
        store = self._store(kind)
        if kind in ("services", MCS_PLURAL):
            return {key_of(key) for key in keys}
        if kind == SMI_PLURAL or kind in ROUTE_KINDS or kind in POLICY_KINDS:
            return set()  # splits, routes, policies are read whole at each publish; no service changes
        if kind == "endpointslices":
            return set().union(*(self._index.update(key, store.get(key)) for key in keys))
        if kind == "pods":
            return set().union(*(self._index.services_of_pod(key) for key in keys))
        summary, known = _SUMMARIES.get(kind), self._summaries.get(kind)
        if summary is None or known is None:
            return None
        changed = False
        for key in keys:
            now = summary(store.get(key))
            changed = changed or known.get(key, summary(None)) != now
            known[key] = now
        return None if changed else set()

    def service_exports(self) -> dict[str, tuple[Obj, tuple[ServicePort, ...] | None]]:
        """Each ServiceExport of the cluster, with the ports this cluster exports its service with
        (None: the service is not in the mesh here: no Service, a namespace out of the mesh, ...)."""
        shard = self._shard
        ports = shard.services if shard is not None else {}
        return {key: (obj, ports.get(key_of(key))) for key, obj in self._store(MCS_PLURAL).items()}

    def _store(self, kind: str) -> dict[str, Obj]:
        reflector = self._reflectors.get(kind)
        return reflector.store if reflector is not None else {}

    def _objects(self) -> ClusterObjects:
        return ClusterObjects(
            services=self._store("services"),
            endpoint_slices=self._store("endpointslices"),
            nodes=self._store("nodes"),
            pods=self._store("pods"),
            namespaces=self._store("namespaces"),
            service_exports=self._store(MCS_PLURAL),
        )

    def _member(self) -> MemberCluster:
        services = self._store("services")
        gateway = self.policy.gateway or gateway_of(services, self._store("nodes"))
        ready = None
        key = None if self.policy.gateway else gateway_service(services)
        if key is not None:
            slices = self._store("endpointslices")
            ready = gateway_ready(slices[k] for k in self._index.slices(key_of(key)) if k in slices)
        return MemberCluster(
            self.name,
            region=self.policy.region,
            zone=self.policy.zone,
            gateway=gateway,
            state=self.state,
            detail=self.detail,
            gateway_ready=ready,
        )

    def build_shard(self) -> Shard:
        """The whole shard converted from scratch (what the incremental shard must equal)."""
        member, policy = self._member(), self.policy
        if self.withdrawn():
            return Shard(member)
        return shard_of(member, self._objects(), policy.export, policy.require_namespace_label)

    def _content(self) -> Shard:
        """The shard's services and endpoints, recomputing only the stale services if it can."""
        policy, objects = self.policy, self._objects()
        rules = (policy.export, policy.require_namespace_label)
        if self._shard is None or policy != self._built_with:
            self._index = SliceIndex.of(objects.endpoint_slices)
            self._summaries = {
                kind: {key: summary(obj) for key, obj in self._store(kind).items()}
                for kind, summary in _SUMMARIES.items()
            }
            member = MemberCluster(self.name, region=policy.region, zone=policy.zone)
            self._shard = shard_of(member, objects, *rules, index=self._index)
            self._built_with = policy
        elif self._stale:
            self._shard = update_shard(self._shard, objects, self._index, self._stale, *rules)
        self._stale = set()
        return self._shard

    def _publish(self) -> None:
        state, withdrawn = self._current_state(), self.withdrawn()
        if self.publish and state is ClusterState.STALE and self.state is not ClusterState.STALE:
            log.warning(
                "cluster %s: unreachable for over %.0f s (%s): its endpoints are demoted to the last "
                "priority",
                self.name,
                self.policy.demote_after,
                self.detail,
            )
        if self.publish and withdrawn and not self._published_withdrawn:
            log.warning(
                "cluster %s: unreachable for over %.0f s: its endpoints are withdrawn",
                self.name,
                self.policy.withdraw_after or 0,
            )
        self.state = state
        content, member = self._content(), self._member()
        self._published_withdrawn = withdrawn
        if self._published_withdrawn:
            shard = Shard(member, withdrawn=True)
        elif state is ClusterState.SYNCING and not self.synced.is_set():
            # Not every kind listed yet: services without their endpoints (or endpoints without
            # their pods' accounts) would be pushed as they are, now that a lone change is pushed at
            # once. Until the first full sync the cluster is known by name only.
            shard = Shard(member)
        else:
            rule = self.policy.require_namespace_label
            splits = traffic_splits(self._store(SMI_PLURAL), self._store("namespaces"), rule)
            routes = tuple(route for read in self._read_routes() for route in read.routes)
            policies = tuple((r.policy, r.created) for r in self._read_policies() if r.policy is not None)
            shard = replace(content, cluster=member, splits=splits, routes=routes, policies=policies)
        if self.publish:
            self.aggregator.set_shard(SOURCE, shard)

    def _read_routes(self) -> tuple[ReadRoute, ...]:
        """The cluster's GAMMA routes as read now (``routes_read``); a refusal new for its object's
        generation is logged."""
        stores = {kind: self._store(plural) for plural, kind in ROUTE_KINDS.items()}
        reads = route_reads(
            stores,
            self._store("namespaces"),
            self.policy.require_namespace_label,
            self.name,
            self._route_memo,
        )
        if reads != self.routes_read and self.on_routes is not None:
            self.on_routes(self.name)
        self.routes_read = reads
        refused = {(r.kind, r.namespace, r.name): r for r in reads if r.reason}
        if self.publish:
            for key, read in refused.items():
                if self._refusals_logged.get(key) != read.generation:
                    log.info(
                        "cluster %s: %s %s/%s (generation %d) is not accepted: %s: %s",
                        self.name,
                        read.kind,
                        read.namespace,
                        read.name,
                        read.generation,
                        read.reason,
                        read.message,
                    )
            self._refusals_logged = {key: read.generation for key, read in refused.items()}
        return reads

    def _read_policies(self) -> tuple[ReadPolicy, ...]:
        """The cluster's authorization policies as read now; a refusal new for its object's
        generation is logged."""
        reads = policy_reads(
            self._store(POLICIES),
            self._store(TRAFFIC_TARGETS),
            self._store(HTTP_ROUTE_GROUPS),
            self._store(TCP_ROUTES),
            self._store("namespaces"),
            self.policy.require_namespace_label,
            self._policy_memo,
        )
        if self.publish:
            refused = {(r.kind, r.namespace, r.name): r for r in reads if r.message}
            for key, read in refused.items():
                if self._policy_refusals_logged.get(key) != read.generation:
                    closed = (
                        f"service account {read.policy.service_account}'s workloads may be called by nobody"
                        if read.policy is not None
                        else "not applied"
                    )
                    log.warning(
                        "cluster %s: %s %s/%s (generation %d) is refused (%s until mended): %s",
                        self.name,
                        read.kind,
                        read.namespace,
                        read.name,
                        read.generation,
                        closed,
                        read.message,
                    )
            self._policy_refusals_logged = {key: read.generation for key, read in refused.items()}
        return reads

    def publish_now(self) -> None:
        """Start publishing (after a credential rotation's warm-up) with the current state."""
        self.publish = True
        self._publish()

    # ---- run ------------------------------------------------------------------------------

    def _reflector(self, kind: str, list_fn: ListFn, trimmed: trim.Trim | None = None) -> Reflector:
        """The reflector of ``kind``, storing its objects as ``trimmed`` makes them (trim.py)."""
        on_change = functools.partial(self._on_change, kind)
        reflector = Reflector(
            kind,
            list_fn,
            on_change,
            self._on_error,
            self._on_ok,
            self.timing,
            on_wait=self._on_wait,
            cluster=self.name,
            trim=trimmed,
        )
        self._reflectors[kind] = reflector
        return reflector

    async def run(self) -> None:
        api = await self.credentials.api_client()
        try:
            core = client.CoreV1Api(api)
            discovery = client.DiscoveryV1Api(api)
            custom = client.CustomObjectsApi(api)
            version = client.VersionApi(api)

            def crd(group: str, version: str, plural: str) -> ListFn:
                def list_fn(**kw: object) -> Awaitable[Any]:
                    result: Awaitable[Any] = custom.list_cluster_custom_object(group, version, plural, **kw)
                    return result

                return list_fn

            reflectors = [
                self._reflector("services", core.list_service_for_all_namespaces, trim.service),
                self._reflector(
                    "endpointslices", discovery.list_endpoint_slice_for_all_namespaces, trim.endpoint_slice
                ),
                self._reflector("nodes", core.list_node, trim.node),
                self._reflector("pods", core.list_pod_for_all_namespaces, trim.pod),
                self._reflector("namespaces", core.list_namespace, trim.namespace),
                self._reflector(MCS_PLURAL, crd(MCS_GROUP, MCS_VERSION, MCS_PLURAL), trim.service_export),
                self._reflector(SMI_PLURAL, crd(SMI_GROUP, SMI_VERSION, SMI_PLURAL), trim.traffic_split),
                self._reflector(
                    HTTP_ROUTES, crd(GATEWAY_GROUP, GATEWAY_VERSION, HTTP_ROUTES), trim.http_route
                ),
                self._reflector(
                    GRPC_ROUTES, crd(GATEWAY_GROUP, GATEWAY_VERSION, GRPC_ROUTES), trim.grpc_route
                ),
                self._reflector(
                    POLICIES, crd(POLICY_GROUP, POLICY_VERSION, POLICIES), trim.authorization_policy
                ),
                self._reflector(
                    TRAFFIC_TARGETS, crd(ACCESS_GROUP, ACCESS_VERSION, TRAFFIC_TARGETS), trim.traffic_target
                ),
                self._reflector(
                    HTTP_ROUTE_GROUPS,
                    crd(SPECS_GROUP, SPECS_VERSION, HTTP_ROUTE_GROUPS),
                    trim.http_route_group,
                ),
                self._reflector(TCP_ROUTES, crd(SPECS_GROUP, SPECS_VERSION, TCP_ROUTES), trim.tcp_route),
            ]
            async with asyncio.TaskGroup() as tasks:
                for r in reflectors:
                    tasks.create_task(r.run(), name=f"reflector-{self.name}-{r.kind}")
                tasks.create_task(self._publisher(), name=f"publisher-{self.name}")
                tasks.create_task(self._staleness_clock(), name=f"staleness-{self.name}")
                tasks.create_task(self._prober(version), name=f"prober-{self.name}")
        finally:
            await api.close()

    async def _prober(self, version: Any) -> None:
        """While a reflector cannot reach the server, ask it for /version every ``probe_interval``
        (cheap, granted to every authenticated user); an answer wakes the reflectors."""
        while True:
            await asyncio.sleep(self.timing.probe_interval)
            waiting = [r for r in self._reflectors.values() if _unreached(r)]
            if not waiting:
                continue
            try:
                await version.get_code(_request_timeout=self.timing.probe_interval * 2)
            except asyncio.CancelledError:
                raise
            except Exception:
                continue
            log.debug("cluster %s: API server answers again; retrying now", self.name)
            for reflector in waiting:
                reflector.wake()

    async def _publisher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            # Let a burst of watch events land in one shard rebuild: yield to the event loop while
            # more keep coming, for at most COALESCE seconds. A lone event waits one loop turn.
            deadline = loop.time() + COALESCE
            self._dirty.clear()
            await asyncio.sleep(0)
            while self._dirty.is_set() and loop.time() < deadline:
                self._dirty.clear()
                await asyncio.sleep(0)
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
