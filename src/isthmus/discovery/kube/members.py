"""Membership: which member clusters are watched, with which credentials, added and removed live.

Sources of kubeconfigs: ``--cluster NAME=PATH`` (repeatable), ``--kubeconfig-dir DIR`` (one
file per cluster, file name = cluster name, extension dropped), and labelled Secrets in the
control plane's own cluster (``secrets.py``). Files are polled, Secrets watched; when a name is
declared twice, a file wins over a Secret. A new declaration adds a cluster, a removed one
removes it (its shard is dropped), a changed kubeconfig rotates its credentials without a gap: a
new watcher is started beside the old one, and only once it has synced does it take over the
shard and the old one stop. A refused or unreadable kubeconfig is reported in the log and in
``status`` and never affects the other clusters.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.kube.cluster import SOURCE, ClusterPolicy, ClusterWatcher
from isthmus.discovery.kube.kubeconfig import Credentials, KubeconfigError
from isthmus.discovery.kube.mcs import ImportWriter
from isthmus.discovery.kube.reflector import Timing
from isthmus.discovery.kube.reviews import Review, Reviewer
from isthmus.discovery.kube.route_status import RouteStatusWriter
from isthmus.discovery.kube.secrets import SecretMembers
from isthmus.discovery.model import MeshView

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Member:
    watcher: ClusterWatcher
    task: asyncio.Task[None]


class Members:
    """Runs one ClusterWatcher per member cluster and keeps the set in line with the kubeconfigs."""

    def __init__(
        self,
        aggregator: Aggregator,
        static: Mapping[str, Path] | None = None,
        directory: Path | None = None,
        policy: Callable[[str], ClusterPolicy] | None = None,
        timing: Timing | None = None,
        poll_interval: float = 2.0,
        secrets: SecretMembers | None = None,
        service_imports: bool = False,
        route_status: bool = False,
    ) -> None:
        self.aggregator = aggregator
        self.static = dict(static or {})
        self.directory = directory
        self.secrets = secrets
        self._wake = asyncio.Event()
        if secrets is not None:
            secrets.on_change = self._wake.set
        self._policy = policy or (lambda name: ClusterPolicy())
        self.timing = timing
        self.poll_interval = poll_interval
        self.members: dict[str, _Member] = {}
        self._warming: dict[str, _Member] = {}
        self.errors: dict[str, str] = {}
        self.origins: dict[str, str] = {}
        self.removed: dict[str, str] = {}  # cluster -> when it was removed (ISO 8601, UTC)
        self._reviewers: dict[str, Reviewer] = {}  # cluster -> TokenReviews with its credentials
        self.on_pods: Callable[[str, Collection[str] | None], None] | None = None  # ClusterWatcher.on_pods
        # ServiceImports written into each member cluster (discovery.kube.mcs), if on.
        self.service_imports = service_imports
        self._writers: dict[str, tuple[ImportWriter, asyncio.Task[None]]] = {}
        self._imports: Mapping[str, dict[str, object]] | None = None
        # The status of GAMMA routes written into each member cluster (discovery.kube.route_status).
        self.route_status = route_status
        self._route_writers: dict[str, tuple[RouteStatusWriter, asyncio.Task[None]]] = {}
        self._route_view: MeshView | None = None
        self._reconciled = False  # the members were reconciled at least once
        self._read_found: object | None = None  # the Secrets' findings last reconciled

    def set_policy(self, policy: Callable[[str], ClusterPolicy]) -> None:
        """Each member cluster's policy from now on (the settings in force changed)."""
        self._policy = policy
        for name, member in [*self.members.items(), *self._warming.items()]:
            member.watcher.set_policy(policy(name))

    # ---- reading kubeconfigs ------------------------------------------------------------

    def _sources(self) -> dict[str, Path]:
        found = dict(self.static)
        if self.directory is not None and self.directory.is_dir():
            for path in sorted(self.directory.iterdir()):
                if path.is_file() and not path.name.startswith("."):
                    found.setdefault(path.stem, path)
        return found

    def read(self) -> dict[str, Credentials]:
        wanted: dict[str, Credentials] = {}
        errors: dict[str, str] = {}
        origins: dict[str, str] = {}
        for name, path in self._sources().items():
            origins[name] = f"file {path}"
            try:
                wanted[name] = Credentials.parse(name, path.read_text(), str(path))
            except (OSError, KubeconfigError) as exc:
                errors[name] = str(exc)
                if self.errors.get(name) != str(exc):
                    log.error("cluster %s refused: %s", name, exc)
        if self.secrets is not None:
            found = self.secrets.found
            self._read_found = found
            for name, origin in found.origins.items():
                if name in origins:
                    if self.origins.get(name) != origins[name]:
                        log.warning("cluster %s: %s ignored; %s declares it", name, origin, origins[name])
                    continue
                origins[name] = origin
                if name in found.credentials:
                    wanted[name] = found.credentials[name]
                else:
                    errors[name] = found.errors[name]
        self.errors = errors
        self.origins = origins
        return wanted

    # ---- reconciling ---------------------------------------------------------------------

    def _start(self, credentials: Credentials, publish: bool) -> _Member:
        watcher = ClusterWatcher(credentials, self.aggregator, self._policy(credentials.cluster), self.timing)
        watcher.publish = publish
        watcher.on_pods = self._pods_changed
        watcher.on_exports = self._exports_changed
        watcher.on_routes = self._routes_changed
        task = asyncio.create_task(watcher.run(), name=f"cluster-{credentials.cluster}")
        task.add_done_callback(lambda t: self._ended(credentials.cluster, t))
        return _Member(watcher, task)

    def _ended(self, name: str, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("cluster %s watcher failed: %r", name, task.exception())

    async def reconcile(self) -> None:
        wanted = self.read()
        for name in [n for n in self.members if n not in wanted and n not in self.errors]:
            log.info("cluster %s removed from the mesh", name)
            self.removed[name] = _iso(time.time())
            await _stop(self.members.pop(name))
            warming = self._warming.pop(name, None)
            if warming is not None:
                await _stop(warming)
            self.aggregator.remove_shard(SOURCE, name)
            await self._stop_writer(name)
            reviewer = self._reviewers.pop(name, None)
            if reviewer is not None:
                await reviewer.close()
        for name, credentials in wanted.items():
            current = self.members.get(name)
            if current is None:
                self.removed.pop(name, None)
                log.info("cluster %s added to the mesh", name)
                self.members[name] = self._start(credentials, publish=True)
                self._start_writer(name)
            elif current.watcher.credentials.digest != credentials.digest:
                warming = self._warming.get(name)
                if warming is None or warming.watcher.credentials.digest != credentials.digest:
                    if warming is not None:
                        await _stop(warming)
                    log.info("cluster %s: credentials changed; warming a new watcher", name)
                    self._warming[name] = self._start(credentials, publish=False)
        for name, warming in list(self._warming.items()):
            if warming.watcher.synced.is_set():
                old = self.members[name]
                self.members[name] = warming
                del self._warming[name]
                warming.watcher.publish_now()
                await _stop(old)
                log.info("cluster %s: switched to the new credentials", name)
        self._reconciled = True

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                if self.secrets is not None:
                    tasks.create_task(self.secrets.run(), name="member-secrets")
                tasks.create_task(self._reconcile_loop(), name="member-reconcile")
        finally:
            for member in [*self.members.values(), *self._warming.values()]:
                await _stop(member)
            for name in {*self._writers, *self._route_writers}:
                await self._stop_writer(name)
            for reviewer in self._reviewers.values():
                await reviewer.close()

    # ---- ServiceImports --------------------------------------------------------------------

    def write_imports(self, wanted: Mapping[str, dict[str, object]]) -> None:
        """The ServiceImports every member cluster should have (mcs.Desired of the view); the same
        mapping again (a view that changed no import) wakes nobody."""
        if wanted is self._imports:
            return
        self._imports = wanted
        for writer, _ in self._writers.values():
            writer.want(wanted)

    def _exports_changed(self, cluster: str) -> None:
        found = self._writers.get(cluster)
        if found is not None:
            found[0].wake()

    def write_route_status(self, view: MeshView) -> None:
        """The view the member clusters' route status is computed from (a complete one)."""
        self._route_view = view
        for writer, _ in self._route_writers.values():
            writer.want(view)

    def _routes_changed(self, cluster: str) -> None:
        found = self._route_writers.get(cluster)
        if found is not None:
            found[0].wake()

    def _start_writer(self, name: str) -> None:
        """The writers into member cluster ``name``: ServiceImports, route status (if on)."""

        async def connect() -> Any:  # the member's current credentials (rotated ones included)
            return await self.members[name].watcher.credentials.api_client()

        if self.route_status and name not in self._route_writers:

            def reads() -> Any:
                member = self.members.get(name)
                return member.watcher.routes_read if member is not None else ()

            # After a change of the routes read, wait for the view (the aggregator's debounce, and more).
            settle = max(1.0, 2 * self.aggregator.max_delay)
            status = RouteStatusWriter(name, connect, reads, settle=settle)
            if self._route_view is not None:
                status.want(self._route_view)
            self._route_writers[name] = (
                status,
                asyncio.create_task(status.run(), name=f"route-status-{name}"),
            )
        if not self.service_imports or name in self._writers:
            return

        def exports() -> Any:
            member = self.members.get(name)
            return member.watcher.service_exports() if member is not None else {}

        writer = ImportWriter(name, connect, exports)
        if self._imports is not None:
            writer.want(self._imports)
        self._writers[name] = (writer, asyncio.create_task(writer.run(), name=f"imports-{name}"))

    async def _stop_writer(self, name: str) -> None:
        for writers in (self._writers, self._route_writers):
            found = writers.pop(name, None)
            if found is not None:
                found[1].cancel()
                await asyncio.wait(
                    [found[1]]
                )  # not `await task`: a cancellation of ours must not be swallowed

    async def _reconcile_loop(self) -> None:
        """Reconcile every ``poll_interval`` (files), at once when the Secrets change, and while a
        rotated watcher warms up (so it takes over as soon as it has synced)."""
        while True:
            self._wake.clear()
            await self.reconcile()
            interval = min(self.poll_interval, 0.1) if self._warming else self.poll_interval
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()

    def all_synced(self) -> bool:
        """Every member cluster declared is watched and has synced: the kubeconfigs and the member
        Secrets (once listed) were reconciled into watchers, and each watcher has synced."""
        if not self._reconciled:
            return False
        if self.secrets is not None and not (
            self.secrets.synced.is_set() and self._read_found is self.secrets.found
        ):
            return False  # listed, but not reconciled into watchers yet
        return all(m.watcher.synced.is_set() for m in self.members.values())

    def status(self) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {}
        for name, member in sorted(self.members.items()):
            w = member.watcher
            out[name] = {
                "state": w.state.value,
                "detail": w.detail,
                "rotating": name in self._warming,
                "source": self.origins.get(name, ""),
            }
            if w.degraded:
                out[name]["degraded"] = dict(sorted(w.degraded.items()))
            heard = w.last_heard()
            if heard is not None:
                out[name]["last_sync"] = _iso(heard)
            if w.unreachable_since is not None:
                out[name]["unreachable_since"] = _iso(time.time() - (time.monotonic() - w.unreachable_since))
            if name in self._writers:
                out[name]["service_imports"] = self._writers[name][0].status()
            if name in self._route_writers:
                out[name]["route_status"] = self._route_writers[name][0].status()
        for name, error in self.errors.items():
            out.setdefault(
                name,
                {
                    "state": "refused",
                    "detail": error,
                    "rotating": False,
                    "source": self.origins.get(name, ""),
                },
            )
        for name, when in self.removed.items():
            out.setdefault(name, {"state": "removed", "detail": f"removed at {when}", "rotating": False})
        return out

    async def review(self, cluster: str, token: str, audiences: tuple[str, ...]) -> Review:
        """Ask member cluster ``cluster``'s API server who ``token`` belongs to (a TokenReview with
        the credentials isthmus watches it with)."""
        member = self.members.get(cluster)
        if member is None:
            return Review(False, error=f"no member cluster named {cluster!r}")
        reviewer = self._reviewers.get(cluster)
        credentials = member.watcher.credentials
        if reviewer is None or reviewer.key != credentials.digest:
            if reviewer is not None:
                await reviewer.close()
            reviewer = self._reviewers[cluster] = Reviewer(credentials.api_client, key=credentials.digest)
        return await reviewer.review(token, audiences)

    def _pods_changed(self, cluster: str, keys: Collection[str] | None) -> None:
        if self.on_pods is not None:
            self.on_pods(cluster, keys)

    def node_locality(self, cluster: str, node: str) -> tuple[str, str] | None:
        """(region, zone) of Node ``node`` of member cluster ``cluster`` (ClusterWatcher.node_locality)."""
        member = self.members.get(cluster)
        return None if member is None else member.watcher.node_locality(node)

    def node_localities(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(member cluster, node) -> (region, zone) of every Node the members' watches hold."""
        return {
            (cluster, node): locality
            for cluster, member in self.members.items()
            for node, locality in member.watcher.node_localities().items()
        }

    def pod_uid(self, cluster: str, namespace: str, name: str) -> str | None:
        """The uid of a pod of member cluster ``cluster`` (ClusterWatcher.pod_uid; "" if unknown)."""
        member = self.members.get(cluster)
        return "" if member is None else member.watcher.pod_uid(namespace, name)

    def membership_status(self) -> dict[str, object]:
        """Where member clusters come from, and whether the Secrets source is in touch."""
        out: dict[str, object] = {
            "files": sorted(str(p) for p in self.static.values()),
            "kubeconfig_dir": str(self.directory) if self.directory is not None else None,
        }
        if self.secrets is not None:
            out["secrets"] = {
                "source": self.secrets.source,
                "synced": self.secrets.synced.is_set(),
                "detail": self.secrets.detail,
            }
        return out


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


async def _stop(member: _Member) -> None:
    member.task.cancel()
    await asyncio.wait([member.task])  # not `await task`: a cancellation of ours must not be swallowed
