"""The project's own configuration API in the home cluster: MemberCluster objects (isthmus.io/v1alpha1,
api/protos/isthmus/api/v1alpha1/member_cluster.proto, CRD deploy/crds/) of one namespace.

* ``MemberClusters`` lists and watches them (a Reflector) and tells its owner each cluster's drain
  target: ``spec.drain.weight`` (no drain: 100), every replica alike; an object that does not parse
  into the generated message is reported and ignored. ``desired()`` is the latest targets,
  ``applied()`` the weights the status last recorded (where a restarted replica resumes from).
* ``set_drain`` writes a cluster's target into its object (creating it if needed): what the admin
  API's POST /drain and /undrain do when the configuration API is on, so that every replica follows.
* Status is written by one replica: the holder of the Lease ``isthmus-status`` in the same
  namespace (coordination.k8s.io/v1, taken when free or expired, renewed every third of its
  duration); the others only read. ``write_status`` is a no-op on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from google.protobuf import json_format
from kubernetes_asyncio import client

from isthmus.api.v1alpha1 import member_cluster_pb2
from isthmus.discovery.kube.reflector import Obj, Reflector, Timing
from isthmus.discovery.kube.secrets import home_api_client
from isthmus.discovery.model import FULL_WEIGHT

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "isthmus.io", "v1alpha1", "memberclusters", "MemberCluster"
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


class MemberClusters:
    """The MemberClusters of ``namespace`` in the home cluster, and the status Lease."""

    def __init__(
        self,
        namespace: str,
        identity: str,
        on_change: Callable[[], None],
        kubeconfig: str | None = None,
        timing: Timing | None = None,
        lease_seconds: int = 15,
        connect: Callable[[], Awaitable[client.ApiClient]] | None = None,
    ) -> None:
        self.namespace = namespace
        self.identity = identity  # this replica, as the Lease names its holder
        self.on_change = on_change
        self.lease_seconds = lease_seconds
        self._connect = connect or (lambda: home_api_client(kubeconfig))
        self._api: client.ApiClient | None = None
        self._timing = timing
        self.reflector: Reflector | None = None
        self.errors: dict[str, str] = {}  # cluster -> why its object is ignored
        self.leading = False

    # ---- what the objects say -------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self.reflector is not None and self.reflector.synced.is_set()

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

    async def write_status(self, progress: Mapping[str, Mapping[str, Any]]) -> int:
        """As the Lease holder: each object's status.drain from the drains' progress (cluster ->
        weight, state, waiting_for), where it differs; returns how many were written."""
        if not self.leading or self.reflector is None:
            return 0
        custom = client.CustomObjectsApi(await self._client())
        written = 0
        for obj in list(self.reflector.store.values()):
            name = str(obj["metadata"]["name"])
            state = progress.get(name)
            if state is None:
                continue
            drain: dict[str, Any] = {
                "weight": int(state["weight"]),
                "state": str(state["state"]),
                "proxiesWaiting": len(state.get("waiting_for") or ()),
            }
            status = dict(obj.get("status") or {})
            old = {k: v for k, v in (status.get("drain") or {}).items() if k != "updated"}
            if old == drain:
                continue
            status["drain"] = {**drain, "updated": _now().strftime("%Y-%m-%dT%H:%M:%SZ")}
            body = {**obj, "status": status}
            try:
                await custom.replace_namespaced_custom_object_status(
                    GROUP, VERSION, self.namespace, PLURAL, name, body
                )
                written += 1
            except client.ApiException as exc:
                if exc.status not in (404, 409):  # gone, or changed since watched: the next round
                    raise
        return written

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

    async def run(self, progress: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        """Watch the objects; hold the Lease when free; as its holder, write status every second."""
        api = await self._client()
        custom = client.CustomObjectsApi(api)

        def list_fn(**kw: object) -> Awaitable[Any]:
            result: Awaitable[Any] = custom.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, **kw
            )
            return result

        self.reflector = Reflector(KIND, list_fn, lambda keys: self.on_change(), timing=self._timing)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.reflector.run(), name="config-memberclusters")
                tasks.create_task(self._status_loop(progress), name="config-status")
        finally:
            with contextlib.suppress(Exception):
                await api.close()
            self._api = None

    async def _status_loop(self, progress: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        renew = max(1.0, self.lease_seconds / 3)
        last_renew = -renew
        loop = asyncio.get_running_loop()
        while True:
            try:
                if loop.time() - last_renew >= renew:
                    await self.lead_once()
                    last_renew = loop.time()
                await self.write_status(progress())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("configuration API status: %s", exc)
                self.leading = False
            await asyncio.sleep(1.0)
