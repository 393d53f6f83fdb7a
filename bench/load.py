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

Usage: python -m bench.load [--quick] [--source kube|file] [--clients N] [--clusters C] [--services S]
       [--endpoints E] [--changes M] [--mode sotw|delta] [--channels K] [--poll-interval SEC] [--no-mtls]
       [--auth [static|kube]] [--profile-server FILE.prof] [--csv FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import multiprocessing
import os
import platform
import random
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
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import grpc
from envoy.config.core.v3 import base_pb2

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

    def address(self, c: int, s: int, e: int) -> str:
        return self.moved.get((c, s), {}).get(e) or self.kube.address(c, s, e)

    def change(self, i: int) -> tuple[Change, int, int]:
        """Change i: a new, unique address for one endpoint of cluster i % C; returns it, c and s."""
        sh = self.shape
        c, s, e = i % sh.clusters, (i * 7919) % sh.services, (i * 31) % sh.endpoints
        address = f"10.{100 + c % 100}.{i // 250 % 256}.{i % 250 + 1}"
        self.moved.setdefault((c, s), {})[e] = address
        return Change(i, member(c), address), c, s


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


def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, ValueError):
        return float("nan"), 0
    return cpu, _status_bytes(pid, "VmHWM")


def proc_rss(pid: int | None) -> int:
    """Resident set size now (bytes), 0 if unknown."""
    return _status_bytes(pid, "VmRSS")


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
        self.profile: Path | None = args.profile_server
        self.auth = Auth(args.auth, workload.shape, workdir) if args.auth else None
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
        if not self.mtls:
            serve.append("--no-mtls")
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
        command = self.command(await asyncio.to_thread(self._source_args))
        t0 = time.monotonic()
        self.log = (self.workdir / "isthmus.log").open("wb")
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - once, before anything is measured
            command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT
        )
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"isthmus exited ({self.proc.returncode}); see {self.workdir}/isthmus.log")
            if await asyncio.to_thread(self._ready):
                break
            await asyncio.sleep(0.05)
        self.startup_s = time.monotonic() - t0

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
            self.proc.wait(30)
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

    def on_eds(self, client: SimEnvoy, raw: bytes, now: float) -> None:
        for p in self.pending:
            if client.index in p.remaining and client.member == p.change.cluster and p.change.marker in raw:
                p.remaining.discard(client.index)
                p.acks[client.index] = now
                if not p.remaining:
                    p.done.set()


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
                on_eds=tracker.on_eds,
                on_complete=on_complete,
                metadata=auth.metadata(i) if auth is not None else (),
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="N=20, 3x20x3, 5 changes")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--clusters", type=int, default=3)
    p.add_argument("--services", type=int, default=100)
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--changes", type=int, default=20)
    p.add_argument("--mode", choices=("sotw", "delta"), default="sotw")
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
        help="sample the server with py-spy during cold start and churn: PREFIX-cold.txt, PREFIX-churn.txt",
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
    return args


def report(args: argparse.Namespace, shape: Shape, row: dict[str, Any]) -> None:
    def f(key: str, digits: int = 2) -> str:
        v = row[key]
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = [
        (
            "target / mode",
            f"{row['target']} / {args.mode}, mTLS {'on' if args.mtls else 'off'}, "
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
            else f"10 ms watch coalescing; a lone change is pushed at once (the debounce's leading "
            f"edge), one within {(args.debounce or 0.1) * 1e3:.0f} ms of a push waits that quiet period",
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
        ("errors", str(row["errors"])),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}")


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
        "source": args.source if args.target == "isthmus" else "file",
        "debounce_s": args.debounce,
        "poll_interval_s": args.poll_interval,
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
