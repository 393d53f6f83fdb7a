"""The project's own configuration API in the home cluster: the MemberCluster and MeshConfig objects
(isthmus.io/v1alpha1, api/protos/isthmus/api/v1alpha1/, CRDs deploy/crds/) of one namespace.

* ``ConfigApi`` lists and watches both kinds (two Reflectors) and tells its owner what they ask
  for, every replica alike. MemberClusters: each cluster's drain target, ``spec.drain.weight`` (no
  drain: 100); ``desired()`` is the latest targets, ``applied()`` the weights the status last
  recorded (where a restarted replica resumes from). MeshConfig: the one named ``default`` sets
  mesh-wide settings over the flags; ``mesh_overrides()`` turns its spec into the ``isthmus serve``
  settings it sets (isthmus.settings validates them in combination). An object that does not
  parse into its generated message is reported and ignored.
* ``set_drain`` writes a cluster's target into its object (creating it if needed): what the admin
  API's POST /drain and /undrain do when the configuration API is on, so that every replica follows.
* Status is written by one replica: the holder of the Lease ``isthmus-status`` in the same
  namespace (coordination.k8s.io/v1, taken when free or expired, renewed every third of its
  duration, given up on shutdown); the others only read. It writes what its owner reports
  (``Report``): drain progress and conditions (Accepted, Synced) of each MemberCluster, creating
  the object of a member cluster that has none; the settings in force and conditions (Accepted,
  Applied) of the MeshConfig, only where they differ from what is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from kubernetes_asyncio import client

from isthmus.api.v1alpha1 import member_cluster_pb2, mesh_pb2
from isthmus.discovery.kube import trim
from isthmus.discovery.kube.reflector import Obj, Reflector, Timing
from isthmus.discovery.kube.secrets import home_api_client
from isthmus.discovery.model import FULL_WEIGHT

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "isthmus.io", "v1alpha1", "memberclusters", "MemberCluster"
MESH_PLURAL, MESH_KIND = "meshconfigs", "MeshConfig"
MESH_CONFIG = "default"  # the one MeshConfig read; others get Accepted=False, reason NotRead
LEASE = "isthmus-status"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _rfc3339(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def drain_target(obj: Obj) -> int:
    """An object's drain target (ValueError when it is not a valid MemberCluster spec)."""
    spec = member_cluster_pb2.MemberClusterSpec()
    try:
        json_format.ParseDict(obj.get("spec") or {}, spec)
    except json_format.ParseError as exc:
        raise ValueError(str(exc)) from None
    if spec.HasField("drain") and spec.drain.HasField("weight"):
        if not 0 <= spec.drain.weight <= FULL_WEIGHT:
            raise ValueError(f"spec.drain.weight {spec.drain.weight} is not in 0..100")
        return int(spec.drain.weight)
    return FULL_WEIGHT


def mesh_overrides(obj: Obj) -> dict[str, object]:
    """The ``isthmus serve`` settings (ServeSettings field -> value) a MeshConfig's spec sets: only
    its set fields (ValueError when it is not a valid MeshConfig spec)."""
    spec = mesh_pb2.MeshConfigSpec()
    try:
        json_format.ParseDict(obj.get("spec") or {}, spec)
    except json_format.ParseError as exc:
        raise ValueError(str(exc)) from None
    out: dict[str, object] = {}
    if spec.trust_domain:
        out["trust_domain"] = spec.trust_domain
    if spec.HasField("export_policy"):
        out["export_policy"] = mesh_pb2.MeshConfigSpec.ExportPolicy.Name(spec.export_policy)
    for name, setting in (("max_staleness", "max_staleness"), ("withdraw_after", "withdraw_after")):
        if spec.HasField(name):
            out[setting] = getattr(spec, name).ToTimedelta().total_seconds()
    if spec.HasField("debounce"):
        for name, setting in (("quiet", "debounce_quiet"), ("max", "debounce_max")):
            if spec.debounce.HasField(name):
                out[setting] = getattr(spec.debounce, name).ToTimedelta().total_seconds()
    if spec.gateways:
        clusters = [gateway.cluster for gateway in spec.gateways]
        if len(set(clusters)) != len(clusters):
            raise ValueError("spec.gateways names a cluster twice")
        out["cluster_gateways"] = tuple((g.cluster, g.address, g.port) for g in spec.gateways)
    if spec.clusterset_range:
        out["clusterset_range"] = spec.clusterset_range
    return out


@dataclass(frozen=True, slots=True)
class Condition:
    """A condition to report on an object (written as metav1.Condition)."""

    type: str
    status: bool
    reason: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class Report:
    """What the owner of a ConfigApi wants the status to say, asked for every second."""

    drains: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # cluster -> progress
    synced: Mapping[str, Condition] = field(default_factory=dict)  # cluster -> its Synced condition
    in_force: Sequence[tuple[str, str, str]] = ()  # MeshConfig settings: (field, value, source)
    mesh: Sequence[Condition] = ()  # the MeshConfig's conditions beyond Accepted (e.g. Applied)
    mesh_error: str | None = None  # why the MeshConfig is not in force (Accepted=False)


def conditions(
    wanted: Sequence[Condition], old: Sequence[Mapping[str, Any]], generation: int
) -> list[Mapping[str, Any]]:
    """``wanted`` as metav1.Conditions, keeping the transition time of each one whose status did not
    change, and the stored conditions of other types (written by someone else)."""
    stored = {str(c.get("type")): c for c in old}
    out: list[Mapping[str, Any]] = []
    for c in wanted:
        status = "True" if c.status else "False"
        before = stored.pop(c.type, None)
        since = before.get("lastTransitionTime") if before and before.get("status") == status else None
        out.append(
            {
                "type": c.type,
                "status": status,
                "reason": c.reason,
                "message": c.message[:32768],
                "lastTransitionTime": since or _now().strftime("%Y-%m-%dT%H:%M:%SZ"),
                "observedGeneration": generation,
            }
        )
    return [*out, *stored.values()]


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two statuses equal but for the times they were written."""

    def strip(status: Mapping[str, Any]) -> Any:
        out = dict(status)
        if isinstance(out.get("drain"), dict):
            out["drain"] = {k: v for k, v in out["drain"].items() if k != "updated"}
        out["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in out.get("conditions") or ()
        ]
        return out

    return bool(strip(a) == strip(b))


class ConfigApi:
    """The MemberClusters and MeshConfigs of ``namespace`` in the home cluster, and the status Lease."""

    def __init__(
        self,
        namespace: str,
        identity: str,
        on_change: Callable[[], None],
        kubeconfig: str | None = None,
        timing: Timing | None = None,
        lease_seconds: int = 15,
        connect: Callable[[], Awaitable[client.ApiClient]] | None = None,
        on_mesh: Callable[[], None] | None = None,
    ) -> None:
        self.namespace = namespace
        self.identity = identity  # this replica, as the Lease names its holder
        self.on_change = on_change  # a MemberCluster changed
        self.on_mesh = on_mesh or (lambda: None)  # a MeshConfig changed
        self.lease_seconds = lease_seconds
        self._connect = connect or (lambda: home_api_client(kubeconfig))
        self._api: client.ApiClient | None = None
        self._timing = timing
        self.reflector: Reflector | None = None  # MemberClusters
        self.meshes: Reflector | None = None  # MeshConfigs
        self.errors: dict[str, str] = {}  # cluster -> why its object is ignored
        self.leading = False
        self._uncreatable: set[str] = set()  # member clusters whose name the CRD refuses

    # ---- what the objects say -------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return all(r is not None and r.synced.is_set() for r in (self.reflector, self.meshes))

    def mesh_config(self) -> Obj | None:
        """The MeshConfig named ``default``, if there is one."""
        for obj in (self.meshes.store if self.meshes is not None else {}).values():
            if (obj.get("metadata") or {}).get("name") == MESH_CONFIG:
                return obj
        return None

    def desired(self) -> dict[str, int]:
        """Drain targets by cluster name (objects that do not parse are left out, in ``errors``)."""
        out: dict[str, int] = {}
        errors: dict[str, str] = {}
        for obj in (self.reflector.store if self.reflector is not None else {}).values():
            name = str((obj.get("metadata") or {}).get("name", ""))
            try:
                out[name] = drain_target(obj)
            except ValueError as exc:
                errors[name] = str(exc)
        for name, why in errors.items():
            if self.errors.get(name) != why:
                log.error("MemberCluster %s/%s ignored: %s", self.namespace, name, why)
        self.errors = errors
        return out

    def applied(self) -> dict[str, int]:
        """The drain weights the objects' status last recorded (where a restart resumes)."""
        out = {}
        for obj in (self.reflector.store if self.reflector is not None else {}).values():
            weight = ((obj.get("status") or {}).get("drain") or {}).get("weight")
            if isinstance(weight, int) and 0 <= weight <= FULL_WEIGHT:
                out[str(obj["metadata"]["name"])] = weight
        return out

    # ---- writes -----------------------------------------------------------------------------

    async def _client(self) -> client.ApiClient:
        if self._api is None:
            self._api = await self._connect()
        return self._api

    async def set_drain(self, cluster: str, weight: int) -> None:
        """Write ``cluster``'s drain target (merge patch; the object is created if missing)."""
        custom = client.CustomObjectsApi(await self._client())
        body = {"spec": {"drain": {"weight": weight}}}
        try:
            await custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                cluster,
                body,
                _content_type="application/merge-patch+json",
            )
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": cluster}, **body}
            await custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, obj)

    async def write_status(self, report: Report) -> int:
        """As the Lease holder: the status of every object from ``report``, where it differs from
        what is stored; returns how many were written."""
        if not self.leading or self.reflector is None or self.meshes is None:
            return 0
        written = await self._create_missing(report)
        for obj in list(self.reflector.store.values()):
            written += await self._write(PLURAL, obj, self._member_status(obj, report))
        for obj in list(self.meshes.store.values()):
            written += await self._write(MESH_PLURAL, obj, self._mesh_status(obj, report))
        return written

    async def _create_missing(self, report: Report) -> int:
        """A MemberCluster object for every member cluster that has none, so that an operator can
        ``kubectl patch`` a drain into it (and read its conditions) from the start."""
        assert self.reflector is not None
        have = {str((o.get("metadata") or {}).get("name", "")) for o in self.reflector.store.values()}
        made = 0
        for name in sorted(set(report.synced) - have - self._uncreatable):
            custom = client.CustomObjectsApi(await self._client())
            obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": name}, "spec": {}}
            try:
                await custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, obj)
                made += 1
            except client.ApiException as exc:
                if exc.status == 409:  # made meanwhile (another replica, an operator)
                    continue
                if exc.status in (400, 422):  # a name the CRD refuses: say so once
                    self._uncreatable.add(name)
                    log.warning("no MemberCluster object can be named %r: %s", name, exc.reason)
                    continue
                raise
        return made

    def _member_status(self, obj: Obj, report: Report) -> dict[str, Any]:
        name = str(obj["metadata"]["name"])
        status = dict(obj.get("status") or {})
        state = report.drains.get(name)
        if state is not None:
            status["drain"] = {
                "weight": int(state["weight"]),
                "state": str(state["state"]),
                "proxiesWaiting": len(state.get("waiting_for") or ()),
                "updated": _now().strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        error = self.errors.get(name)
        accepted = Condition("Accepted", error is None, "InvalidSpec" if error else "Accepted", error or "")
        synced = report.synced.get(name) or Condition(
            "Synced", False, "NotAMember", f"isthmus has no member cluster named {name}"
        )
        generation = int((obj.get("metadata") or {}).get("generation") or 0)
        status["conditions"] = conditions([accepted, synced], status.get("conditions") or (), generation)
        return status

    def _mesh_status(self, obj: Obj, report: Report) -> dict[str, Any]:
        name = str(obj["metadata"]["name"])
        status = dict(obj.get("status") or {})
        generation = int((obj.get("metadata") or {}).get("generation") or 0)
        if name != MESH_CONFIG:
            why = f"only the MeshConfig named {MESH_CONFIG} is read; this one sets nothing"
            wanted = [Condition("Accepted", False, "NotRead", why)]
        elif report.mesh_error is not None:
            why = f"not applied, the settings in force stay: {report.mesh_error}"
            wanted = [Condition("Accepted", False, "InvalidSpec", why)]
        else:
            wanted = [Condition("Accepted", True, "Accepted"), *report.mesh]
        if name == MESH_CONFIG:
            status["inForce"] = [
                {"name": field, "value": value, "source": source} for field, value, source in report.in_force
            ]
        status["conditions"] = conditions(wanted, status.get("conditions") or (), generation)
        return status

    async def _write(self, plural: str, obj: Obj, status: dict[str, Any]) -> int:
        if _same(status, obj.get("status") or {}):
            return 0
        custom = client.CustomObjectsApi(await self._client())
        name = str(obj["metadata"]["name"])
        try:
            await custom.replace_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, plural, name, {**obj, "status": status}
            )
        except client.ApiException as exc:
            if exc.status not in (404, 409):  # gone, or changed since watched: the next round
                raise
            return 0
        return 1

    # ---- the Lease ----------------------------------------------------------------------------

    async def lead_once(self) -> bool:
        """Take or renew the status Lease if it is free, expired or ours; whether this replica leads."""
        leases = client.CoordinationV1Api(await self._client())
        now = _now()
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.lease_seconds,
            "renewTime": _rfc3339(now),
        }
        try:
            lease = await leases.read_namespaced_lease(LEASE, self.namespace)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            body = {"metadata": {"name": LEASE}, "spec": {**spec, "acquireTime": _rfc3339(now)}}
            try:
                await leases.create_namespaced_lease(self.namespace, body)
            except client.ApiException as conflict:
                if conflict.status != 409:
                    raise
                return self._set_leading(False)
            return self._set_leading(True)
        holder = lease.spec.holder_identity or ""
        renewed = lease.spec.renew_time
        duration = lease.spec.lease_duration_seconds or self.lease_seconds
        expired = renewed is None or (now - renewed).total_seconds() > duration
        if holder != self.identity and not expired:
            return self._set_leading(False)
        lease.spec.holder_identity = self.identity
        lease.spec.lease_duration_seconds = self.lease_seconds
        lease.spec.renew_time = now
        if holder != self.identity:
            lease.spec.acquire_time = now
        try:
            await leases.replace_namespaced_lease(LEASE, self.namespace, lease)
        except client.ApiException as exc:
            if exc.status != 409:  # another replica renewed or took it first
                raise
            return self._set_leading(False)
        return self._set_leading(True)

    def _set_leading(self, leading: bool) -> bool:
        if leading != self.leading:
            log.info(
                "%s the status Lease %s/%s", "holding" if leading else "not holding", self.namespace, LEASE
            )
        self.leading = leading
        return leading

    # ---- run ----------------------------------------------------------------------------------

    async def run(self, report: Callable[[], Report]) -> None:
        """Watch the objects; hold the Lease when free; as its holder, write status every second."""
        api = await self._client()
        custom = client.CustomObjectsApi(api)

        def lister(plural: str) -> Callable[..., Awaitable[Any]]:
            def list_fn(**kw: object) -> Awaitable[Any]:
                result: Awaitable[Any] = custom.list_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, plural, **kw
                )
                return result

            return list_fn

        self.reflector = Reflector(
            KIND, lister(PLURAL), lambda keys: self.on_change(), timing=self._timing, trim=trim.config_object
        )
        self.meshes = Reflector(
            MESH_KIND,
            lister(MESH_PLURAL),
            lambda keys: self.on_mesh(),
            timing=self._timing,
            trim=trim.config_object,
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.reflector.run(), name="config-memberclusters")
                tasks.create_task(self.meshes.run(), name="config-meshconfigs")
                tasks.create_task(self._status_loop(report), name="config-status")
        finally:
            if self.leading:  # let another replica take over at once, not when the Lease expires
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await self.release()
            with contextlib.suppress(Exception):
                await api.close()
            self._api = None

    async def release(self) -> None:
        """Give the status Lease up (on shutdown): its renew time moves into the past."""
        leases = client.CoordinationV1Api(await self._client())
        lease = await leases.read_namespaced_lease(LEASE, self.namespace)
        if lease.spec.holder_identity != self.identity:
            return
        lease.spec.holder_identity = ""
        lease.spec.renew_time = _now() - datetime.timedelta(seconds=2 * self.lease_seconds)
        await leases.replace_namespaced_lease(LEASE, self.namespace, lease)
        self._set_leading(False)

    async def _status_loop(self, report: Callable[[], Report]) -> None:
        renew = max(1.0, self.lease_seconds / 3)
        last_renew = -renew
        loop = asyncio.get_running_loop()
        while True:
            try:
                if loop.time() - last_renew >= renew:
                    await self.lead_once()
                    last_renew = loop.time()
                await self.write_status(report())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("configuration API status: %s", exc)
                self.leading = False
            await asyncio.sleep(1.0)
