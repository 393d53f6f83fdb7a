"""Load benchmark: N simulated Envoys (ADS streams) against an xDS server; cold start and convergence.

Workload: a mesh of C member clusters x S services x E endpoints per service and cluster, served by
isthmus (a subprocess) from fake Kubernetes API servers (bench.discovery's objects, in a child
process; ``--source kube``, the default) or from a generated mesh file (``--source file``).
Clients spread over the clusters (client i: cluster i % C, service (i // C) % S, so up to N
distinct proxy keys).
Measured: cold start (clients started -> every client holds an ACKed CDS, EDS for each EDS cluster,
LDS, RDS and, with mTLS, SDS), convergence (one endpoint's address changed in one cluster, API write
or file write -> the last client of that cluster ACKed an EDS response with the new address;
p50/p90/p99 over M changes, the debounce included), the server's CPU seconds and peak RSS, the load
tool's own CPU, bytes and responses.

With ``--auth`` the isthmus target serves xDS over TLS (``--xds-san localhost``, a development mesh
root in ``--ca-dir``) and authenticates every stream by a token of its own per simulated client,
for the namespace, service account and member cluster of the node it claims: ``--auth static``
(the default) from a static file (``--xds-token-file``), ``--auth kube`` (Kubernetes source only)
a service-account token issued by the client's member cluster's fake API server and verified by a
TokenReview there (one review per client at cold start). Each client connects over TLS verifying
that root and sends ``authorization: Bearer <token>`` and ``isthmus-cluster: <cluster>`` as gRPC
metadata, as `isthmus bootstrap --token-file` makes Envoy do. Without ``--auth`` the Kubernetes
source runs with ``--insecure-unauthenticated-xds`` and plain text on loopback.

The file source polls its file every second (ServeSettings.mesh_poll_interval, no flag), which puts
a uniform 0-1 s floor under convergence, and re-reads the whole file. ``--poll-interval`` (default
1.0 = `isthmus serve` as shipped) runs the server through a shim that only changes that setting.

Two scenarios follow the one-at-a-time changes (docs/benchmarks.md, "Rolling churn and reconnect
storm"). ``--churn RATE --churn-seconds S``: endpoint changes at a steady rate (random, seeded),
written on schedule without waiting; each change's convergence is attributed exactly
(ChurnTracker), and at the end every client's assignments are checked against the final mesh
(EdsCheck). ``--reconnect-storm``: the server is SIGKILLed, ``--storm-changes`` changes are made while
it is down, it is started again with the same arguments, and every client reconnects presenting what
it holds (bench.adsclient); measured until every client holds the current state again, with what
the restarted server sent (StormWatch: a partial view is reported per client).

Usage: python -m bench.load [--quick] [--source kube|file] [--clients N] [--clusters C] [--services S]
       [--endpoints E] [--changes M] [--mode sotw|delta] [--channels K] [--poll-interval SEC] [--no-mtls]
       [--auth [static|kube]] [--churn RATE [--churn-seconds S]] [--reconnect-storm [--storm-changes N]]
       [--profile-server FILE.prof] [--py-spy PREFIX] [--csv FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import functools
import multiprocessing
import os
import platform
import random
import re
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from bench import discovery
from bench.adsclient import EDS, SimEnvoy, Totals, make_node, open_stream
from bench.discovery import namespace, write_kubeconfig
from isthmus.xds.ca import CERT_FILE
from isthmus.xds.generate.bootstrap import CLUSTER_HEADER

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
SIDECAR_PORT = 15006


# ---- workload -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    clients: int
    clusters: int
    services: int
    endpoints: int

    @property
    def mesh(self) -> discovery.Shape:
        """The mesh without its clients: bench.discovery's objects and addresses."""
        return discovery.Shape(self.clusters, self.services, self.endpoints)


def member(c: int) -> str:
    return f"m{c}"


def region(c: int) -> str:
    return f"r{c}"


def zone(c: int) -> str:
    return f"r{c}-z0"


def service_name(s: int) -> str:
    return f"svc-{s}"  # the names of bench.discovery's Kubernetes objects


def service_account(s: int) -> str:
    return f"sa-{s}"


def gateway(c: int) -> str:
    return f"127.100.{c}.1:15443"


def client_node(shape: Shape, i: int) -> tuple[str, base_pb2.Node]:
    """Client i: (its member cluster, its node). Cluster i % C, service (i // C) % S."""
    c, s = i % shape.clusters, (i // shape.clusters) % shape.services
    node = make_node(
        f"sidecar~{service_name(s)}.{namespace(s)}~{member(c)}~{i}",
        cluster=member(c),
        region=region(c),
        zone=zone(c),
        namespace=namespace(s),
        service=service_name(s),
        service_account=service_account(s),
    )
    return member(c), node


@dataclass(frozen=True, slots=True)
class Change:
    """One endpoint's new address: the member cluster whose clients must see it, and its wire marker."""

    index: int
    cluster: str
    address: str

    @property
    def marker(self) -> bytes:
        # SocketAddress.address is field 2 (tag 0x12), length-prefixed: no prefix collisions.
        raw = self.address.encode()
        return b"\x12" + bytes([len(raw)]) + raw


class Workload:
    """The mesh's endpoint addresses (those of bench.discovery's Kubernetes objects) and its changes."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.kube = shape.mesh
        self.moved: dict[tuple[int, int], dict[int, str]] = {}
        # Where change i lands (cluster, service, endpoint), when not the default spread (--churn
        # draws them at random).
        self.plan: dict[int, tuple[int, int, int]] = {}

    def address(self, c: int, s: int, e: int) -> str:
        return self.moved.get((c, s), {}).get(e) or self.kube.address(c, s, e)

    def planned(self, i: int) -> tuple[Change, int, int, int]:
        """Change i, not applied: a new, unique address for one endpoint (of cluster i % C unless
        planned otherwise); returns it, c, s and e."""
        sh = self.shape
        c, s, e = self.plan.get(i) or (i % sh.clusters, (i * 7919) % sh.services, (i * 31) % sh.endpoints)
        address = f"10.{100 + c % 100}.{i // 250 % 256}.{i % 250 + 1}"
        return Change(i, member(c), address), c, s, e

    def change(self, i: int) -> tuple[Change, int, int]:
        """Apply change i; returns it, c and s."""
        change, c, s, e = self.planned(i)
        self.moved.setdefault((c, s), {})[e] = change.address
        return change, c, s


class MeshFile:
    """The workload as the file source's YAML, kept as lines so a change rewrites one line."""

    def __init__(self, workload: Workload, path: Path) -> None:
        self.workload = workload
        self.path = path
        shape = workload.shape
        self.lines: list[str] = ["clusters:\n"]
        for c in range(shape.clusters):
            host, port = gateway(c).split(":")
            self.lines.append(
                f"  - {{name: {member(c)}, region: {region(c)}, zone: {zone(c)}, "
                f"gateway: {{address: {host}, port: {port}}}}}\n"
            )
        self.lines.append("services:\n")
        self.where: dict[tuple[int, int, int], int] = {}
        for s in range(shape.services):
            self.lines += [
                f"  - name: {service_name(s)}\n",
                f"    namespace: {namespace(s)}\n",
                "    ports: [{name: http, port: 8080, target_port: 8080, protocol: http}]\n",  # = Services
                "    endpoints:\n",
            ]
            for c in range(shape.clusters):
                for e in range(shape.endpoints):
                    self.where[(c, s, e)] = len(self.lines)
                    self.lines.append(self._line(c, s, e))

    def _line(self, c: int, s: int, e: int) -> str:
        address = self.workload.address(c, s, e)
        return (
            f"      - {{cluster: {member(c)}, address: {address}, "
            f"service_account: {service_account(s)}, sidecar_port: {SIDECAR_PORT}}}\n"
        )

    def text(self) -> str:
        return "".join(self.lines)

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(self.text())
        os.replace(tmp, self.path)

    def change(self, i: int) -> Change:
        """Apply change i to the lines (not yet written)."""
        change, c, s = self.workload.change(i)
        for e in range(self.workload.shape.endpoints):
            self.lines[self.where[(c, s, e)]] = self._line(c, s, e)
        return change


def eds_name(s: int) -> str:
    """The EDS (and CDS) name of service s's port 8080 (isthmus.xds.naming.outbound_cluster)."""
    return f"outbound|8080||{service_name(s)}.{namespace(s)}.svc.cluster.local"


_EDS_SERVICE = re.compile(r"^outbound\|8080\|\|svc-(\d+)\.")


def client_account(shape: Shape, i: int) -> tuple[int, str, str]:
    """Client i's (cluster index, namespace, service account): what its node claims (client_node)."""
    _, node = client_node(shape, i)
    meta = node.metadata["isthmus"]
    return i % shape.clusters, str(meta["namespace"]), str(meta["service_account"])


class Auth:
    """``--auth``: the xDS port's TLS and one bearer token per simulated client.

    The server is given ``--xds-san localhost --ca-dir DIR``; clients verify its certificate
    against the root it generated in DIR. ``static``: ``--xds-token-file FILE`` with a line
    ``token,namespace,service-account,cluster`` per client (client_account), so every stream is
    admitted by the file (with member clusters configured, a token the file does not know would
    go to a TokenReview; none does here). ``kube``: the tokens are set by IsthmusTarget from the
    fake API servers (bench.discovery.serve), and the server reviews them (on whenever member
    clusters are)."""

    SERVER_NAME = "localhost"

    def __init__(self, kind: str, shape: Shape, workdir: Path) -> None:
        self.kind = kind
        self.shape = shape
        self.ca_dir = workdir / "ca"
        self.token_path = workdir / "tokens.csv"
        self.tokens = [secrets.token_hex(16) for _ in range(shape.clients)] if kind == "static" else []

    def server_args(self) -> list[str]:
        xds_tls = ["--xds-san", self.SERVER_NAME, "--ca-dir", str(self.ca_dir)]
        if self.kind != "static":
            return xds_tls
        lines = ["# token,namespace,service-account,cluster (bench.load --auth, one per client)\n"]
        for i, token in enumerate(self.tokens):
            c, namespace, account = client_account(self.shape, i)
            lines.append(f"{token},{namespace},{account},{member(c)}\n")
        self.token_path.write_text("".join(lines))
        self.token_path.chmod(0o600)
        return [*xds_tls, "--xds-token-file", str(self.token_path)]

    def channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        """A TLS channel that verifies the server against the mesh root (read once the server made it)."""
        credentials = grpc.ssl_channel_credentials((self.ca_dir / CERT_FILE).read_bytes())
        options = [*options, ("grpc.ssl_target_name_override", self.SERVER_NAME)]
        return grpc.aio.secure_channel(address, credentials, options=options)

    def metadata(self, i: int) -> tuple[tuple[str, str], ...]:
        cluster, _ = client_node(self.shape, i)
        return (("authorization", f"Bearer {self.tokens[i]}"), (CLUSTER_HEADER, cluster))


# ---- targets --------------------------------------------------------------------------------


class Target(Protocol):
    """An xDS server under test. A second implementation (go-control-plane behind an HTTP snapshot
    API) only needs these."""

    name: str
    xds_address: str

    async def start(self) -> None:
        """Serve the workload; return once the server accepts ADS streams with a complete config."""

    async def apply_change(self, i: int) -> tuple[Change, float]:
        """Make change i; return it and the monotonic time it became visible to the server."""

    def usage(self) -> tuple[float, int]:
        """(CPU seconds so far, peak RSS bytes) of the server process."""

    async def stop(self) -> None: ...


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status_bytes(pid: int | None, key: str) -> int:
    """A memory line of /proc/PID/status (``VmRSS``, ``VmHWM``) in bytes, 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _stat_fields(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (isthmus serve --xds-workers: its worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, ()))
    return out


def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a process and its live descendants (summed: each has its
    own peak), plus the CPU of those that ended and were waited for."""
    try:
        fields = _stat_fields(pid)
        cpu = sum(int(f) for f in fields[11:15]) / CLK_TCK  # utime, stime, cutime, cstime
    except (OSError, ValueError):
        return float("nan"), 0
    peak = _status_bytes(pid, "VmHWM")
    for child in process_tree(pid)[1:]:
        try:
            cpu += sum(int(f) for f in _stat_fields(child)[11:13]) / CLK_TCK
        except (OSError, ValueError):
            continue
        peak += _status_bytes(child, "VmHWM")
    return cpu, peak


def proc_rss(pid: int | None) -> int:
    """Resident set size now (bytes) of a process and its live descendants, 0 if unknown."""
    if pid is None:
        return 0
    return sum(_status_bytes(p, "VmRSS") for p in process_tree(pid))


class IsthmusTarget:
    """`isthmus serve` in a child process, fed by the file source or by fake Kubernetes API servers."""

    name = "isthmus"

    def __init__(self, workload: Workload, workdir: Path, args: argparse.Namespace) -> None:
        self.workload = workload
        self.workdir = workdir
        self.source: str = args.source
        self.poll: float = args.poll_interval
        self.mtls: bool = args.mtls
        self.debounce: float | None = args.debounce
        self.debounce_max: float | None = args.debounce_max
        self.workers: int = getattr(args, "xds_workers", 1)
        self.profile: Path | None = args.profile_server
        self.auth = Auth(args.auth, workload.shape, workdir) if args.auth else None
        # --reconnect-storm: the development root is kept in a directory, as a deployment keeps its
        # CA, so the restarted server has the same trust root (--auth keeps it there already).
        self.keep_ca: Path | None = workdir / "ca" if args.reconnect_storm and self.auth is None else None
        self._command: list[str] = []
        self.restart_s = float("nan")
        self.mesh = MeshFile(workload, workdir / "mesh.yaml")
        self.xds_address = f"127.0.0.1:{free_port()}"
        self.admin_address = f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.apis: multiprocessing.Process | None = None
        self.conn: Connection | None = None
        self.startup_s = 0.0
        self.token_reviews = -1  # --auth kube: TokenReviews the API servers answered, once stopped
        self._usage = (0.0, 0)

    def _source_args(self) -> list[str]:
        if self.source == "file":
            self.mesh.write()
            return ["--mesh", str(self.mesh.path)]
        # Fake API servers in a child process (bench.discovery), so their JSON is not the server's CPU.
        self.conn, child = multiprocessing.Pipe()
        sidecar = SIDECAR_PORT if self.mtls else None
        if self.auth is not None and self.auth.kind == "kube":
            accounts = [client_account(self.workload.shape, i) for i in range(self.workload.shape.clients)]
            self.apis = multiprocessing.Process(
                target=discovery.serve, args=(child, self.workload.kube, sidecar, accounts), daemon=True
            )
        else:
            self.apis = multiprocessing.Process(
                target=discovery.serve, args=(child, self.workload.kube, sidecar), daemon=True
            )
        self.apis.start()
        urls = self.conn.recv()
        if self.auth is not None and self.auth.kind == "kube":
            self.auth.tokens = self.conn.recv()
        argv = []
        for c, (url, token) in enumerate(urls):
            path = write_kubeconfig(self.workdir / f"{member(c)}.kubeconfig", url, token, member(c))
            argv += ["--cluster", f"{member(c)}={path}", "--cluster-gateway", f"{member(c)}={gateway(c)}"]
        if self.auth is not None:
            return argv
        return [*argv, "--insecure-unauthenticated-xds"]  # the simulated Envoys present no token

    def command(self, source: list[str]) -> list[str]:
        serve = ["--log-level", "warning", "serve", *source]
        serve += ["--xds-address", self.xds_address, "--admin-address", self.admin_address]
        if self.debounce is not None:
            serve += ["--debounce", str(self.debounce)]
        if self.debounce_max is not None:
            serve += ["--debounce-max", str(self.debounce_max)]
        if self.workers > 1:
            serve += ["--xds-workers", str(self.workers)]
        if not self.mtls:
            serve.append("--no-mtls")
        elif self.keep_ca is not None:
            serve += ["--ca-dir", str(self.keep_ca)]
        if self.auth is not None:
            serve += self.auth.server_args()
        shim = self.source == "file" and self.poll != 1.0
        if self.profile is not None:
            head = [sys.executable, "-m", "cProfile", "-o", str(self.profile), "-m"]
            if shim:
                return [*head, "bench.load", "serve-shim", str(self.poll), *serve]
            return [*head, "isthmus.cli", *serve]
        if shim:
            return [sys.executable, "-m", "bench.load", "serve-shim", str(self.poll), *serve]
        return [str(VENV_BIN / "isthmus"), *serve]

    async def start(self) -> None:
        self._command = self.command(await asyncio.to_thread(self._source_args))
        self.startup_s = await self._spawn("wb")

    async def _spawn(self, log_mode: str, spawned: Callable[[int], None] | None = None) -> float:
        """Start the server with its command; return the seconds from spawn to /readyz."""
        t0 = time.monotonic()
        self.log = (self.workdir / "isthmus.log").open(log_mode)
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - before anything is measured, or the restart itself
            self._command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT
        )
        if spawned is not None:
            spawned(self.proc.pid)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"isthmus exited ({self.proc.returncode}); see {self.workdir}/isthmus.log")
            if await asyncio.to_thread(self._ready):
                break
            await asyncio.sleep(0.05)
        return time.monotonic() - t0

    async def kill(self) -> None:
        """SIGKILL the server (its usage so far is kept for the report) and reap it."""
        assert self.proc is not None
        self.usage()
        self.proc.kill()
        await asyncio.to_thread(self.proc.wait)
        self.log.close()

    async def restart(self, spawned: Callable[[int], None] | None = None) -> None:
        """Start the server again with the same arguments (the API servers kept running)."""
        self.restart_s = await self._spawn("ab", spawned)

    def _ready(self) -> bool:
        url = f"http://{self.admin_address}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    async def apply_change(self, i: int) -> tuple[Change, float]:
        if self.conn is None:
            change = self.mesh.change(i)
            await asyncio.to_thread(self.mesh.write)
            return change, time.monotonic()
        change, c, s = self.workload.change(i)
        self.conn.send(
            (c, discovery.endpoint_slice(self.workload.kube, c, s, moved=self.workload.moved[(c, s)]))
        )
        return change, time.monotonic()

    def usage(self) -> tuple[float, int]:
        if self.proc is not None and self.proc.poll() is None:
            self._usage = proc_usage(self.proc.pid)
        return self._usage

    async def stop(self) -> None:
        if self.proc is not None:
            self.usage()
            self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.to_thread(self.proc.wait, 30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
        if self.apis is not None and self.conn is not None:
            self.conn.send(None)
            if self.auth is not None and self.auth.kind == "kube" and self.conn.poll(10):
                self.token_reviews = int(self.conn.recv())  # bench.discovery.serve answers with its count
            self.apis.join(10)
            if self.apis.is_alive():
                self.apis.terminate()


def serve_shim(argv: list[str]) -> int:
    """`isthmus serve` with ServeSettings.mesh_poll_interval set (no CLI flag exists for it)."""
    from isthmus import cli, settings

    poll = float(argv[0])
    setattr(cli, "ServeSettings", functools.partial(settings.ServeSettings, mesh_poll_interval=poll))  # noqa: B010
    return cli.main(argv[1:])


class Sampler:
    """py-spy attached to the server for one phase of the run (raw collapsed stacks, all threads)."""

    def __init__(self, prefix: Path | None, pid: int | None) -> None:
        self.prefix, self.pid = prefix, pid
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, phase: str) -> None:
        if self.prefix is None or self.pid is None:
            return
        out = self.prefix.with_name(f"{self.prefix.name}-{phase}.txt")
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = [str(VENV_BIN / "py-spy"), "record", "--format", "raw", "--rate", "200", "--nonblocking"]
        self.proc = subprocess.Popen(
            [*argv, "--pid", str(self.pid), "--output", str(out)],
            stdout=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:  # stopped while it was still attaching: no profile
                self.proc.kill()
                self.proc.wait()
            self.proc = None


# ---- the run --------------------------------------------------------------------------------


@dataclass
class Pending:
    change: Change
    written: float
    remaining: set[int]
    acks: dict[int, float] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Tracker:
    """Matches EDS responses against the changes in flight."""

    def __init__(self) -> None:
        self.pending: list[Pending] = []

    def on_eds(self, client: SimEnvoy, raw: bytes, names: list[str], now: float) -> None:
        for p in self.pending:
            if client.index in p.remaining and client.member == p.change.cluster and p.change.marker in raw:
                p.remaining.discard(client.index)
                p.acks[client.index] = now
                if not p.remaining:
                    p.done.set()


@dataclass(slots=True)
class ChurnChange:
    """One change of the rolling churn: when it was due, written, and who holds a state with it."""

    change: Change
    scheduled: float
    expected: int  # clients that must receive it: they see its cluster's endpoints and hold the name
    written: float = float("nan")
    reached: int = 0
    first: float = float("nan")
    last: float = float("nan")


class ChurnTracker:
    """Convergence of every change of a rolling churn, attributed per change and client.

    A change rewrites one endpoint of one service in one cluster; every change's address is new,
    and the API server holds the whole EndpointSlice, so an assignment the server sends reflects a
    prefix of that service's changes: it holds the address of the latest change it includes (later
    changes may have moved the same endpoint again, and then the earlier address is gone). A client
    has reached change k of a chain (the changes of one assignment, as its clients see it) when it
    ACKed an assignment holding the address of change k or of a later change of the chain; a change
    has converged when every client that should receive it has reached it, at the last of those
    ACKs. Per ACKed EDS response this costs, for each assignment in it that has changes, a scan
    from the chain's newest change back to the client's last one (a substring search each)."""

    def __init__(self, clients: list[SimEnvoy], mtls: bool) -> None:
        self.mtls = mtls
        self.recipients: dict[str, list[SimEnvoy]] = {}
        for cl in clients:
            self.recipients.setdefault(self.view(cl.member), []).append(cl)
        self.chains: dict[tuple[str, str], list[ChurnChange]] = {}
        self.level: dict[tuple[int, str], int] = {}  # (client, name) -> the last change reached
        self.changes: list[ChurnChange] = []
        self.open = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.errors: list[str] = []

    def view(self, cluster: str) -> str:
        """Whose assignments an endpoint of ``cluster`` is in: with mTLS the clients of that cluster
        (the others reach it through its gateway, weighted by its healthy endpoints, which an
        address change leaves alone), without mTLS every client."""
        return cluster if self.mtls else "*"

    def register(self, change: Change, s: int, scheduled: float) -> ChurnChange:
        """Before the write, so that no ACK can come before the change is known."""
        name = eds_name(s)
        view = self.view(change.cluster)
        expected = sum(1 for cl in self.recipients.get(view, []) if name in cl.subscribed[EDS])
        if not expected:
            self.errors.append(f"churn: no client of {view} holds {name}")
        entry = ChurnChange(change, scheduled, expected)
        self.chains.setdefault((view, name), []).append(entry)
        self.changes.append(entry)
        if expected:
            self.open += 1
            self.idle.clear()
        return entry

    def on_eds(self, client: SimEnvoy, raw: bytes, names: list[str], now: float) -> None:
        view = self.view(client.member)
        for name in names:
            chain = self.chains.get((view, name))
            if chain is None:
                continue
            key = (client.index, name)
            have = self.level.get(key, -1)
            body = client.eds.get(name)
            if have == len(chain) - 1 or body is None:
                continue
            for p in range(len(chain) - 1, have, -1):
                if chain[p].change.marker in body:
                    break
            else:
                continue
            for entry in chain[have + 1 : p + 1]:
                entry.reached += 1
                if entry.reached == 1:
                    entry.first = now
                entry.last = now
                if entry.reached == entry.expected:
                    self.open -= 1
                    if not self.open:
                        self.idle.set()
            self.level[key] = p


class EdsCheck:
    """What every client holds against what it must hold: for each assignment a client subscribes,
    the endpoint addresses of the final mesh (its own cluster's endpoints directly and, with mTLS,
    the gateway of every other cluster; without mTLS every cluster's endpoints directly), as a set
    (a gateway stands once for each locality of its cluster's endpoints; every endpoint address is
    distinct). Parsed once per distinct assignment (clients keep them interned: keep_eds)."""

    def __init__(self, workload: Workload, mtls: bool) -> None:
        self.workload = workload
        self.mtls = mtls
        self._hosts: dict[bytes, tuple[str, ...]] = {}
        self._service: dict[str, int] = {}

    def hosts(self, body: bytes) -> tuple[str, ...]:
        hit = self._hosts.get(body)
        if hit is None:
            cla = endpoint_pb2.ClusterLoadAssignment.FromString(body)
            lbs = [lb for loc in cla.endpoints for lb in loc.lb_endpoints]
            hit = tuple(sorted({lb.endpoint.address.socket_address.address for lb in lbs}))
            self._hosts[body] = hit
        return hit

    def service(self, name: str) -> int:
        s = self._service.get(name)
        if s is None:
            m = _EDS_SERVICE.match(name)
            s = self._service[name] = int(m.group(1)) if m else -1
        return s

    def expected(self, cluster: int, s: int) -> tuple[str, ...]:
        shape, w = self.workload.shape, self.workload
        hosts: list[str] = []
        for c in range(shape.clusters):
            if c == cluster or not self.mtls:
                hosts += [w.address(c, s, e) for e in range(shape.endpoints)]
            else:
                hosts.append(gateway(c).split(":")[0])
        return tuple(sorted(set(hosts)))

    def check(self, clients: list[SimEnvoy]) -> tuple[int, dict[int, str]]:
        """(mismatched assignments, per client with any: what and how many)."""
        want: dict[tuple[int, int], tuple[str, ...]] = {}
        bad = 0
        lines: dict[int, str] = {}
        for cl in clients:
            c = int(cl.member[1:])
            wrong: list[str] = []
            for name in cl.subscribed[EDS]:
                s = self.service(name)
                body = cl.eds.get(name)
                if s < 0 or body is None:
                    wrong.append(f"{name} {'not held' if body is None else 'unknown'}")
                    continue
                expected = want.get((c, s))
                if expected is None:
                    expected = want[(c, s)] = self.expected(c, s)
                if self.hosts(body) != expected:
                    wrong.append(f"{name} holds {self.hosts(body)} not {expected}")
            if not cl.subscribed[EDS]:
                wrong.append("no EDS subscribed")
            if wrong:
                bad += len(wrong)
                lines[cl.index] = f"{cl.node.id}: {len(wrong)} assignments wrong, e.g. {wrong[0]}"
        return bad, lines


class StormWatch:
    """What the restarted server sends, assignment by assignment, against the final mesh (which
    is all it can know: the changes of the outage were written before it started): the final
    endpoints (a change of the outage, or the same endpoints in other bytes), or not (a partial
    view: endpoints missing, or none at all); and the names it reports removed, per client."""

    def __init__(self, check: EdsCheck, clients: list[SimEnvoy]) -> None:
        self.check = check
        self.before = {cl.index: dict(cl.eds) for cl in clients}
        self.final = self.same_hosts = self.partial = self.empty = 0
        self.clients_partial: dict[int, list[int]] = {}  # client -> [partial, empty]
        self.removed = {cl.index: cl.removed for cl in clients}
        self._want: dict[tuple[int, int], tuple[str, ...]] = {}

    def on_eds(self, client: SimEnvoy, raw: bytes, names: list[str], now: float) -> None:
        c = int(client.member[1:])
        for name in names:
            body, s = client.eds.get(name), self.check.service(name)
            if body is None or s < 0:
                continue
            want = self._want.get((c, s))
            if want is None:
                want = self._want[(c, s)] = self.check.expected(c, s)
            got = self.check.hosts(body)
            if got != want:
                self.partial += 1
                self.empty += not got
                counts = self.clients_partial.setdefault(client.index, [0, 0])
                counts[0] += 1
                counts[1] += not got
                continue
            old = self.before[client.index].get(name)
            if old is not None and self.check.hosts(old) == got:
                self.same_hosts += 1
            else:
                self.final += 1


# ---- the go-control-plane peer's controller, driven from here (its target is bench.peer) ------


def _gcp_regenerate(target: Any) -> Any:
    target.controller.load()
    return target.controller.groups()


async def gcp_apply_batch(target: Any, indices: list[int]) -> tuple[list[Change], dict[str, float]]:
    """Churn through the peer: changes i in ``indices`` are applied to the mesh together and the
    snapshots regenerated once (the controller's cost is a whole re-parse, seconds at W1, so one
    change at a time cannot follow a steady rate), then each changed group is PATCHed. Returns the
    changes and, per member cluster, when its PATCH was answered (bench.peer's convergence origin;
    the PATCHes block the loop for the reason GcpTarget.apply_change gives)."""
    changes = [target.mesh.change(i) for i in indices]
    groups = await asyncio.to_thread(_gcp_regenerate, target)
    visible: dict[str, float] = {}
    touched = {ch.cluster for ch in changes}
    for member_name in sorted(groups, key=lambda m: m not in touched):
        target._patch(member_name, groups[member_name])
        visible[member_name] = time.monotonic()
    return changes, visible


async def gcp_kill(target: Any) -> None:
    target.usage()
    target.proc.kill()
    await asyncio.to_thread(target.proc.wait)
    if target.log is not None:
        target.log.close()


async def gcp_restart(target: Any, groups: Any) -> None:
    """The peer again with the same arguments, fed every group's snapshot (``groups``, generated by
    its controller beforehand, as GcpTarget.start does): spawn -> every group PUT."""
    t0 = time.monotonic()
    target.log = (target.workdir / "gcp-peer.log").open("ab")
    target.proc = subprocess.Popen(  # noqa: ASYNC220 - the restart itself
        [str(target.binary), "-xds", target.xds_address, "-control", target.control_address],
        stdout=target.log,
        stderr=subprocess.STDOUT,
    )
    while not await asyncio.to_thread(target._healthy):
        if target.proc.poll() is not None:
            raise RuntimeError(f"gcp-peer exited ({target.proc.returncode}) on restart")
        await asyncio.sleep(0.02)
    for member_name, group in groups.items():
        await asyncio.to_thread(target._put, member_name, group)
    target.restart_s = time.monotonic() - t0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


@dataclass
class Scrapes:
    """What scraping the admin API cost: each request's time, failures, bytes read."""

    seconds: list[float] = field(default_factory=list)
    failed: int = 0
    bytes: int = 0

    async def loop(self, admin: str, proxy: str, pause: float = 0.0) -> None:
        query = urllib.parse.urlencode({"proxy": proxy})
        pages = ["/debug/syncz", "/metrics", f"/debug/config_dump?{query}", "/debug/mesh", "/debug/clusters"]
        async with aiohttp.ClientSession() as session:
            while True:
                for page in pages:
                    start = time.monotonic()
                    try:
                        async with session.get(f"http://{admin}{page}") as resp:
                            self.bytes += len(await resp.read())
                            if resp.status != 200:
                                self.failed += 1
                    except aiohttp.ClientError:
                        self.failed += 1
                    self.seconds.append(time.monotonic() - start)
                if pause:
                    await asyncio.sleep(pause)


def _type_counts(totals: Totals, responses: dict[str, int], resources: dict[str, int]) -> str:
    """Responses (resources) per type since the counts given: "CDS 1000 (0), EDS 333 (333), ..."."""
    short = {"Cluster": "CDS", "ClusterLoadAssignment": "EDS", "Listener": "LDS"}
    short |= {"RouteConfiguration": "RDS", "Secret": "SDS"}
    parts = []
    for type_url in sorted(totals.by_type):
        n = totals.by_type[type_url] - responses.get(type_url, 0)
        if n:
            r = totals.resources_by_type.get(type_url, 0) - resources.get(type_url, 0)
            name = type_url.rsplit(".", 1)[-1]
            parts.append(f"{short.get(name, name)} {n} ({r})")
    return ", ".join(parts) or "none"


def _removed_counts(totals: Totals, before: dict[str, int]) -> str:
    """Names reported removed (Delta removed_resources) per type since ``before``."""
    parts = [
        f"{type_url.rsplit('.', 1)[-1]} {n - before.get(type_url, 0)}"
        for type_url, n in sorted(totals.removed_by_type.items())
        if n - before.get(type_url, 0)
    ]
    return ", ".join(parts) or "none"


async def rolling_churn(
    args: argparse.Namespace,
    target: Target,
    workload: Workload,
    churn: ChurnTracker,
    totals: Totals,
    sampler: Sampler,
    eds_check: EdsCheck,
    clients: list[SimEnvoy],
) -> dict[str, Any]:
    """--churn RATE --churn-seconds S: endpoint changes at a steady rate (random, seeded: cluster,
    service, endpoint), written on schedule without waiting for convergence, then drained; every
    change's convergence (ChurnTracker) and, at the end, what every client holds (EdsCheck)."""
    rate, shape = args.churn, workload.shape
    total = max(1, round(rate * args.churn_seconds))
    rng = random.Random(args.seed * 7919 + 1)
    base = args.changes  # after the one-at-a-time changes: every change's address is unique
    for k in range(total):
        workload.plan[base + k] = (
            rng.randrange(shape.clusters),
            rng.randrange(shape.services),
            rng.randrange(shape.endpoints),
        )
    gcp = target.name == "gcp"
    resp0, bytes0, res0 = totals.responses, totals.bytes, totals.resources
    by0, rby0 = dict(totals.by_type), dict(totals.resources_by_type)
    cpu0, _ = target.usage()
    own0 = time.process_time()
    sampler.start("rolling")
    start = time.monotonic()
    k = 0
    while k < total:
        now = time.monotonic()
        due = min(total, int((now - start) * rate) + 1)
        if due <= k:
            await asyncio.sleep(start + k / rate - now)
            continue
        # isthmus: each change is its own API write. The peer: the changes due are one batch.
        batch = list(range(base + k, base + due)) if gcp else [base + k]
        entries = []
        for i in batch:
            change, _, s, _ = workload.planned(i)
            entries.append(churn.register(change, s, start + (i - base) / rate))
        if gcp:
            _, visible = await gcp_apply_batch(target, batch)
            for entry in entries:
                entry.written = visible[entry.change.cluster]
        else:
            _, entries[0].written = await target.apply_change(batch[0])
            await asyncio.sleep(0)  # behind schedule, the writes still let the clients run
        k += len(batch)
    end = time.monotonic()
    cpu1, _ = target.usage()
    own1 = time.process_time()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(churn.idle.wait(), args.change_timeout)
    drained = time.monotonic()
    sampler.stop()
    await asyncio.sleep(0.3)  # a push in flight (nothing it could carry is missing if all converged)
    wrong, lines = eds_check.check(clients)
    totals.errors += [f"after churn: {line}" for line in lines.values()]
    done = [e for e in churn.changes if e.expected and e.reached >= e.expected]
    for e in churn.changes:
        if e.expected and e.reached < e.expected:
            totals.errors.append(
                f"churn change {e.change.index} ({e.change.address} in {e.change.cluster}): "
                f"{e.expected - e.reached} of {e.expected} clients never ACKed it"
            )
    conv = [e.last - e.written for e in done]
    first = [e.first - e.written for e in done]
    lag = [e.written - e.scheduled for e in churn.changes]
    wall = end - start
    return {
        "churn_rate": rate,
        "churn_written": len(churn.changes),
        "churn_write_s": wall,
        "churn_write_lag_p50_ms": pct(lag, 50) * 1e3,
        "churn_write_lag_p99_ms": pct(lag, 99) * 1e3,
        "churn_conv_n": len(conv),
        "churn_unconverged": len(churn.changes) - len(done),
        "churn_conv_p50_ms": pct(conv, 50) * 1e3,
        "churn_conv_p90_ms": pct(conv, 90) * 1e3,
        "churn_conv_p99_ms": pct(conv, 99) * 1e3,
        "churn_conv_max_ms": max(conv) * 1e3 if conv else float("nan"),
        "churn_first_p50_ms": pct(first, 50) * 1e3,
        "churn_drain_s": drained - end,
        "churn_server_cores": (cpu1 - cpu0) / wall,
        "churn_tool_cores": (own1 - own0) / wall,
        "churn_responses": totals.responses - resp0,
        "churn_by_type": _type_counts(totals, by0, rby0),
        "churn_resources": totals.resources - res0,
        "churn_mb": (totals.bytes - bytes0) / 1e6,
        "churn_clients_converged": len(clients) - len(lines),
        "churn_assignments_wrong": wrong,
    }


async def reconnect_storm(
    args: argparse.Namespace,
    target: Target,
    totals: Totals,
    sampler: Sampler,
    eds_check: EdsCheck,
    clients: list[SimEnvoy],
    watch: list[StormWatch],
) -> dict[str, Any]:
    """--reconnect-storm: SIGKILL the server, make --storm-changes endpoint changes while it is
    down, start it again with the same arguments; every client's stream breaks and is opened again
    (bench.adsclient: jittered 0.1-1 s, presenting what it holds). A client is synced again at the
    later of its new stream's opening and its last ACK on it; the storm is over once every client
    has a new stream and no response came for a second, and what every client holds is then
    checked against the final mesh (EdsCheck) and its CDS/LDS/RDS/SDS names against before."""
    gcp = target.name == "gcp"
    await asyncio.sleep(0.5)  # whatever is in flight lands before the kill
    before = {cl.index: (cl.streams, {t: set(n) for t, n in cl.held.items() if t != EDS}) for cl in clients}
    resp0, bytes0, res0, breaks0 = totals.responses, totals.bytes, totals.resources, totals.breaks
    resume0, own0 = totals.resume_bytes, time.process_time()
    by0, rby0, codes0 = dict(totals.by_type), dict(totals.resources_by_type), dict(totals.break_codes)
    removed0 = dict(totals.removed_by_type)
    base = args.changes + (round(args.churn * args.churn_seconds) if args.churn > 0 else 0)
    groups = None
    if gcp:
        # The peer's controller is this tool, which does not go down with it: the outage's changes
        # and the snapshots that hold them are made before the kill (a re-parse, seconds at W1).
        for j in range(args.storm_changes):
            target.mesh.change(base + j)  # type: ignore[attr-defined]
        groups = await asyncio.to_thread(_gcp_regenerate, target)
    totals.expect_breaks = True
    watch.append(StormWatch(eds_check, clients))
    killed = time.monotonic()
    if gcp:
        await gcp_kill(target)
    else:
        assert isinstance(target, IsthmusTarget)
        await target.kill()
        for j in range(args.storm_changes):  # API writes while the control plane is down
            await target.apply_change(base + j)
    loop = asyncio.get_running_loop()

    def spawned(pid: int) -> None:  # py-spy attaches once the interpreter is up
        sampler.pid = pid
        loop.call_later(1.0, sampler.start, "restart")

    spawn = time.monotonic()
    if gcp:
        await gcp_restart(target, groups)
    else:
        assert isinstance(target, IsthmusTarget)
        await target.restart(spawned)
    ready = time.monotonic()
    sampler.stop()
    sampler.start("storm")  # from ready to synced
    deadline = killed + args.storm_timeout
    last_response, quiet_since = totals.responses, ready
    wrong, lines = -1, dict[int, str]()
    while True:
        await asyncio.sleep(0.05)
        now = time.monotonic()
        if totals.responses != last_response:
            last_response, quiet_since = totals.responses, now
        reconnected = all(
            cl.streams > before[cl.index][0] and (cl.connected_at or 0) > killed for cl in clients
        )
        if reconnected and now - quiet_since >= 1.0:
            wrong, lines = eds_check.check(clients)
            if not wrong:
                break
            quiet_since = now  # a push may still be due: check again after another quiet second
        if now > deadline:
            break
    cpu, peak = target.usage()
    own = time.process_time() - own0
    sampler.stop()
    totals.expect_breaks = False
    seen = watch.pop()
    if wrong < 0:
        wrong, lines = eds_check.check(clients)
    synced: list[float] = []
    silent = 0
    for cl in clients:
        streams, held = before[cl.index]
        if cl.streams <= streams or cl.connected_at is None or cl.connected_at <= killed:
            totals.errors.append(f"storm: {cl.node.id} did not reconnect within {args.storm_timeout:g} s")
            continue
        if cl.stream_responses == 0:
            silent += 1
        names_ok = True
        for type_url, names in held.items():
            if cl.held[type_url] != names:
                names_ok = False
                totals.errors.append(
                    f"storm: {cl.node.id} holds {len(cl.held[type_url])} {type_url.rsplit('.', 1)[-1]} "
                    f"names, {len(names)} before the restart"
                )
        if names_ok and cl.index not in lines:
            last = cl.last_ack_at if cl.last_ack_at is not None and cl.last_ack_at > killed else 0.0
            synced.append(max(cl.connected_at, last) - killed)
    totals.errors += [f"after the storm: {line}" for line in lines.values()]
    # The restarted server can only know the final mesh: an assignment without its endpoints, or a
    # name removed (the outage changes move addresses, nothing comes or goes), is a partial view
    # served to a proxy, which a real Envoy would apply (and drop that traffic). Reported apart
    # from the errors (what the load tool expects of any run) and printed per client.
    lost = {cl.index: cl.removed - seen.removed[cl.index] for cl in clients}
    partial_lines = []
    for cl in clients:
        partial, empty = seen.clients_partial.get(cl.index, (0, 0))
        if partial or lost[cl.index]:
            partial_lines.append(
                f"storm: {cl.node.id} was sent {partial} assignments of a partial view ({empty} empty) and "
                f"{lost[cl.index]} names were removed"
            )
    for line in partial_lines[:5]:
        print("partial view:", line, file=sys.stderr)
    codes = {c: n - codes0.get(c, 0) for c, n in totals.break_codes.items() if n - codes0.get(c, 0)}
    return {
        "storm_outage_changes": args.storm_changes,
        "storm_server_startup_s": getattr(target, "restart_s", float("nan")),
        "storm_kill_to_spawn_s": spawn - killed,
        "storm_reconnected_s": max((cl.connected_at or 0) for cl in clients) - killed,
        "storm_synced_s": max(synced) if len(synced) == len(clients) else float("nan"),
        "storm_synced_p50_s": pct(synced, 50),
        "storm_clients_synced": len(synced),
        "storm_clients_silent": silent,
        "storm_breaks": totals.breaks - breaks0,
        "storm_break_codes": ", ".join(f"{c} {n}" for c, n in sorted(codes.items())) or "none",
        "storm_responses": totals.responses - resp0,
        "storm_by_type": _type_counts(totals, by0, rby0),
        "storm_resources": totals.resources - res0,
        "storm_mb": (totals.bytes - bytes0) / 1e6,
        "storm_server_cpu_s": cpu,
        "storm_tool_cpu_s": own,
        "storm_resume_mb": (totals.resume_bytes - resume0) / 1e6,
        "storm_server_peak_rss_mib": peak / 2**20,
        "storm_assignments_wrong": max(wrong, 0),
        "storm_eds_final": seen.final,
        "storm_eds_same_endpoints": seen.same_hosts,
        "storm_eds_partial": seen.partial,
        "storm_eds_empty": seen.empty,
        "storm_clients_partial": len(partial_lines),
        "storm_removed": _removed_counts(totals, removed0),
    }


async def run(args: argparse.Namespace, shape: Shape, target: Target) -> dict[str, Any]:
    totals = Totals()
    tracker = Tracker()
    row: dict[str, Any] = {}
    await target.start()
    row["server_startup_s"] = getattr(target, "startup_s", float("nan"))
    cpu0, _ = target.usage()

    options = [
        ("grpc.max_receive_message_length", -1),
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # A lost connection is retried within 0.1-1 s (gRPC's default starts at 1 s and grows to
        # 120 s); Envoy opens a new connection for each attempt of its ADS stream.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    auth: Auth | None = getattr(target, "auth", None)  # only IsthmusTarget has it (parse_args checks)
    channels = [
        grpc.aio.insecure_channel(target.xds_address, options=[*options, ("bench.channel", k)])
        if auth is None
        else auth.channel(target.xds_address, [*options, ("bench.channel", k)])
        for k in range(args.channels)
    ]
    streams = [open_stream(ch, args.mode) for ch in channels]
    all_complete = asyncio.Event()
    completed = 0

    def on_complete(_: SimEnvoy) -> None:
        nonlocal completed
        completed += 1
        if completed == shape.clients:
            all_complete.set()

    churn: ChurnTracker | None = None
    watch: list[StormWatch] = []  # set for the reconnect storm

    def on_eds(client: SimEnvoy, raw: bytes, names: list[str], now: float) -> None:
        if tracker.pending:
            tracker.on_eds(client, raw, names, now)
        if churn is not None:
            churn.on_eds(client, raw, names, now)
        if watch:
            watch[0].on_eds(client, raw, names, now)

    # What the clients hold is checked (their assignments' bytes kept) after a churn or a storm.
    check = args.churn > 0 or args.reconnect_storm
    clients: list[SimEnvoy] = []
    for i in range(shape.clients):
        cluster, node = client_node(shape, i)
        clients.append(
            SimEnvoy(
                i,
                node,
                cluster,
                args.mode,
                streams[i % len(streams)],
                totals,
                mtls=args.mtls,
                on_eds=on_eds,
                on_complete=on_complete,
                metadata=auth.metadata(i) if auth is not None else (),
                keep_eds=check,
                track_versions=args.reconnect_storm,
            )
        )

    pid = getattr(getattr(target, "proc", None), "pid", None) if target.name == "isthmus" else None
    sampler = Sampler(args.py_spy, pid)
    sampler.start("cold")
    own0 = time.process_time()
    t0 = time.monotonic()
    tasks = [asyncio.create_task(cl.run()) for cl in clients]
    try:
        await asyncio.wait_for(all_complete.wait(), args.timeout)
    except TimeoutError:
        totals.errors.append(f"cold start: only {completed}/{shape.clients} complete after {args.timeout}s")
        for cl in [cl for cl in clients if cl.complete_at is None][:5]:
            held = {t.rsplit(".", 1)[-1]: len(n) for t, n in cl.held.items()}
            subscribed = {t.rsplit(".", 1)[-1]: len(n) for t, n in cl.subscribed.items()}
            acked = sorted(t.rsplit(".", 1)[-1] for t in cl.acked_types)
            totals.errors.append(
                f"incomplete: {cl.node.id} acked {acked} held {held} subscribed {subscribed}"
            )
    cold_times = [cl.complete_at - t0 for cl in clients if cl.complete_at is not None]
    row["cold_start_s"] = max(cold_times) if len(cold_times) == shape.clients else float("nan")
    row["cold_p50_s"] = pct(cold_times, 50)
    row["cold_complete"] = len(cold_times)
    cpu1, cold_rss = target.usage()
    sampler.stop()
    row["cold_server_peak_rss_mib"] = cold_rss / 2**20
    row["cold_server_cpu_s"] = cpu1 - cpu0
    row["cold_tool_cpu_s"] = time.process_time() - own0
    row["cold_responses"] = totals.responses
    row["cold_mb"] = totals.bytes / 1e6
    await asyncio.sleep(0.5)  # let stragglers (late re-pushes) settle before changes

    # ---- convergence ----
    by_cluster: dict[str, set[int]] = {}
    for cl in clients:
        by_cluster.setdefault(cl.member, set()).add(cl.index)
    conv: list[float] = []
    first: list[float] = []
    resp0, bytes0, eds0 = totals.responses, totals.bytes, totals.by_type.get(EDS, 0)
    scrapes = Scrapes()
    scrapers = [
        asyncio.create_task(
            scrapes.loop(getattr(target, "admin_address", ""), clients[0].node.id, args.scrape_interval)
        )
        for _ in range(args.scrape)
    ]
    cpu2, _ = target.usage()
    if args.changes:
        sampler.start("churn")
    own2 = time.process_time()
    for i in range(args.changes):
        # Registered before the write, so an EDS response cannot slip past between write and watch.
        pending = Pending(Change(i, "", ""), 0.0, set())
        tracker.pending.append(pending)
        change, written = await target.apply_change(i)
        pending.change, pending.written = change, written
        pending.remaining = set(by_cluster.get(change.cluster, set()))
        try:
            await asyncio.wait_for(pending.done.wait(), args.change_timeout)
            conv.append(max(pending.acks.values()) - written)
            first.append(min(pending.acks.values()) - written)
        except TimeoutError:
            totals.errors.append(
                f"change {i}: {len(pending.remaining)} clients of {change.cluster} "
                f"never ACKed {change.address}"
            )
        tracker.pending.remove(pending)
        # A random pause: changes land at random phases of the file poll, not locked to one.
        jitter = args.poll_interval if args.source == "file" else 0.1
        await asyncio.sleep(args.gap + random.uniform(0, jitter))
    cpu3, rss = target.usage()
    sampler.stop()
    for scraper in scrapers:
        scraper.cancel()
    await asyncio.gather(*scrapers, return_exceptions=True)
    if args.scrape:
        row["scrapes"] = len(scrapes.seconds)
        row["scrape_p50_ms"] = pct(scrapes.seconds, 50) * 1e3
        row["scrape_p99_ms"] = pct(scrapes.seconds, 99) * 1e3
        row["scrape_failed"] = scrapes.failed
        row["scrape_mb"] = scrapes.bytes / 1e6
    row["conv_n"] = len(conv)
    row["conv_p50_ms"] = pct(conv, 50) * 1e3
    row["conv_p90_ms"] = pct(conv, 90) * 1e3
    row["conv_p99_ms"] = pct(conv, 99) * 1e3
    row["conv_max_ms"] = max(conv) * 1e3 if conv else float("nan")
    row["conv_first_p50_ms"] = pct(first, 50) * 1e3
    row["conv_server_cpu_per_change_ms"] = (cpu3 - cpu2) / max(1, args.changes) * 1e3
    row["conv_tool_cpu_per_change_ms"] = (time.process_time() - own2) / max(1, args.changes) * 1e3
    row["conv_responses_per_change"] = (totals.responses - resp0) / max(1, args.changes)
    row["conv_eds_per_change"] = (totals.by_type.get(EDS, 0) - eds0) / max(1, args.changes)
    row["conv_mb_per_change"] = (totals.bytes - bytes0) / 1e6 / max(1, args.changes)
    row["server_cpu_total_s"] = cpu3
    row["server_peak_rss_mib"] = rss / 2**20
    row["server_rss_end_mib"] = proc_rss(getattr(getattr(target, "proc", None), "pid", None)) / 2**20
    row["tool_cpu_total_s"] = time.process_time()
    row["tool_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["responses"] = totals.responses
    row["mb_received"] = totals.bytes / 1e6

    workload: Workload = getattr(target, "workload")  # noqa: B009 - both targets have one
    eds_check = EdsCheck(workload, args.mtls)
    if args.churn > 0:
        churn = ChurnTracker(clients, args.mtls)
        row.update(await rolling_churn(args, target, workload, churn, totals, sampler, eds_check, clients))
        totals.errors += churn.errors
    if args.reconnect_storm:
        row.update(await reconnect_storm(args, target, totals, sampler, eds_check, clients, watch))

    for cl in clients:
        cl.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close(None)
    await target.stop()
    if auth is not None and auth.kind == "kube":
        row["token_reviews"] = getattr(target, "token_reviews", -1)
    row["errors"] = len(totals.errors)
    for e in totals.errors[:10]:
        print("error:", e, file=sys.stderr)
    return row


def workload_arguments(p: argparse.ArgumentParser) -> None:
    """The workload's shape and the clients' mode (bench.load's, bench.istiod's)."""
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--clusters", type=int, default=3)
    p.add_argument("--services", type=int, default=100)
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--changes", type=int, default=20)
    p.add_argument("--mode", choices=("sotw", "delta"), default="sotw")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="N=20, 3x20x3, 5 changes")
    workload_arguments(p)
    p.add_argument(
        "--channels",
        type=int,
        default=0,
        help="gRPC channels (HTTP/2 connections) the clients share, round-robin (default: one per 1,000 "
        "clients, as Envoys spread over connections; one channel serves 5,000 since the server's pending "
        "calls bound was raised)",
    )
    p.add_argument(
        "--poll-interval", type=float, default=1.0, help="the file source's poll (1.0 = as shipped)"
    )
    p.add_argument(
        "--target",
        choices=("isthmus", "gcp"),
        default="isthmus",
        help="the xDS server: isthmus, or go-control-plane serving isthmus's resources (make bench-peer)",
    )
    p.add_argument(
        "--source",
        choices=("kube", "file"),
        default="kube",
        help="isthmus's discovery: fake Kubernetes API servers (incremental, default) or the mesh file",
    )
    p.add_argument(
        "--debounce", type=float, default=None, help="isthmus --debounce (default: as shipped, 0.1 s)"
    )
    p.add_argument(
        "--debounce-max",
        type=float,
        default=None,
        help="isthmus --debounce-max (default: as shipped, 1 s: what a push waits at most under churn)",
    )
    p.add_argument(
        "--xds-workers",
        type=int,
        default=1,
        metavar="N",
        help="isthmus --xds-workers: N processes serve xDS (connections spread over them: give "
        "--channels N or more); server CPU and RSS are summed over them",
    )
    p.add_argument(
        "--churn",
        type=float,
        default=0.0,
        metavar="RATE",
        help="rolling churn after the one-at-a-time changes: RATE endpoint changes a second (random "
        "cluster, service and endpoint, seeded), written on schedule without waiting for convergence",
    )
    p.add_argument("--churn-seconds", type=float, default=60.0, metavar="S", help="how long --churn writes")
    p.add_argument(
        "--reconnect-storm",
        action="store_true",
        help="at the end: SIGKILL the server, start it again with the same arguments, and time every "
        "client's reconnection until all hold the current state again",
    )
    p.add_argument(
        "--storm-changes",
        type=int,
        default=10,
        metavar="N",
        help="with --reconnect-storm: endpoint changes made while the server is down (the restarted "
        "server must deliver them)",
    )
    p.add_argument("--storm-timeout", type=float, default=120.0, help="with --reconnect-storm: limit (s)")
    p.add_argument("--no-mtls", dest="mtls", action="store_false")
    p.add_argument(
        "--auth",
        nargs="?",
        const="static",
        choices=("static", "kube"),
        help="isthmus only: xDS over TLS and a bearer token per client, from a static file "
        "(--xds-token-file; the default) or issued by the fake API servers and reviewed (kube)",
    )
    p.add_argument("--gap", type=float, default=0.3, help="pause between changes (s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0, help="cold start limit (s)")
    p.add_argument("--change-timeout", type=float, default=30.0)
    p.add_argument("--profile-server", type=Path, help="run the server under cProfile, stats to this file")
    p.add_argument(
        "--py-spy",
        type=Path,
        metavar="PREFIX",
        help="sample the server with py-spy during cold start and churn: PREFIX-cold.txt, PREFIX-churn.txt "
        "(--churn: PREFIX-rolling.txt; --reconnect-storm: PREFIX-restart.txt from 1 s after the restart to "
        "ready, PREFIX-storm.txt from ready to synced)",
    )
    p.add_argument("--csv", type=Path, help="append one row per run to this CSV file")
    p.add_argument(
        "--scrape",
        type=int,
        default=0,
        metavar="N",
        help="isthmus only: N loops GET the admin API's status pages and /metrics back to back "
        "during the changes (one proxy's config dump among them), to see what they cost the pushes",
    )
    p.add_argument(
        "--scrape-interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --scrape: pause between two rounds of the pages (0: back to back)",
    )
    args = p.parse_args(argv)
    random.seed(args.seed)
    if args.quick:
        args.clients, args.clusters, args.services, args.endpoints, args.changes = 20, 3, 20, 3, 5
    if args.channels <= 0:
        args.channels = -(-args.clients // 1000)
    if args.auth and args.target != "isthmus":
        p.error("--auth is for --target isthmus (the go-control-plane peer serves plain text)")
    if args.auth == "kube" and args.source != "kube":
        p.error("--auth kube needs --source kube (the API servers review the tokens)")
    if args.clients < args.clusters:
        p.error("--clients must be at least --clusters (every cluster needs clients)")
    if args.scrape and args.target != "isthmus":
        p.error("--scrape is for --target isthmus (the peer has no status pages)")
    if args.debounce_max is not None and args.target != "isthmus":
        p.error("--debounce-max is for --target isthmus (the peer has no debounce)")
    if args.churn < 0 or (args.churn > 0 and args.churn_seconds <= 0):
        p.error("--churn RATE and --churn-seconds S must be positive")
    return args


def report(args: argparse.Namespace, shape: Shape, row: dict[str, Any]) -> None:
    def f(key: str, digits: int = 2) -> str:
        v = row[key]
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = [
        (
            "target / mode",
            f"{row['target']}"
            + (f" ({args.xds_workers} xDS processes)" if args.xds_workers > 1 else "")
            + f" / {args.mode}, mTLS {'on' if args.mtls else 'off'}, "
            + (
                f"xDS over TLS with a token per client ({args.auth})"
                if args.auth
                else "xDS plain text, unauthenticated"
            ),
        ),
        (
            "workload",
            f"{shape.clients} clients, {shape.clusters} x {shape.services} x {shape.endpoints} "
            f"({shape.mesh.total} endpoints), {args.channels} channel(s)",
        ),
        ("server startup (spawn -> ready to serve)", f"{f('server_startup_s')} s"),
        ("cold start: all clients complete", f"{f('cold_start_s')} s (p50 {f('cold_p50_s')} s)"),
        ("cold start: server CPU / tool CPU", f"{f('cold_server_cpu_s')} s / {f('cold_tool_cpu_s')} s"),
        ("cold start: responses / MB received", f"{row['cold_responses']} / {f('cold_mb', 1)}"),
        (
            f"convergence, n={row['conv_n']}: p50 / p90 / p99 / max",
            f"{f('conv_p50_ms', 0)} / {f('conv_p90_ms', 0)} / {f('conv_p99_ms', 0)} / "
            f"{f('conv_max_ms', 0)} ms",
        ),
        ("convergence: first client ACK p50", f"{f('conv_first_p50_ms', 0)} ms"),
        (
            "floor: file poll (uniform 0..interval)" if args.source == "file" else "floor: debounce",
            "none (changes are set directly into the snapshot cache)"
            if args.target == "gcp"
            else f"{args.poll_interval * 1e3:.0f} ms max, mean {args.poll_interval * 500:.0f}"
            if args.source == "file"
            else "a lone watch event waits one event-loop turn, a lone change is pushed at once (the "
            f"debounce's leading edge), one within {(args.debounce or 0.1) * 1e3:.0f} ms of a push "
            "waits that quiet period",
        ),
        (
            "per change: server CPU / tool CPU",
            f"{f('conv_server_cpu_per_change_ms', 0)} ms / {f('conv_tool_cpu_per_change_ms', 0)} ms",
        ),
        (
            "per change: responses (EDS) / MB",
            f"{f('conv_responses_per_change', 1)} ({f('conv_eds_per_change', 1)}) / "
            f"{f('conv_mb_per_change', 2)}",
        ),
        (
            "server: CPU total / peak RSS (after cold start, at the end)",
            f"{f('server_cpu_total_s')} s / {f('server_peak_rss_mib', 0)} MiB "
            f"({f('cold_server_peak_rss_mib', 0)}, {f('server_rss_end_mib', 0)} MiB)",
        ),
        ("load tool: CPU total / peak RSS", f"{f('tool_cpu_total_s')} s / {f('tool_peak_rss_mib', 0)} MiB"),
        ("responses / MB received (total)", f"{row['responses']} / {f('mb_received', 1)}"),
        *(
            [("TokenReviews answered by the API servers", str(row["token_reviews"]))]
            if "token_reviews" in row
            else []
        ),
        *(
            [
                (
                    f"admin scrapes ({args.scrape} loops, {args.scrape_interval:g} s apart): "
                    "count / p50 / p99 / failed / MB",
                    f"{row['scrapes']} / {f('scrape_p50_ms', 0)} ms / {f('scrape_p99_ms', 0)} ms / "
                    f"{row['scrape_failed']} / {f('scrape_mb', 1)}",
                )
            ]
            if args.scrape
            else []
        ),
        *(_churn_lines(args, row, f) if args.churn > 0 else []),
        *(_storm_lines(args, row, f) if args.reconnect_storm else []),
        ("errors", str(row["errors"])),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}")


Lines = list[tuple[str, str]]


def _churn_lines(args: argparse.Namespace, row: dict[str, Any], f: Callable[..., str]) -> Lines:
    gcp = args.target == "gcp"
    return [
        (
            f"rolling churn: {args.churn:g}/s for {args.churn_seconds:g} s: written / in / lag p50, p99",
            f"{row['churn_written']} / {f('churn_write_s', 1)} s / {f('churn_write_lag_p50_ms', 0)}, "
            f"{f('churn_write_lag_p99_ms', 0)} ms "
            + (
                "(due -> PATCH answered: the load tool's controller regenerates per batch)"
                if gcp
                else "(due -> API write)"
            ),
        ),
        (
            f"rolling churn: convergence per change, n={row['churn_conv_n']}: p50 / p90 / p99 / max",
            f"{f('churn_conv_p50_ms', 0)} / {f('churn_conv_p90_ms', 0)} / {f('churn_conv_p99_ms', 0)} / "
            f"{f('churn_conv_max_ms', 0)} ms ({'PATCH answered' if gcp else 'API write'} -> the last of "
            f"its clients ACKed it; first client p50 {f('churn_first_p50_ms', 0)} ms)",
        ),
        (
            "rolling churn: unconverged changes / drained after the last write",
            f"{row['churn_unconverged']} / {f('churn_drain_s', 2)} s",
        ),
        (
            "rolling churn: clients holding the final state (wrong assignments)",
            f"{row['churn_clients_converged']} of {args.clients} ({row['churn_assignments_wrong']})",
        ),
        (
            "rolling churn: server CPU / tool CPU (cores, over the writes)",
            f"{f('churn_server_cores', 2)} / {f('churn_tool_cores', 2)}",
        ),
        (
            "rolling churn: responses (resources) / MB",
            f"{row['churn_responses']} ({row['churn_resources']}): {row['churn_by_type']} / "
            f"{f('churn_mb', 1)}",
        ),
    ]


def _storm_lines(args: argparse.Namespace, row: dict[str, Any], f: Callable[..., str]) -> Lines:
    return [
        (
            f"reconnect storm ({args.storm_changes} changes while down): kill -> all synced again",
            f"{f('storm_synced_s', 2)} s (p50 {f('storm_synced_p50_s', 2)} s; all reconnected "
            f"{f('storm_reconnected_s', 2)} s)",
        ),
        (
            "reconnect storm: server startup (spawn -> ready) / CPU since spawn / peak RSS",
            f"{f('storm_server_startup_s', 2)} s / {f('storm_server_cpu_s', 2)} s / "
            f"{f('storm_server_peak_rss_mib', 0)} MiB",
        ),
        (
            "reconnect storm: the clients' first requests on their new streams / tool CPU",
            f"{f('storm_resume_mb', 1)} MB / {f('storm_tool_cpu_s', 2)} s",
        ),
        (
            "reconnect storm: responses (resources) / MB re-sent",
            f"{row['storm_responses']} ({row['storm_resources']}): {row['storm_by_type']} / "
            f"{f('storm_mb', 1)}",
        ),
        (
            "reconnect storm: assignments sent: final (outage change, same endpoints) / partial (empty)",
            f"{row['storm_eds_final'] + row['storm_eds_same_endpoints']} ({row['storm_eds_final']}, "
            f"{row['storm_eds_same_endpoints']}) / {row['storm_eds_partial']} ({row['storm_eds_empty']})",
        ),
        (
            "reconnect storm: clients served a partial view (names removed)",
            f"{row['storm_clients_partial']} ({row['storm_removed']})"
            + (
                " <- a real Envoy applies these: see 'partial view:' lines"
                if row["storm_clients_partial"]
                else ""
            ),
        ),
        (
            "reconnect storm: clients synced (sent nothing) / streams ended",
            f"{row['storm_clients_synced']} of {args.clients} ({row['storm_clients_silent']}) / "
            f"{row['storm_breaks']} ({row['storm_break_codes']})",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-shim"]:
        return serve_shim(argv[1:])
    args = parse_args(argv)
    shape = Shape(args.clients, args.clusters, args.services, args.endpoints)
    with tempfile.TemporaryDirectory(prefix="isthmus-load-") as tmp:
        work = Path(tmp)
        target: Target
        if args.target == "gcp":
            from bench.peer import GcpTarget  # not at the top: bench.peer imports this module

            target = GcpTarget(Workload(shape), work, args)
        else:
            target = IsthmusTarget(Workload(shape), work, args)
        try:
            row = asyncio.run(run(args, shape, target))
        except BaseException:
            for log in (work / "isthmus.log", work / "gcp-peer.log"):
                if log.exists():
                    sys.stderr.write(log.read_text()[-3000:])
            raise
    row = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "target": target.name,
        "mode": args.mode,
        "mtls": args.mtls,
        # Only when on, so that CSV files written before the flag existed keep their columns.
        **({"auth": f"tls+{args.auth}-token"} if args.auth else {}),
        "clients": shape.clients,
        "clusters": shape.clusters,
        "services": shape.services,
        "endpoints": shape.endpoints,
        "changes": args.changes,
        "channels": args.channels,
        **({"xds_workers": args.xds_workers} if args.xds_workers > 1 else {}),
        "source": args.source if args.target == "isthmus" else "file",
        "debounce_s": args.debounce,
        "poll_interval_s": args.poll_interval,
        # Only when set, as auth above.
        **({"debounce_max_s": args.debounce_max} if args.debounce_max is not None else {}),
        **({"churn_seconds": args.churn_seconds} if args.churn > 0 else {}),
        **row,
    }
    report(args, shape, row)
    if args.csv is not None:
        new = not args.csv.exists() or args.csv.stat().st_size == 0
        if not new:
            with args.csv.open(newline="") as fh:
                header = next(csv.reader(fh), [])
            if header != list(row):
                print(f"error: {args.csv} has other columns than this run; use another file", file=sys.stderr)
                return 2
        with args.csv.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()})
    return 1 if row["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
