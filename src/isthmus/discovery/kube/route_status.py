"""The status isthmus writes on the GAMMA routes of a member cluster (HTTPRoute, GRPCRoute):
``status.parents[]``, one entry per Service parent, with ``controllerName: isthmus.io/mesh`` and
the two conditions the Gateway API asks of every route:

* ``Accepted``: True (``Accepted``) when the route is in force for that parent; False with the
  reason when it is not: the route was refused (``UnsupportedValue``, discovery.gamma), the parent
  is no service of the mesh or has no such port (``NoMatchingParent``), or another member cluster's
  route of the same namespace/name differs and is older (``Conflicted``, isthmus's: the mesh takes
  the clusters as one).
* ``ResolvedRefs``: True (``ResolvedRefs``) when every backendRef (and mirror) names a service of
  the mesh with that port; else False with the first problem (``BackendNotFound``,
  ``RefNotPermitted``, ``InvalidKind``); its share of requests gets 500 (xds.generate.routes).

Entries of other controllers are kept as they are. ``lastTransitionTime`` changes only with a
condition's status. ``parent_statuses`` and ``merged`` are pure; a ``RouteStatusWriter`` per member
cluster writes a route's status subresource when what is wanted differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from kubernetes_asyncio import client

from isthmus.discovery.gamma import Parent, ReadRoute
from isthmus.discovery.kube.writing import ClusterWriter, reason
from isthmus.discovery.model import Backend, MeshView, ServiceRoute

CONTROLLER = "isthmus.io/mesh"
Obj = dict[str, Any]


def _parent_ref(parent: Parent, namespace: str) -> Obj:
    ref: Obj = {"group": "", "kind": "Service", "name": parent.service.name}
    if parent.service.namespace != namespace:
        ref["namespace"] = parent.service.namespace
    if parent.port:
        ref["port"] = parent.port
    return ref


def _backend_problem(view: MeshView, backend: Backend) -> tuple[str, str] | None:
    service = view.services.get(backend.service)
    if service is None:
        return "BackendNotFound", f"service {backend.service} is not in the mesh"
    if backend.port and not any(p.port == backend.port for p in service.ports):
        return "BackendNotFound", f"service {backend.service} has no port {backend.port}"
    return None


def _resolved(view: MeshView, route: ServiceRoute) -> tuple[bool, str, str]:
    for rule in route.rules:
        if rule.broken:
            reason, _, message = rule.broken.partition(": ")
            return False, reason, message
        for backend in (*rule.backends, *(b for b, _ in rule.mirrors)):
            problem = _backend_problem(view, backend)
            if problem is not None:
                return False, *problem
    return True, "ResolvedRefs", "every backend is a service of the mesh"


def _accepted(view: MeshView, read: ReadRoute, parent: Parent, cluster: str) -> tuple[bool, str, str]:
    if read.reason:
        return False, read.reason, read.message
    service = view.services.get(parent.service)
    if service is None:
        return False, "NoMatchingParent", f"service {parent.service} is not in the mesh"
    if parent.port and not any(p.port == parent.port for p in service.ports):
        return False, "NoMatchingParent", f"service {parent.service} has no port {parent.port}"
    mine = next(r for r in read.routes if r.service == parent.service and r.port == parent.port)
    chosen = next(
        (
            r
            for r in view.routes.get(parent.service, ())
            if (r.kind, r.name, r.namespace, r.port) == (mine.kind, mine.name, mine.namespace, mine.port)
        ),
        None,
    )
    if chosen is not None and chosen.cluster != cluster and chosen.rules != mine.rules:
        return (
            False,
            "Conflicted",
            f"the older route of the same name in member cluster {chosen.cluster!r} is in force",
        )
    return True, "Accepted", "in force for every sidecar of the mesh"


def _condition(
    kind: str, state: tuple[bool, str, str], generation: int, before: Sequence[Obj], now: str
) -> Obj:
    status, reason, message = state
    value = "True" if status else "False"
    old = next((c for c in before if c.get("type") == kind), None)
    since = (
        old["lastTransitionTime"]
        if old is not None and old.get("status") == value and old.get("lastTransitionTime")
        else now
    )
    return {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }


def parent_statuses(
    view: MeshView, read: ReadRoute, cluster: str, before: Sequence[Obj], now: str
) -> list[Obj]:
    """isthmus's ``status.parents`` entries of one route read in ``cluster``; ``before`` is the
    route's current ``status.parents`` (for the transition times)."""
    out = []
    for parent in read.parents:
        ref = _parent_ref(parent, read.namespace)
        old = next(
            (p for p in before if p.get("controllerName") == CONTROLLER and p.get("parentRef") == ref), {}
        )
        conditions = old.get("conditions") or []
        accepted = _accepted(view, read, parent, cluster)
        entry_conditions = [_condition("Accepted", accepted, read.generation, conditions, now)]
        if not read.reason:
            mine = next(r for r in read.routes if r.service == parent.service and r.port == parent.port)
            entry_conditions.append(
                _condition("ResolvedRefs", _resolved(view, mine), read.generation, conditions, now)
            )
        out.append({"parentRef": ref, "controllerName": CONTROLLER, "conditions": entry_conditions})
    return out


def merged(status: Mapping[str, Any] | None, ours: list[Obj]) -> Obj:
    """The route's status with isthmus's parent entries replaced by ``ours``, others' kept."""
    others = [p for p in (status or {}).get("parents") or () if p.get("controllerName") != CONTROLLER]
    return {**(status or {}), "parents": others + ours}


def _without_times(status: Mapping[str, Any] | None) -> Any:
    return [
        (
            p.get("parentRef"),
            p.get("controllerName"),
            [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in p.get("conditions") or ()],
        )
        for p in (status or {}).get("parents") or ()
    ]


def unchanged(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> bool:
    return bool(_without_times(before) == _without_times(after))


# ---- the writer: one per member cluster ------------------------------------------------------

PLURALS = {"HTTPRoute": "httproutes", "GRPCRoute": "grpcroutes"}
GROUP, VERSION = "gateway.networking.k8s.io", "v1"


class RouteStatusWriter(ClusterWriter):
    """Keeps the status of one member cluster's GAMMA routes equal to what the mesh makes of them.

    Woken by each view and by changes of the cluster's routes; it reads a route (its status is not
    watched: discovery keeps only what it routes by) only when what it wants for it differs from
    what it last wrote, and every ``resync`` seconds, so edits by others are undone. A refused
    write (403: the member role lacks ``update`` on ``httproutes/status``) or any other error is
    logged once, shown in the cluster's status and retried with backoff, never blocking discovery.

    The routes read change before the view that holds them is published (the aggregator waits for
    a quiet moment): woken by a change of the routes, the writer waits up to ``settle`` seconds for
    the next view, so that no route is judged by a view without it (a new member cluster's routes
    would get NoMatchingParent, a route and its new backend BackendNotFound, each rewritten a moment
    later). A change that changes no view (a refused route edited) is written after ``settle``.
    """

    what = "route status"

    def __init__(
        self,
        cluster: str,
        connect: Callable[[], Awaitable[client.ApiClient]],
        reads: Callable[[], tuple[ReadRoute, ...]],
        *,
        resync: float = 300.0,
        backoff: tuple[float, float] = (1.0, 30.0),
        timeout: float = 10.0,
        settle: float = 2.0,
    ) -> None:
        super().__init__(cluster, connect, resync=resync, backoff=backoff)
        self.reads, self.timeout, self.settle = reads, timeout, settle
        self._view: MeshView | None = None
        self._new_view = asyncio.Event()  # a view came since the last write began
        self._reads_changed = False  # the routes read changed since the last write began
        self._written: dict[tuple[str, str, str], object] = {}  # what was last written (or found)
        self.writes = 0

    def want(self, view: MeshView) -> None:
        self._view = view
        self._new_view.set()
        self._wake.set()

    def wake(self) -> None:
        """The cluster's routes read changed (the view that holds them is on its way)."""
        if self._view is not None:
            self._reads_changed = True
            self._wake.set()

    def status(self) -> dict[str, object]:
        return {"routes": len(self._written), "writes": self.writes, "error": self.error}

    def ready(self) -> bool:
        return self._view is not None

    def forget(self) -> None:
        self._written.clear()  # read them all again: undo others' edits

    def why(self, exc: Exception) -> str:
        return _why(exc)

    async def write(self, api: Any) -> None:
        if self._reads_changed and not self._new_view.is_set():
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: see ClusterWriter.run
                async with asyncio.timeout(self.settle):
                    await self._new_view.wait()
        self._reads_changed = False
        self._new_view.clear()
        assert self._view is not None
        await self._sync(api, self._view)

    async def _sync(self, api: Any, view: MeshView) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        current = {}
        for read in self.reads():
            if not read.parents or read.kind not in PLURALS:
                continue
            key = (read.kind, read.namespace, read.name)
            wanted = (
                read.generation,
                _without_times({"parents": parent_statuses(view, read, self.cluster, [], now)}),
            )
            current[key] = wanted
            if self._written.get(key) == wanted:
                continue
            await self._write(api, read, view, now)
            self._written[key] = wanted
        for gone in [k for k in self._written if k not in current]:
            del self._written[gone]

    async def _write(self, api: Any, read: ReadRoute, view: MeshView, now: str) -> None:
        plural = PLURALS[read.kind]
        try:
            obj = await api.get_namespaced_custom_object(
                GROUP, VERSION, read.namespace, plural, read.name, _request_timeout=self.timeout
            )
            status = obj.get("status") or {}
            ours = parent_statuses(view, read, self.cluster, status.get("parents") or [], now)
            new = merged(status, ours)
            if unchanged(status, new):
                return
            await api.replace_namespaced_custom_object_status(
                GROUP, VERSION, read.namespace, plural, read.name, {**obj, "status": new},
                _request_timeout=self.timeout,
            )  # fmt: skip
            self.writes += 1
        except client.ApiException as exc:
            if exc.status == 404:
                return  # deleted since watched
            if exc.status == 409:  # changed since read: read it again at once
                self._wake.set()
                return
            raise


def _why(exc: Exception) -> str:
    if isinstance(exc, client.ApiException) and exc.status == 403:
        return (
            "refused (403): the member role does not grant update on httproutes/status and "
            "grpcroutes/status (deploy/member-cluster/rbac.yaml)"
        )
    return reason(exc)
