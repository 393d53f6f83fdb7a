"""Drains through the configuration API (issue 14), against a real kube-apiserver: two replicas of
``isthmus serve`` read the MemberCluster objects (isthmus.io/v1alpha1, deploy/crds) of one
namespace; ``isthmus drain`` against either writes the drain into the object and both replicas
apply the same steps; one of them, the holder of the status Lease, writes the progress back; a
replica restarted in the middle resumes from the recorded weight instead of sending traffic back
first; the undrain goes the same way."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from isthmus.discovery.file import example_mesh_text
from realkube.binaries import ROOT
from realkube.cluster import LOOPBACK, RealCluster
from realkube.rest import ApiError
from realkube.wait import until

pytestmark = pytest.mark.realkube

NS = "isthmus-system"
MEMBER_CLUSTERS = "/apis/isthmus.io/v1alpha1/namespaces/isthmus-system/memberclusters"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class Replica:
    def __init__(self, name: str, directory: Path, mesh: Path, kubeconfig: Path) -> None:
        self.name, self.mesh, self.kubeconfig = name, mesh, kubeconfig
        self.admin = free_port()
        self.xds = free_port()
        self.log = directory / f"{name}.log"
        self.ca = directory / "ca"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "isthmus.cli", "--log-level", "info", "serve",
            "--mesh", str(self.mesh),
            "--xds-address", f"{LOOPBACK}:{self.xds}",
            "--admin-address", f"{LOOPBACK}:{self.admin}",
            "--ca-dir", str(self.ca),
            "--config-namespace", NS,
            "--home-kubeconfig", str(self.kubeconfig),
            "--drain-step", "0.2",
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def identity_prefix(self) -> str:
        assert self.proc is not None
        return f"-{self.proc.pid}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.admin}{path}", timeout=5) as response:
            return json.loads(response.read())

    async def ready(self) -> None:
        async def up() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                return bool(await asyncio.to_thread(self.get, "/readyz"))
            except OSError:
                return False

        await until(up, f"replica {self.name} ready", timeout=60)

    def drain(self, cluster: str) -> dict[str, Any]:
        progress: dict[str, Any] = self.get("/drain").get(cluster, {})
        return progress

    def cli_drain(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "isthmus.cli", "drain", *args, "--no-wait"]
        argv += ["--admin-address", f"{LOOPBACK}:{self.admin}"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[Replica]]:
    made: list[Replica] = []
    yield made
    for replica in made:
        replica.stop()
        print(f"--- {replica.name}\n{replica.log.read_text(errors='replace')[-4000:]}")


async def test_a_drain_written_into_the_member_cluster_object_is_followed_by_every_replica(
    real_cluster_factory: Callable[..., list[RealCluster]], replicas: list[Replica], tmp_path: Path
) -> None:
    [home] = real_cluster_factory("cfg")
    for path in sorted((ROOT / "deploy" / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                await home.admin.apply(doc)
    await home.admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})

    async def served() -> bool:
        try:
            return bool(await home.admin.request("GET", MEMBER_CLUSTERS))
        except ApiError as exc:
            if exc.status in (404, 429, 503):
                return False
            raise

    await until(served, "the MemberCluster CRD to be served")
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(example_mesh_text())
    a = Replica("a", tmp_path, mesh, home.admin_kubeconfig)
    b = Replica("b", tmp_path, mesh, home.admin_kubeconfig)
    replicas.extend([a, b])
    a.start()
    await a.ready()  # makes the development root; b reads it
    b.start()
    await b.ready()

    # Drain east through replica a: it goes into east's object, and both replicas drain.
    asked = a.cli_drain("east")
    assert asked.returncode == 0, asked.stderr
    stored = await home.admin.request("GET", f"{MEMBER_CLUSTERS}/east")
    assert stored["spec"] == {"drain": {"weight": 0}}

    async def drained(replica: Replica, weight: int) -> bool:
        progress = await asyncio.to_thread(replica.drain, "east")
        return progress.get("state") == "done" and progress.get("weight") == weight

    for replica in (a, b):
        await until(lambda r=replica: drained(r, 0), f"replica {replica.name} to drain east")

    # One replica, the Lease holder, wrote the progress back.
    async def recorded(weight: int) -> dict[str, Any] | None:
        obj = await home.admin.request("GET", f"{MEMBER_CLUSTERS}/east")
        drain = (obj.get("status") or {}).get("drain") or {}
        return obj if drain.get("weight") == weight and drain.get("state") == "done" else None

    obj = await until(lambda: recorded(0), "east's status to record the drain")
    assert obj["status"]["drain"]["proxiesWaiting"] == 0
    lease = await home.admin.request(
        "GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/isthmus-status"
    )
    holder = lease["spec"]["holderIdentity"]
    assert holder.endswith((a.identity_prefix, b.identity_prefix)), holder

    # A restarted replica resumes from the recorded weight: east is drained from its first moment.
    a.stop()
    a.start()
    await a.ready()
    first = await asyncio.to_thread(a.drain, "east")
    assert first.get("weight") == 0, first
    assert first.get("steps") == [0], first  # never back to 100 on the way

    # Undrain through replica b; both come back, and the status says so.
    asked = b.cli_drain("east", "--undo")
    assert asked.returncode == 0, asked.stderr
    for replica in (a, b):
        await until(lambda r=replica: drained(r, 100), f"replica {replica.name} to undrain east")
    await until(lambda: recorded(100), "east's status to record the undrain")
