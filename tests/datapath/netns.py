"""The data-path network: member clusters in Linux network namespaces, joined only by a transit bridge.

::

    namespace isdp-<pid>-<tok>-tr (transit)          bridge br0 with ports v1, v2, v3 ... (and vcp)
    namespace isdp-<pid>-<tok>-<cluster n>           eth0 (peer of vN) 10.250.0.<n>/24   <- gateway binds here
                                                     lo   127.0.0.1, 10.<n>.0.1/24       <- pod addresses
    namespace isdp-<pid>-<tok>-cp (only with         eth0 (peer of vcp) 10.250.0.250/24  <- the control plane
      ``control_plane=True``)                        lo   127.0.0.1                          serves xDS here

* Pod addresses ``10.<n>.0.<k>`` (k = 1..254) are local addresses of cluster n's namespace: a /24 on
  ``lo`` makes every one of them bindable without declaring each (this kernel has no ``dummy`` link
  type). No other namespace has a route to 10.<n>.0.0/24, so a connect to another cluster's pod
  address fails at once with ENETUNREACH; only the transit addresses 10.250.0.<n> are reachable
  across clusters. Namespaces do not forward (ip_forward is 0 in a new namespace) and nothing is
  connected to the root namespace: no packet can leave these namespaces.
* ``Topology(..., control_plane=True)`` adds a namespace for the control plane on the same bridge
  (``Topology.control_plane_net``, not a member cluster: no pods, no agent of a cluster): every
  cluster reaches its transit address 10.250.0.250, nothing else of it.
* ``Topology.run(cluster, argv)`` starts a process inside a cluster's namespace (``ip netns exec``), in
  its own process group, with SIGKILL as parent-death signal (``setpriv --pdeathsig``) so that a
  SIGKILLed pytest leaves nothing running. ``None`` runs it in the root namespace.
* ``Topology.close()`` (also on ``__exit__``, at interpreter exit, and for leftovers of a crashed run at
  the next ``create()``) stops the processes, kills whatever still runs in the namespaces, deletes the
  namespaces (which deletes the veths and the bridge) and removes the run directory.

Loopback mode (not root, or ``ISTHMUS_DATAPATH_MODE=loopback``): every cluster is the root namespace,
pod addresses are 127.<n>.0.<k> and transit addresses 127.250.0.<n> (the control plane's
127.250.0.250). Nothing is isolated then (``Topology.isolated`` is False); tests that need
isolation skip.

``Popen`` with a parent-death signal: the signal fires when the *thread* that started the child exits,
so start processes from the main thread (pytest-asyncio runs the event loop there), never from
``asyncio.to_thread``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

PREFIX = "isdp"  # namespaces and run directories: isdp-<pid of the owning process>-<token>[-<role>]
_OWNED = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]+)(?:-|$)")
MODE_ENV = "ISTHMUS_DATAPATH_MODE"  # auto (default) | netns | loopback
TRANSIT_NET = "10.250.0"
LOOPBACK_TRANSIT_NET = "127.250.0"
BRIDGE = "br0"
CLUSTER_LINK = "eth0"
MAX_CLUSTERS = 20
CONTROL_PLANE_HOST = 250  # the control plane's transit address: <transit net>.250 (above any cluster's)
CONTROL_PLANE_NAME = "cp"  # its namespace's suffix and its name in logs
CONTROL_PLANE_PORT = "vcp"  # its port on the bridge
FIRST_AUTO_POD = 10  # pod(k) for k < 10 is left to the tests; new_pod() hands out 10, 11, ...
FIRST_ADMIN_PORT = 19000  # Envoy admin ports, distinct across the whole topology
FIRST_PORT = 20000  # other ports handed out per namespace (below the ephemeral range)
COMMAND_TIMEOUT = 20.0


class TopologyError(RuntimeError):
    """Setting up or tearing down the network failed; the message has the command and its stderr."""


class ProcessDied(Exception):
    """A process the test depends on exited; polling stops at once."""


# ---- commands ----------------------------------------------------------------------------------


def _ip(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *args]
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if check and done.returncode != 0:
        what = " ".join(argv) + (f" <<{stdin!r}" if stdin else "")
        raise TopologyError(f"{what} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _ip_batch(netns: str | None, commands: Sequence[str]) -> None:
    """Several `ip` commands in one process (``ip [-n NS] -batch -``)."""
    _ip(*(["-n", netns] if netns else []), "-batch", "-", stdin="\n".join(commands) + "\n")


def list_namespaces() -> list[str]:
    done = _ip("netns", "list", check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def namespace_pids(netns: str) -> list[int]:
    done = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(netns: str) -> list[int]:
    """SIGKILL whatever still runs in a namespace this harness created; returns the pids."""
    pids = [p for p in namespace_pids(netns) if p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and namespace_pids(netns):
        time.sleep(0.05)
    return pids


def cleanup_stale() -> list[str]:
    """Remove what a crashed earlier run left behind: namespaces and run directories named with this
    harness's prefix whose owning process (the pid in the name) no longer exists. Live runs (another
    pytest, a parallel worker) are left alone. Returns what was removed."""
    removed: list[str] = []
    if os.geteuid() == 0 and shutil.which("ip"):
        for name in list_namespaces():
            match = _OWNED.match(name)
            if match is None or pid_alive(int(match.group(1))):
                continue
            _kill_namespace_processes(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    for directory in Path(tempfile.gettempdir()).glob(f"{PREFIX}-*"):
        match = _OWNED.match(directory.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(str(directory))
    if removed:
        log.warning("removed leftovers of an earlier data-path run: %s", removed)
    return removed


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# ---- processes ---------------------------------------------------------------------------------


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:]) or "<empty>"


class NsProcess:
    """A process started by ``Topology.run``: its own process group, output in ``log_path``."""

    def __init__(
        self, name: str, argv: list[str], where: str, log_path: Path, proc: subprocess.Popen[bytes]
    ) -> None:
        self.name = name
        self.argv = argv
        self.where = where  # namespace name, or "root"
        self.log_path = log_path
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def ensure_running(self) -> None:
        if self.proc.poll() is not None:
            raise ProcessDied(
                f"{self.name} (in {self.where}) exited with status {self.proc.returncode}; "
                f"log tail ({self.log_path}):\n{self.log_tail()}"
            )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the process group (the process and anything it forked)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, grace: float = 5.0) -> int:
        """SIGTERM the group, wait up to ``grace`` seconds, then SIGKILL it; always reaps."""
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.signal_group(signal.SIGKILL)  # stragglers in the group
        return self.proc.returncode

    def __repr__(self) -> str:
        return f"<NsProcess {self.name} pid={self.proc.pid} in {self.where}>"


def stop_processes(processes: Sequence[NsProcess], grace: float = 5.0) -> list[str]:
    """SIGTERM all at once, wait for all up to ``grace``, SIGKILL the rest; returns error strings."""
    errors: list[str] = []
    for p in processes:
        if p.running:
            p.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in processes:
        try:
            p.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%r did not stop within %.0fs of SIGTERM; killing it", p, grace)
        try:
            p.stop(grace=0)
        except Exception as exc:
            errors.append(f"{p!r}: {exc!r}")
    return errors


# ---- the topology ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterNet:
    """One member cluster's network: its namespace (None in loopback mode) and addresses. The
    control plane's namespace (``Topology.control_plane_net``) is one too, named "cp", index 0,
    with a transit address and no pod addresses."""

    name: str
    index: int  # n: pod addresses 10.<n>.0.<k>, transit address 10.250.0.<n>
    netns: str | None
    transit_address: str
    pod_net: str  # "10.<n>.0" (or "127.<n>.0")

    def pod(self, k: int) -> str:
        """Pod address k (1..254) of this cluster."""
        if not self.pod_net:
            raise ValueError(f"{self.name} has no pod addresses")
        if not 1 <= k <= 254:
            raise ValueError(f"pod index {k} is not in 1..254")
        return f"{self.pod_net}.{k}"

    @property
    def pod_cidr(self) -> str:
        return f"{self.pod_net}.0/24"

    @property
    def gateway_address(self) -> str:
        """Where this cluster's east-west gateway listens: its transit address."""
        return self.transit_address

    @property
    def where(self) -> str:
        return self.netns or "root"


_live: set[Topology] = set()


@atexit.register
def _close_live_topologies() -> None:
    for topo in list(_live):
        log.warning("topology %s still open at interpreter exit: closing it", topo.run_id)
        with contextlib.suppress(Exception):
            topo.close()


def pdeathsig_prefix() -> list[str]:
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


class Topology:
    """Member clusters, each in its own network namespace, joined by a transit bridge.

    ``with Topology(["east", "west"]) as topo: ...`` (or ``create()`` / ``close()``). ``log_dir`` keeps
    process logs (default: the run directory, which ``close()`` removes). Sockets and other files go in
    ``topo.rundir``, a short path under /tmp (a Unix socket path must stay under 108 bytes).
    """

    def __init__(
        self,
        clusters: Sequence[str] = ("east", "west"),
        *,
        mode: str | None = None,
        log_dir: Path | None = None,
        control_plane: bool = False,
    ) -> None:
        if not clusters or len(set(clusters)) != len(clusters) or len(clusters) > MAX_CLUSTERS:
            raise ValueError(f"need 1..{MAX_CLUSTERS} distinct cluster names, got {list(clusters)}")
        for name in clusters:
            if not re.fullmatch(r"[a-z][a-z0-9]{0,15}", name):
                raise ValueError(f"cluster name {name!r}: lowercase letters and digits, at most 16")
        if control_plane and CONTROL_PLANE_NAME in clusters:
            raise ValueError(f"cluster name {CONTROL_PLANE_NAME!r} is the control plane namespace's")
        self.cluster_names = list(clusters)
        self.requested_mode = (mode or os.environ.get(MODE_ENV) or "auto").lower()
        self._mode_source = "requested" if mode else f"{MODE_ENV}={self.requested_mode}"
        if self.requested_mode not in ("auto", "netns", "loopback"):
            raise ValueError(f"mode {self.requested_mode!r}: expected auto, netns or loopback")
        self.mode = ""  # decided by create()
        self.fallback_reason = ""
        self.token = secrets.token_hex(3)
        self.run_id = f"{PREFIX}-{os.getpid()}-{self.token}"
        self.rundir = Path(tempfile.gettempdir()) / self.run_id
        self.log_dir = log_dir
        self.transit_netns: str | None = None
        self.clusters: dict[str, ClusterNet] = {}
        self.want_control_plane_net = control_plane
        self.control_plane_net: ClusterNet | None = None
        self.processes: list[NsProcess] = []
        self._created_netns: list[str] = []
        self._next_pod: dict[str, int] = {}
        self._next_port: dict[str, int] = {}
        self._next_admin_port = FIRST_ADMIN_PORT
        self._closed = False

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def isolated(self) -> bool:
        """True when clusters are real namespaces (pod addresses of other clusters unreachable)."""
        return self.mode == "netns"

    def create(self) -> Topology:
        cleanup_stale()
        self.rundir.mkdir(mode=0o700)
        _live.add(self)
        try:
            mode = self.requested_mode
            if mode == "auto":
                mode, self.fallback_reason = self._probe_netns()
            if mode == "netns":
                self._create_namespaces()
            else:
                self._create_loopback()
            self.mode = mode
        except BaseException:
            self.close()
            raise
        if self.mode == "loopback":
            if not self.fallback_reason:
                self.fallback_reason = self._mode_source
            message = f"data-path topology in loopback mode ({self.fallback_reason}): NOT isolated"
            warnings.warn(message, stacklevel=2)
            log.warning("%s", message)
        log.info("topology %s (%s): %s", self.run_id, self.mode, self.describe())
        return self

    def _probe_netns(self) -> tuple[str, str]:
        if os.geteuid() != 0:
            return "loopback", "not root: cannot create network namespaces"
        if not shutil.which("ip"):
            return "loopback", "no `ip` command (iproute2)"
        probe = f"{self.run_id}-probe"
        done = _ip("netns", "add", probe, check=False)
        if done.returncode != 0:
            return "loopback", f"`ip netns add` failed: {done.stderr.strip()}"
        _ip("netns", "del", probe, check=False)
        return "netns", ""

    def _create_namespaces(self) -> None:
        transit = f"{self.run_id}-tr"
        names = {c: f"{self.run_id}-{c}" for c in self.cluster_names}
        for netns in (transit, *names.values()):
            _ip("netns", "add", netns)
            self._created_netns.append(netns)
        self.transit_netns = transit
        commands = ["link set lo up", f"link add {BRIDGE} type bridge", f"link set {BRIDGE} up"]
        for n, cluster in enumerate(self.cluster_names, start=1):
            port = f"v{n}"
            commands += [
                f"link add {port} type veth peer name {CLUSTER_LINK} netns {names[cluster]}",
                f"link set {port} master {BRIDGE}",
                f"link set {port} up",
            ]
        if self.want_control_plane_net:
            cp_netns = f"{self.run_id}-{CONTROL_PLANE_NAME}"
            _ip("netns", "add", cp_netns)
            self._created_netns.append(cp_netns)
            commands += [
                f"link add {CONTROL_PLANE_PORT} type veth peer name {CLUSTER_LINK} netns {cp_netns}",
                f"link set {CONTROL_PLANE_PORT} master {BRIDGE}",
                f"link set {CONTROL_PLANE_PORT} up",
            ]
        _ip_batch(transit, commands)
        if self.want_control_plane_net:
            net = ClusterNet(CONTROL_PLANE_NAME, 0, cp_netns, f"{TRANSIT_NET}.{CONTROL_PLANE_HOST}", "")
            _ip_batch(
                net.netns,
                [
                    "link set lo up",
                    f"addr add {net.transit_address}/24 dev {CLUSTER_LINK}",
                    f"link set {CLUSTER_LINK} up",
                ],
            )
            self.control_plane_net = net
        for n, cluster in enumerate(self.cluster_names, start=1):
            net = ClusterNet(cluster, n, names[cluster], f"{TRANSIT_NET}.{n}", f"10.{n}.0")
            _ip_batch(
                net.netns,
                [
                    "link set lo up",
                    # A prefix on lo makes the whole /24 local: every pod address is bindable.
                    f"addr add {net.pod(1)}/24 dev lo",
                    f"addr add {net.transit_address}/24 dev {CLUSTER_LINK}",
                    f"link set {CLUSTER_LINK} up",
                ],
            )
            self.clusters[cluster] = net

    def _create_loopback(self) -> None:
        for n, cluster in enumerate(self.cluster_names, start=1):
            self.clusters[cluster] = ClusterNet(cluster, n, None, f"{LOOPBACK_TRANSIT_NET}.{n}", f"127.{n}.0")
        if self.want_control_plane_net:
            self.control_plane_net = ClusterNet(
                CONTROL_PLANE_NAME, 0, None, f"{LOOPBACK_TRANSIT_NET}.{CONTROL_PLANE_HOST}", ""
            )

    def close(self) -> None:
        """Stop every process, delete the namespaces, remove the run directory. Idempotent; tries every
        step even when one fails, then raises TopologyError listing what failed."""
        if self._closed:
            return
        self._closed = True
        log.info(
            "closing topology %s: %d processes, namespaces %s",
            self.run_id,
            len(self.processes),
            self._created_netns,
        )
        errors = stop_processes(list(reversed(self.processes)))
        for netns in reversed(self._created_netns):
            try:
                leftovers = _kill_namespace_processes(netns)
                if leftovers:
                    errors.append(f"processes still in {netns} were killed: {leftovers}")
                done = _ip("netns", "del", netns, check=False)
                if done.returncode != 0 and netns in list_namespaces():
                    errors.append(f"ip netns del {netns}: {done.stderr.strip()}")
            except Exception as exc:
                errors.append(f"{netns}: {exc!r}")
        shutil.rmtree(self.rundir, ignore_errors=True)
        _live.discard(self)
        if errors:
            raise TopologyError("data-path cleanup: " + "; ".join(errors))

    def __enter__(self) -> Topology:
        return self.create()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Topology:
        return self.create()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- lookups and allocation ------------------------------------------------------------------

    def __getitem__(self, name: str) -> ClusterNet:
        return self.clusters[name]

    def __iter__(self) -> Iterator[ClusterNet]:
        return iter(self.clusters.values())

    def describe(self) -> str:
        described = ", ".join(
            f"{c.name}: netns={c.where} transit={c.transit_address} pods={c.pod_cidr}"
            for c in self.clusters.values()
        )
        cp = self.control_plane_net
        return described + (f"; control plane: netns={cp.where} transit={cp.transit_address}" if cp else "")

    def _cluster(self, where: ClusterNet | str | None) -> ClusterNet | None:
        if where is None or isinstance(where, ClusterNet):
            return where
        return self.clusters[where]

    def new_pod(self, cluster: ClusterNet | str) -> str:
        """A pod address of ``cluster`` not handed out before (10.<n>.0.10, .11, ...)."""
        net = self._cluster(cluster)
        assert net is not None
        k = self._next_pod.get(net.name, FIRST_AUTO_POD)
        self._next_pod[net.name] = k + 1
        return net.pod(k)

    def port(self, cluster: ClusterNet | str | None, host: str = "127.0.0.1") -> int:
        """A port free on ``host`` inside ``cluster``: a fresh namespace needs no probing (20000, 20001,
        ... per namespace); in loopback mode or the root namespace, a probed free port."""
        net = self._cluster(cluster)
        if net is None or net.netns is None:
            return free_port(host)
        number = self._next_port.get(net.name, FIRST_PORT)
        self._next_port[net.name] = number + 1
        return number

    def admin_port(self, cluster: ClusterNet | str | None) -> int:
        """A port for an Envoy admin API on 127.0.0.1, distinct across the whole topology."""
        net = self._cluster(cluster)
        if net is None or net.netns is None:
            return free_port()
        number = self._next_admin_port
        self._next_admin_port += 1
        return number

    # ---- processes -------------------------------------------------------------------------------

    def argv_in(self, where: ClusterNet | str | None, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside ``where``'s namespace (unchanged for root / loopback)."""
        net = self._cluster(where)
        if net is None or net.netns is None:
            return list(argv)
        return ["ip", "netns", "exec", net.netns, *argv]

    def run(
        self,
        where: ClusterNet | str | None,
        argv: Sequence[str],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> NsProcess:
        """Start ``argv`` inside ``where`` (a cluster, its name, or None for the root namespace), in a
        new process group, output to a log file; ``close()`` stops it."""
        if self._closed or not self.clusters:
            raise TopologyError("topology is not created (or already closed)")
        net = self._cluster(where)
        label = name or Path(argv[0]).name
        place = net.where if net is not None else "root"
        if log_path is None:
            directory = self.log_dir or self.rundir
            log_path = directory / f"{len(self.processes):02d}-{label}-{net.name if net else 'root'}.log"
        full = [*pdeathsig_prefix(), *self.argv_in(net, argv)]
        with log_path.open("ab") as out:
            out.write(f"---- started in {place}: {' '.join(full)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(env) if env is not None else None,
            )
        process = NsProcess(label, full, place, log_path, proc)
        self.processes.append(process)
        return process

    def exec(
        self, where: ClusterNet | str | None, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside ``where`` and wait for it (e.g. ``ip addr``); not checked."""
        return subprocess.run(
            self.argv_in(where, argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def report_sections(self) -> list[tuple[str, str]]:
        """(title, log tail) of every process, for a failure report."""
        return [(f"{p.name} in {p.where} ({p.log_path})", p.log_tail()) for p in self.processes]


def python_argv(script: Path, *args: str) -> list[str]:
    """Run a Python script with this interpreter (the venv's), unbuffered."""
    return [sys.executable, "-u", str(script), *args]
