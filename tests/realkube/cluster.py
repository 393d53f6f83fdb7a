"""One real member cluster on loopback: etcd, kube-apiserver and kube-controller-manager processes.

Each cluster has its own CA, serving certificate, service-account signing key and static admin
token (``system:masters``); RBAC is on and anonymous requests get nothing but the public health
endpoints. The API server listens on 127.0.0.1 only (``--endpoint-reconciler-type none``: it would
otherwise publish its address as the ``kubernetes`` Service's endpoint, which the loopback address
cannot be). kube-controller-manager runs only the controllers the tests rely on: service accounts
and their tokens, namespace deletion, garbage collection, the root CA ConfigMap, Deployments,
ReplicaSets, EndpointSlices and node lifecycle (a node's not-ready taint). ``start_scheduler`` adds a
kube-scheduler, for clusters with a node (realkube.node).

Lifecycle: ``start`` (blocking, from the test's main thread) brings all three up and waits for
/readyz; ``stop`` stops them in order, controller manager and API server before etcd (the API server's
shutdown hangs for 45 s on etcd timeouts otherwise), and is safe to call twice. Every child is also
tied to the test process with a parent-death signal (``setpriv --pdeathsig KILL``; spawn from the
main thread only: the signal fires when the spawning thread ends), so a killed run leaves nothing.
``stop_apiserver``/``start_apiserver`` make an outage; ``compact`` compacts etcd to its current
revision through etcd's own API, so watches from older resourceVersions get 410 Gone.

Versions: etcd comes from ``binaries``, the API server, controller manager and scheduler from
``kube_binaries`` (default: the same directory), so a cluster can start on the previous Kubernetes
version (realkube.binaries ``kube_bin("previous")``); ``stop_control_plane`` and
``start_control_plane(other)`` upgrade it in place: the same etcd (never stopped), data, PKI, tokens,
ports and log files, other binaries.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import aiohttp
import yaml

from datapath.netns import pdeathsig_prefix
from realkube.pki import ClusterPki, make_pki
from realkube.rest import Rest

LOOPBACK = "127.0.0.1"
ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.96.0.0/16"  # virtual ClusterIPs only; nothing is routed to them
CONTROLLERS = (
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
    "garbage-collector-controller",
    "root-ca-certificate-publisher-controller",
    "deployment-controller",
    "replicaset-controller",
    "endpointslice-controller",
    "node-lifecycle-controller",  # removes a new node's not-ready taint once it is Ready
)

# The audit log records, for the service accounts of isthmus-system (isthmus's own), every request
# and its answer: the tests read it to prove that a whole run was never refused.
READER_GROUP = "system:serviceaccounts:isthmus-system"
AUDIT_POLICY = f"""apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: ["{READER_GROUP}"]
  - level: None
"""

_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on now, never the same one twice in a test session."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port")


class Process:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[bytes] | None = None
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        # The parent-death signal comes from setpriv, not a preexec_fn: Python code in a forked child
        # of a process where gRPC runs threads (the protocol tests) breaks the child.
        self.popen = subprocess.Popen(
            [*pdeathsig_prefix(), *self.argv],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace: float = 10.0, sig: int = signal.SIGTERM) -> None:
        popen, self.popen = self.popen, None
        if popen is not None and popen.poll() is None:
            popen.send_signal(sig)
            try:
                popen.wait(grace)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"<{exc}>"


class RealCluster:
    """etcd + kube-apiserver + kube-controller-manager for one member cluster named ``name``."""

    def __init__(
        self,
        name: str,
        directory: Path,
        binaries: Path,
        *,
        extra_apiserver_args: Sequence[str] = (),
        kube_binaries: Path | None = None,
    ) -> None:
        """``binaries``: etcd's directory (and the others', unless ``kube_binaries`` gives the
        directory of kube-apiserver, kube-controller-manager and kube-scheduler)."""
        self.name = name
        self.dir = directory
        self.bin = binaries
        self.kube_bin = kube_binaries or binaries
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pki: ClusterPki = make_pki(self.dir / "pki", name)
        self.admin_token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
        tokens = self.dir / "tokens.csv"
        tokens.write_text(f'{self.admin_token},admin,admin-uid,"system:masters"\n')
        tokens.chmod(0o600)
        self.etcd_port, self.peer_port, self.port = free_port(), free_port(), free_port()
        self.audience = ISSUER
        self.audit_policy = self.dir / "audit-policy.yaml"
        self.audit_policy.write_text(AUDIT_POLICY)
        self.admin_kubeconfig = self.kubeconfig(self.dir / "admin.kubeconfig", self.admin_token)
        self.etcd = Process(
            "etcd",
            [
                str(binaries / "etcd"),
                "--name=default",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls=http://{LOOPBACK}:{self.etcd_port}",
                f"--advertise-client-urls=http://{LOOPBACK}:{self.etcd_port}",
                f"--listen-peer-urls=http://{LOOPBACK}:{self.peer_port}",
                f"--initial-advertise-peer-urls=http://{LOOPBACK}:{self.peer_port}",
                f"--initial-cluster=default=http://{LOOPBACK}:{self.peer_port}",
                "--unsafe-no-fsync",  # test data: durability across power loss does not matter
                "--log-level=warn",
            ],
            self.dir / "etcd.log",
        )
        self._extra_apiserver_args = list(extra_apiserver_args)
        self._spares: list[Process] = []
        self.apiserver = self._apiserver_process(self.port, "kube-apiserver")
        self.controller_manager = self._controller_manager_process()
        self.admin = Rest(self.url, str(self.pki.ca_cert), self.admin_token)
        self.scheduler: Process | None = None

    def _controller_manager_process(self) -> Process:
        return Process(
            "kube-controller-manager",
            [
                str(self.kube_bin / "kube-controller-manager"),
                f"--kubeconfig={self.admin_kubeconfig}",
                f"--service-account-private-key-file={self.pki.sa_key}",
                f"--root-ca-file={self.pki.ca_cert}",
                f"--controllers={','.join(CONTROLLERS)}",
                "--use-service-account-credentials",
                "--leader-elect=false",
                "--secure-port=0",
                "--v=1",
            ],
            self.dir / "kube-controller-manager.log",
        )

    def _apiserver_process(self, port: int, name: str) -> Process:
        tokens = self.dir / "tokens.csv"
        return Process(
            name,
            [
                str(self.kube_bin / "kube-apiserver"),
                f"--etcd-servers=http://{LOOPBACK}:{self.etcd_port}",
                f"--bind-address={LOOPBACK}",
                f"--advertise-address={LOOPBACK}",
                f"--secure-port={port}",
                f"--tls-cert-file={self.pki.serving_cert}",
                f"--tls-private-key-file={self.pki.serving_key}",
                f"--client-ca-file={self.pki.ca_cert}",
                f"--token-auth-file={tokens}",
                f"--service-account-issuer={ISSUER}",
                f"--api-audiences={ISSUER}",
                f"--service-account-key-file={self.pki.sa_pub}",
                f"--service-account-signing-key-file={self.pki.sa_key}",
                "--authorization-mode=RBAC",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                "--profiling=false",
                "--v=1",
                f"--audit-policy-file={self.audit_policy}",
                f"--audit-log-path={self.dir / (name + '-audit.log')}",
                "--audit-log-format=json",
                *self._extra_apiserver_args,
            ],
            self.dir / f"{name}.log",
        )

    def spare_apiserver(self) -> tuple[Process, Rest]:
        """Another kube-apiserver on the same etcd (as in an HA control plane), started and ready to
        be waited for; writes through it while the main one is down are what isthmus must catch up on."""
        port = free_port()
        proc = self._apiserver_process(port, "kube-apiserver-spare")
        proc.start()
        self._spares.append(proc)
        return proc, Rest(f"https://{LOOPBACK}:{port}", str(self.pki.ca_cert), self.admin_token)

    def audit(self, group: str = READER_GROUP) -> list[dict[str, Any]]:
        """The audit events (Metadata level) of the users in ``group``, from every API server of the
        cluster: who asked for what, and the answer's code."""
        events = []
        for path in sorted(self.dir.glob("*-audit.log")):
            for line in path.read_text().splitlines():
                event = json.loads(line)
                if group in (event.get("user") or {}).get("groups", []):
                    events.append(event)
        return events

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    def processes(self) -> list[Process]:
        extra = [self.scheduler] if self.scheduler is not None else []
        return [self.etcd, self.apiserver, *self._spares, self.controller_manager, *extra]

    def start_scheduler(self) -> None:
        self.scheduler = Process(
            "kube-scheduler",
            [
                str(self.kube_bin / "kube-scheduler"),
                f"--kubeconfig={self.admin_kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
                "--v=1",
            ],
            self.dir / "kube-scheduler.log",
        )
        self.scheduler.start()

    def stop_control_plane(self) -> None:
        """Stop the scheduler, controller manager and API server (SIGTERM, in that order); etcd and
        everything it stores stay. ``start_control_plane`` brings them back."""
        if self.scheduler is not None:
            self.scheduler.stop(grace=5)
        self.controller_manager.stop(grace=5)
        self.apiserver.stop(grace=10)

    def start_control_plane(self, kube_binaries: Path | None = None, timeout: float = 60.0) -> None:
        """Blocking, from the main thread: the API server (from ``kube_binaries`` if given: e.g. an
        upgrade), against the same etcd with the same flags, until /readyz; then the controller
        manager and (if the cluster had one) the scheduler from the same directory."""
        if kube_binaries is not None:
            self.kube_bin = kube_binaries
        had_scheduler = self.scheduler is not None
        self.apiserver = self._apiserver_process(self.port, "kube-apiserver")
        self.controller_manager = self._controller_manager_process()
        self.start_apiserver()
        self.wait_ready_blocking(timeout)
        self.controller_manager.start()
        if had_scheduler:
            self.start_scheduler()

    async def version(self) -> str:
        """The API server's gitVersion (GET /version), e.g. ``v1.37.2``."""
        answer = await self.admin.request("GET", "/version")
        return str(answer["gitVersion"])

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        self.etcd.start()
        self.start_apiserver()
        self.wait_ready_blocking(timeout)
        self.controller_manager.start()

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop(grace=5)
        self.controller_manager.stop(grace=5)
        for spare in self._spares:
            spare.stop(grace=10)
        self.apiserver.stop(grace=10)
        self.etcd.stop(grace=10)

    def start_apiserver(self) -> None:
        self.apiserver.start()

    def stop_apiserver(self, kill: bool = False) -> None:
        self.apiserver.stop(grace=10, sig=signal.SIGKILL if kill else signal.SIGTERM)

    def _ready_request(self) -> urllib.request.Request:
        return urllib.request.Request(
            f"{self.url}/readyz", headers={"Authorization": f"Bearer {self.admin_token}"}
        )

    def wait_ready_blocking(self, timeout: float = 60.0) -> None:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for proc in (self.etcd, self.apiserver):
                if not proc.running:
                    raise RuntimeError(f"{self.name}: {proc.name} exited:\n{proc.tail()}")
            try:
                with urllib.request.urlopen(self._ready_request(), context=context, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: kube-apiserver not ready in {timeout:.0f}s ({last})")

    async def wait_ready(self, timeout: float = 60.0) -> None:
        await self.admin.wait_ready(timeout, alive=lambda: self.apiserver.running)

    # ---- etcd ------------------------------------------------------------------------------

    async def _etcd(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.post(f"http://{LOOPBACK}:{self.etcd_port}{path}", json=body) as resp,
        ):
            text = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"etcd {path}: HTTP {resp.status}: {text}")
            result: dict[str, Any] = json.loads(text)
            return result

    async def etcd_revision(self) -> int:
        answer = await self._etcd("/v3/kv/range", {"key": base64.b64encode(b"\0").decode(), "limit": 1})
        return int(answer["header"]["revision"])

    async def compact(self) -> int:
        """Compact etcd's history up to its current revision (physically); returns that revision."""
        revision = await self.etcd_revision()
        await self._etcd("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    # ---- credentials -----------------------------------------------------------------------

    def kubeconfig(self, path: Path, token: str, *, ca_pem: str | None = None) -> Path:
        """A kubeconfig for this cluster with a bearer token (and, to test refusals, another CA)."""
        ca = ca_pem if ca_pem is not None else self.pki.ca_pem
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": self.name,
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(ca.encode()).decode(),
                    },
                }
            ],
            "users": [{"name": f"{self.name}-user", "user": {"token": token}}],
            "contexts": [{"name": self.name, "context": {"cluster": self.name, "user": f"{self.name}-user"}}],
            "current-context": self.name,
        }
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        path.chmod(0o600)
        return path

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ({p.log_path})\n{p.tail()}" for p in self.processes())
