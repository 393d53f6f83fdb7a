"""MCS (multicluster.x-k8s.io/v1alpha1): isthmus's writes into member clusters, ServiceImports and
the conditions of ServiceExports.

Every service of the mesh that has a clusterset IP gets one ServiceImport, the same in every member
cluster that has the CRD: ``spec.type: ClusterSetIP``, ``spec.ips`` the clusterset IP
(discovery.clusterset: every replica of isthmus picks the same), ``spec.ports`` the service's
ports (the mesh's: the oldest export's, as discovery merges them),
and ``status.clusters`` the member clusters that export it. They carry the label
``app.kubernetes.io/managed-by: isthmus``; isthmus deletes the ones it made when their service
leaves the mesh, and never touches others.

Each ServiceExport gets two conditions (KEP-1645): ``Valid`` (True: its Service is in the mesh;
False, reason ``NoService``, when the cluster has no such Service in the mesh) and ``Conflict``
(True, reason ``PortConflict``, when this cluster exports other ports than the ones the mesh uses:
the oldest export's; else False, ``NoConflict``). ``lastTransitionTime`` changes only with a status.

``service_import``, ``export_conditions`` and ``Desired`` are pure. An ``ImportWriter`` per member
cluster writes the difference between what it wrote last and what is wanted now, one cluster never
waiting for another: it lists its own ServiceImports at start (and after any failure, and every
``resync`` seconds, so edits by others are undone), creates, replaces (spec, then status: a
subresource) and deletes. A cluster without the CRD (404) is asked again every ``recheck`` seconds;
a namespace that does not exist there is skipped until the next change; a refusal (403: the
cluster's role does not grant the writes, deploy/member-cluster/rbac.yaml) is reported in its
status and retried with backoff, like any other error.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kubernetes_asyncio import client

from isthmus.discovery.kube.writing import ClusterWriter
from isthmus.discovery.model import MeshView, Service, ServiceKey, ServicePort

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "multicluster.x-k8s.io", "v1alpha1", "serviceimports", "ServiceImport"
EXPORTS = "serviceexports"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "isthmus"

Obj = dict[str, Any]
FOREIGN: Obj = {}  # _write's answer for a name taken by a ServiceImport isthmus did not make


def import_ports(ports: tuple[ServicePort, ...]) -> list[Obj]:
    out = []
    for port in ports:
        entry: Obj = {"name": port.name, "protocol": "TCP", "port": port.port}
        if port.protocol.is_http:
            entry["appProtocol"] = port.protocol.value
        out.append(entry)
    return out


def exporters(service: Service) -> tuple[str, ...]:
    """The member clusters that export the service: they define it, or have endpoints of it."""
    return tuple(sorted(n for n in {name for name, _ in service.addresses} | service.clusters if n))


def service_import(service: Service) -> Obj:
    """The ServiceImport of one service (one with a clusterset IP)."""
    ports = import_ports(service.ports)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": service.name, "namespace": service.namespace, "labels": {MANAGED_BY: MANAGER}},
        "spec": {"type": "ClusterSetIP", "ips": [service.vip], "ports": ports},
        "status": {"clusters": [{"cluster": name} for name in exporters(service)]},
    }


def export_conditions(
    own: tuple[ServicePort, ...] | None, wanted: Obj | None, before: list[Obj], now: str
) -> list[Obj]:
    """The conditions of a ServiceExport whose cluster exports ``own`` ports (None: no Service in
    the mesh there), given the service's ServiceImport (None: none), its ``before`` conditions."""
    if own is None or wanted is None:
        found = [("Valid", "False", "NoService", "no Service of this name in the mesh in this cluster")]
    else:
        mesh = wanted["spec"]["ports"]
        mine = import_ports(own)
        conflict = (
            (
                "Conflict",
                "True",
                "PortConflict",
                f"this cluster exports {_ports(mine)}; the mesh uses the oldest export's: {_ports(mesh)}",
            )
            if mine != mesh
            else ("Conflict", "False", "NoConflict", "")
        )
        found = [("Valid", "True", "Exported", ""), conflict]
    old = {c.get("type"): c for c in before}
    out = []
    for kind, status, reason, message in found:
        previous = old.get(kind) or {}
        since = previous.get("lastTransitionTime") if previous.get("status") == status else None
        out.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since or now,
            }
        )
    return out


def _ports(ports: list[Obj]) -> str:
    return ", ".join(
        f"{p['name']} {p['port']}" + (f" ({p['appProtocol']})" if "appProtocol" in p else "") for p in ports
    )


def _without_times(conditions: list[Obj]) -> list[Obj]:
    return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conditions]


class Desired:
    """``desired(view)`` with each service's ServiceImport made once per distinct content: a new
    view that changes endpoints only (the common case) reuses every object, and gives back the very
    same mapping, which the writers then know they have written (Members.write_imports). A service
    whose Service object is the one of the last view (views share unchanged services) is not even
    looked at again."""

    def __init__(self) -> None:
        self._made: dict[ServiceKey, tuple[Service, str, object, Obj]] = {}
        self._out: dict[str, Obj] = {}

    def __call__(self, view: MeshView) -> dict[str, Obj]:
        out: dict[str, Obj] = {}
        made: dict[ServiceKey, tuple[Service, str, object, Obj]] = {}
        fresh = False
        for key, service in view.services.items():
            if not service.vip:
                continue
            known = self._made.get(key)
            if known is not None and known[0] is service:
                made[key] = known
                out[known[1]] = known[3]
                continue
            name = str(key)
            inputs = (service.ports, service.vip, exporters(service))
            if known is not None and known[2] == inputs:
                obj = known[3]
            else:
                obj, fresh = service_import(service), True
            made[key] = (service, name, inputs, obj)
            out[name] = obj
        self._made = made
        if fresh or out.keys() != self._out.keys():
            self._out = out
        return self._out


def _same(written: Obj, wanted: Obj) -> bool:
    labels = (written.get("metadata") or {}).get("labels") or {}
    return (
        labels.get(MANAGED_BY) == MANAGER
        and written.get("spec") == wanted["spec"]
        and written.get("status") == wanted["status"]
    )


class ImportWriter(ClusterWriter):
    """Keeps one member cluster's ServiceImports equal to the wanted ones."""

    what = "ServiceImports"

    def __init__(
        self,
        cluster: str,
        connect: Callable[[], Awaitable[client.ApiClient]],
        exports: Callable[[], Mapping[str, tuple[Obj, tuple[ServicePort, ...] | None]]] = dict,
        *,
        recheck: float = 60.0,
        resync: float = 300.0,
        backoff: tuple[float, float] = (1.0, 30.0),
        timeout: float = 10.0,
    ) -> None:
        super().__init__(cluster, connect, resync=resync, backoff=backoff)
        self.exports = exports  # the cluster's ServiceExports and the ports it exports them with
        self.recheck, self.timeout = recheck, timeout
        self._wanted: Mapping[str, Obj] | None = None
        self._written: dict[str, Obj] | None = None  # None: list before writing
        self._listed_at = 0.0
        self.installed: bool | None = None  # the CRD: None = not asked yet
        self.writes = 0
        self.skipped: set[str] = set()  # wanted, but their namespace does not exist here
        self.foreign: set[str] = set()  # wanted, but a ServiceImport that isthmus did not make is there

    def wake(self) -> None:
        """Write again what is wanted (the cluster's ServiceExports or Services changed)."""
        if self._wanted is not None:
            self._wake.set()

    def want(self, wanted: Mapping[str, Obj]) -> None:
        """The ServiceImports this cluster should have (namespace/name -> object); latest wins."""
        self._wanted = wanted
        self._wake.set()

    def status(self) -> dict[str, object]:
        return {
            "installed": self.installed,
            "imports": len(self._written or {}),
            "writes": self.writes,
            "skipped_namespaces": sorted({k.split("/", 1)[0] for k in self.skipped}),
            "error": self.error,
        }

    def interval(self) -> float:
        return self.recheck if self.installed is False else self.resync

    def ready(self) -> bool:
        return self._wanted is not None

    def forget(self) -> None:
        self._written = None  # re-list: undo others' edits, see a new CRD

    async def write(self, api: Any) -> None:
        assert self._wanted is not None
        await self._sync(api, self._wanted)

    async def _sync(self, api: Any, wanted: Mapping[str, Obj]) -> None:
        await self._imports(api, wanted)
        await self._export_statuses(api, wanted)

    async def _imports(self, api: Any, wanted: Mapping[str, Obj]) -> None:
        if self._written is None or time.monotonic() - self._listed_at > self.resync:
            try:
                listed = await api.list_cluster_custom_object(
                    GROUP,
                    VERSION,
                    PLURAL,
                    label_selector=f"{MANAGED_BY}={MANAGER}",
                    _request_timeout=self.timeout,
                )
            except client.ApiException as exc:
                if exc.status == 404:
                    if self.installed is not False:
                        log.info(
                            "cluster %s has no ServiceImport CRD: no ServiceImports written", self.cluster
                        )
                    self.installed = False
                    return
                raise
            if self.installed is not True:
                log.info("cluster %s: writing ServiceImports", self.cluster)
            self.installed = True
            self._written = {
                f"{o['metadata']['namespace']}/{o['metadata']['name']}": o for o in listed.get("items", [])
            }
            self._listed_at = time.monotonic()
            self.foreign = set()  # try them again: their owner may have deleted them
        written = self._written
        skipped: set[str] = set()
        for key, obj in wanted.items():
            have = written.get(key)
            if have is not None and _same(have, obj):
                continue
            if have is None and key in self.foreign:
                continue  # until the next listing: maybe its owner deleted it
            made = await self._write(api, obj, have)
            if made is None:
                skipped.add(key)
            elif made is FOREIGN:
                if key not in self.foreign:
                    log.warning(
                        "cluster %s: ServiceImport %s exists and is not isthmus's: left alone",
                        self.cluster,
                        key,
                    )
                self.foreign.add(key)
            else:
                written[key] = made
        for key in [k for k in written if k not in wanted]:
            namespace, name = key.split("/", 1)
            try:
                await api.delete_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, _request_timeout=self.timeout
                )
                self.writes += 1
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
            del written[key]
        self.skipped = skipped

    async def _export_statuses(self, api: Any, wanted: Mapping[str, Obj]) -> None:
        """Write the conditions of every ServiceExport of the cluster that has other ones."""
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for key, (export, own) in self.exports().items():
            status = export.get("status") or {}
            before = list(status.get("conditions") or [])
            conditions = export_conditions(own, wanted.get(key), before, now)
            if _without_times(conditions) == _without_times(before):
                continue
            meta = export["metadata"]
            body = {**export, "status": {**status, "conditions": conditions}}
            try:
                await api.replace_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    meta["namespace"],
                    EXPORTS,
                    meta["name"],
                    body,
                    _request_timeout=self.timeout,
                )
                self.writes += 1
            except client.ApiException as exc:
                if exc.status not in (404, 409):  # gone, or changed since watched: its event wakes us
                    raise  # (ClusterWatcher.on_exports -> ImportWriter.wake)

    async def _write(self, api: Any, obj: Obj, have: Obj | None) -> Obj | None:
        """Create or replace ``obj`` (spec, then status); None when its namespace does not exist,
        FOREIGN when a ServiceImport of that name exists that isthmus did not make."""
        meta = obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        body = dict(obj)  # with its status, which an API server keeps when status is no subresource
        try:
            if have is None:
                made = await api.create_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, body, _request_timeout=self.timeout
                )
            else:
                body = {**body, "metadata": {**meta, "resourceVersion": have["metadata"]["resourceVersion"]}}
                made = await api.replace_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, body, _request_timeout=self.timeout
                )
            self.writes += 1
            if made.get("status") != obj["status"]:  # status is a subresource (the MCS CRD's is)
                made = await api.replace_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, PLURAL, name, {**made, "status": obj["status"]},
                    _request_timeout=self.timeout,
                )  # fmt: skip
                self.writes += 1
        except client.ApiException as exc:
            if exc.status == 404 and have is None:
                return None  # no such namespace in this cluster (or the CRD just went: re-listed)
            if exc.status == 409 and have is None:
                existing = await api.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, _request_timeout=self.timeout
                )
                labels = (existing.get("metadata") or {}).get("labels") or {}
                if labels.get(MANAGED_BY) != MANAGER:
                    return FOREIGN  # another MCS implementation's
                return await self._write(api, obj, dict(existing))  # another replica's: ours to keep
            raise  # 409 on replace: changed since listed; the error path lists again
        return dict(made)
