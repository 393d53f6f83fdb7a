"""The go-control-plane peer as a load-tool target: the same simulated Envoys, the same resources.

GcpTarget implements bench.load's Target over bench/peers/gcp (``make bench-peer`` builds it into
.venv/bin/gcp-peer): go-control-plane v0.14's snapshot cache serving ADS (SotW and Delta), fed over
HTTP. The peer generates nothing. Its controller lives here, in the load tool's process: isthmus's
own file-source parser, aggregator and ConfigCache (with an in-memory development CA when mTLS is
on, as `isthmus serve` has without --ca-cert) turn the workload's mesh file into resources, and the
serialized bytes isthmus would send are PUT as one snapshot per member cluster (go-control-plane's
model: one snapshot per node group; the group is the node's locality sub_zone).

What a group's snapshot holds: for the group's representative proxy (the first client of that
cluster), CDS and LDS as generated, EDS and RDS exactly the names its clusters and listeners
reference (isthmus's empty placeholder for a referenced name it has no resource for) and, with
mTLS, the SDS secrets ``default`` and ``ROOTCA``. In ADS mode go-control-plane answers a SotW
request for EDS/RDS only when it names every resource of that type in the snapshot, so a snapshot
must hold exactly what the clients request; isthmus answers such requests with exactly those names
too, so the bytes on the wire match.

Churn: apply_change(i) edits the mesh file's lines, re-parses them, lets the aggregator and the
cache regenerate, compares each group's resources with the last ones sent (bytes per name) and
PATCHes only the groups that changed, with only the resources that changed: the peer builds the
next snapshot from its current Go objects plus those (see bench/peers/gcp/main.go).

Not like for like, in the peer's favour:
- Convergence is timed from the moment the PATCH response arrived (the peer holds the new
  snapshot and has handed the responses to its streams), so this tool's parsing and generation are
  not counted. For isthmus it is timed from the API or file write, so its discovery, debounce and
  generation are. The peer's figure is go-control-plane's push and the wire only.
- Every client of a cluster gets its representative's resources. isthmus generates the inbound
  parts (the inbound cluster, listener and workload certificate) per service and account; the
  peer serves one pod's to all, which is less work than a real controller would have to do.
- Startup (spawn -> every group's snapshot PUT) excludes generating the snapshots, done before.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from bench.adsclient import SECRETS, cluster_info, listener_info
from bench.load import ROOT, Change, MeshFile, Workload, client_node, free_port, proc_usage
from isthmus.discovery.aggregate import Aggregator, shards_of_view
from isthmus.discovery.file import parse_mesh
from isthmus.discovery.model import MeshView
from isthmus.xds import types
from isthmus.xds.ca import MeshCA
from isthmus.xds.cache import ConfigCache
from isthmus.xds.proxy import Proxy, proxy_from_node
from isthmus.xds.resources import Resource

PEER_BINARY = ROOT / ".venv" / "bin" / "gcp-peer"

# What one group's snapshot holds: type URL -> name -> resource.
Group = dict[str, dict[str, Resource]]


class Controller:
    """The peer's controller: the mesh file's lines -> isthmus's MeshView and cache -> per-group
    resources. Not thread-safe; one call at a time (the target serializes them)."""

    def __init__(self, mesh: MeshFile, mtls: bool) -> None:
        self.mesh = mesh
        self.mtls = mtls
        ca = None
        if mtls:
            # `isthmus serve` without --ca-cert/--ca-dir: a development root in memory. Its warning
            # is for operators, not for a benchmark.
            ca_log = logging.getLogger("isthmus.xds.ca")
            level = ca_log.level
            ca_log.setLevel(logging.ERROR)
            try:
                ca = MeshCA.development(None)
            finally:
                ca_log.setLevel(level)
        self.cache = ConfigCache(ca=ca)
        # The file source's path in `isthmus serve`: the view is split into shards and merged by the
        # aggregator, which keeps the Service objects of unchanged services (so the cache reuses
        # their resources). Flushed directly: its debounce loop is never run.
        self.aggregator = Aggregator(self._on_view)
        shape = mesh.workload.shape
        self.proxies: dict[str, Proxy] = {}
        for i in range(shape.clusters):
            member, node = client_node(shape, i)
            self.proxies[member] = proxy_from_node(node)
        self.types = [types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE]
        if mtls:
            self.types.append(types.SECRET)

    def _on_view(self, view: MeshView) -> None:
        self.cache.set_view(view)

    def load(self) -> None:
        """Parse the mesh file's current lines and install the view."""
        view = parse_mesh(self.mesh.text(), "<bench mesh>")
        self.aggregator.set_source("file", shards_of_view(view))
        self.aggregator.flush()

    def group(self, proxy: Proxy) -> Group:
        """What the clients of ``proxy``'s group request, as isthmus would answer them."""
        cache = self.cache
        clusters = dict(cache.resources(types.CLUSTER, proxy).by_name)
        listeners = dict(cache.resources(types.LISTENER, proxy).by_name)
        eds_names = {eds for r in clusters.values() if (eds := cluster_info(r.body)[1]) is not None}
        rds_names = {name for r in listeners.values() for name in listener_info(r.body)[1]}
        out: Group = {
            types.CLUSTER: clusters,
            types.LISTENER: listeners,
            types.ENDPOINT: _named(cache, types.ENDPOINT, proxy, eds_names),
            types.ROUTE: _named(cache, types.ROUTE, proxy, rds_names),
        }
        if self.mtls:
            secrets = cache.resources(types.SECRET, proxy)
            out[types.SECRET] = {name: secrets[name] for name in SECRETS if name in secrets}
        return out

    def groups(self) -> dict[str, Group]:
        return {member: self.group(proxy) for member, proxy in self.proxies.items()}


def _named(cache: ConfigCache, type_url: str, proxy: Proxy, names: Iterable[str]) -> dict[str, Resource]:
    have = cache.resources(type_url, proxy)
    return {name: have.get(name) or cache.placeholder(type_url, name) for name in sorted(names)}


def _b64(resources: Iterable[Resource]) -> list[str]:
    return [base64.b64encode(r.body).decode("ascii") for r in resources]


def diff(old: Group, new: Group) -> tuple[dict[str, list[Resource]], dict[str, list[str]]]:
    """(resources added or changed, names removed), by type URL; empty types left out."""
    changed: dict[str, list[Resource]] = {}
    removed: dict[str, list[str]] = {}
    for type_url in old.keys() | new.keys():
        before, after = old.get(type_url, {}), new.get(type_url, {})
        put = [r for name, r in after.items() if (b := before.get(name)) is None or b.body != r.body]
        gone = [name for name in before if name not in after]
        if put:
            changed[type_url] = put
        if gone:
            removed[type_url] = gone
    return changed, removed


class GcpTarget:
    """bench/peers/gcp (go-control-plane) in a child process, its snapshots computed here."""

    name = "gcp"

    def __init__(
        self, workload: Workload, workdir: Path, args: argparse.Namespace, binary: Path = PEER_BINARY
    ) -> None:
        self.workload = workload
        self.workdir = workdir
        self.binary = binary
        self.mesh = MeshFile(workload, workdir / "mesh.yaml")  # kept as lines, never written
        self.controller = Controller(self.mesh, bool(args.mtls))
        self.xds_address = f"127.0.0.1:{free_port()}"
        self.control_address = f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None
        self.sent: dict[str, Group] = {}
        self.version = 0
        self.startup_s = 0.0
        self.patches = 0
        self._usage = (0.0, 0)

    # ---- the control API (blocking; see apply_change for where it runs) --------------------

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 60) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://{self.control_address}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return bytes(r.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            raise RuntimeError(f"gcp-peer: {method} {path}: HTTP {exc.code}: {detail}") from None

    def _next_version(self) -> str:
        self.version += 1
        return str(self.version)

    def _put(self, member: str, group: Group) -> None:
        resources = {t: _b64(by_name.values()) for t, by_name in group.items()}
        self._call("PUT", f"/snapshot/{member}", {"version": self._next_version(), "resources": resources})
        self.sent[member] = group

    def _patch(self, member: str, group: Group) -> bool:
        """Send ``member`` what changed since the last snapshot; False (and nothing sent) if nothing did."""
        changed, removed = diff(self.sent[member], group)
        if not changed and not removed:
            return False
        body = {
            "version": self._next_version(),
            "set": {t: _b64(rs) for t, rs in changed.items()},
            "remove": removed,
        }
        self._call("PATCH", f"/snapshot/{member}", body)
        self.sent[member] = group
        self.patches += 1
        return True

    def _healthy(self) -> bool:
        try:
            self._call("GET", "/healthz", timeout=1)
            return True
        except (OSError, RuntimeError):
            return False

    def stats(self) -> dict[str, Any]:
        """The peer's GET /stats: streams, requests, responses, groups."""
        return dict(json.loads(self._call("GET", "/stats")))

    # ---- Target -----------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.binary.exists():
            raise RuntimeError(
                f"{self.binary} not found: build the go-control-plane peer with `make bench-peer` (needs Go)"
            )

        def prepare() -> dict[str, Group]:
            self.controller.load()
            return self.controller.groups()

        groups = await asyncio.to_thread(prepare)
        t0 = time.monotonic()
        self.log = (self.workdir / "gcp-peer.log").open("wb")
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - once, before anything is measured
            [str(self.binary), "-xds", self.xds_address, "-control", self.control_address],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        while not await asyncio.to_thread(self._healthy):
            if self.proc.poll() is not None:
                log = self.workdir / "gcp-peer.log"
                raise RuntimeError(f"gcp-peer exited ({self.proc.returncode}); see {log}")
            await asyncio.sleep(0.02)
        for member, group in groups.items():
            await asyncio.to_thread(self._put, member, group)
        self.startup_s = time.monotonic() - t0

    async def apply_change(self, i: int) -> tuple[Change, float]:
        change = self.mesh.change(i)

        def regenerate() -> dict[str, Group]:
            self.controller.load()
            return self.controller.groups()

        groups = await asyncio.to_thread(regenerate)
        # The PATCHes block the event loop on purpose: the peer pushes to its streams before its
        # HTTP response, and bench.load.run only starts watching the change's clients once this
        # returns. Awaiting here would let a client handle (and ACK) the new EDS before that, and
        # the change would never be seen to converge. Nothing runs between the response and the
        # return, so every ACK after it is timed, from the moment the peer held the new snapshot.
        # No deadlock with the stalled clients: SetSnapshot never waits for a stream (an ADS
        # stream's response channel has room for one response per type, and a type has one watch).
        self._patch(change.cluster, groups[change.cluster])
        visible = time.monotonic()
        for member, group in groups.items():  # other clusters' groups (without mTLS, their EDS too)
            if member != change.cluster:
                self._patch(member, group)
        return change, visible

    def usage(self) -> tuple[float, int]:
        if self.proc is not None and self.proc.poll() is None:
            self._usage = proc_usage(self.proc.pid)
        return self._usage

    async def stop(self) -> None:
        if self.proc is None:
            return
        self.usage()
        self.proc.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(self.proc.wait, 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
        if self.log is not None:
            self.log.close()
