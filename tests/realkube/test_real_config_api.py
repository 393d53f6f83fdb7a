"""The configuration API (issue 14), against a real kube-apiserver.

* Drains: two replicas of ``isthmus serve`` read the MemberCluster objects (isthmus.io/v1alpha1,
  deploy/crds) of one namespace; ``isthmus drain`` against either writes the drain into the object
  and both replicas apply the same steps; one of them, the holder of the status Lease, writes the
  progress back; a replica restarted in the middle resumes from the recorded weight instead of
  sending traffic back first; the undrain goes the same way.
* MeshConfig: the one named ``default`` overrides flags from the first push on and while running
  (export policy, staleness, debounce); its status and the admin API say which value is in force and
  where it comes from; a spec the schema refuses never reaches isthmus (422), one the schema accepts
  but isthmus cannot apply (a withdraw time shorter than the staleness) is reported in its Accepted
  condition and changes nothing; a trust domain changed while running waits for a restart, says so,
  and is in force after it. MemberCluster objects get Accepted and Synced conditions.
"""

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
from realkube.objects import endpoint_slice, service_without_selector
from realkube.rest import ApiError
from realkube.wait import until

pytestmark = pytest.mark.realkube

NS = "isthmus-system"
MEMBER_CLUSTERS = "/apis/isthmus.io/v1alpha1/namespaces/isthmus-system/memberclusters"
MESH_CONFIGS = "/apis/isthmus.io/v1alpha1/namespaces/isthmus-system/meshconfigs"
MERGE = {"Content-Type": "application/merge-patch+json"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class Replica:
    def __init__(self, name: str, directory: Path, mesh: Path | None, kubeconfig: Path, *extra: str) -> None:
        self.name, self.mesh, self.kubeconfig, self.extra = name, mesh, kubeconfig, extra
        self.admin = free_port()
        self.xds = free_port()
        self.log = directory / f"{name}.log"
        self.ca = directory / "ca"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "isthmus.cli", "--log-level", "info", "serve",
            *(["--mesh", str(self.mesh)] if self.mesh is not None else []),
            *self.extra,
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


async def install_api(home: RealCluster) -> None:
    """The CRDs of deploy/crds and the configuration namespace, once both kinds are served."""
    for path in sorted((ROOT / "deploy" / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                await home.admin.apply(doc)
    await home.admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})

    async def served() -> bool:
        try:
            for path in (MEMBER_CLUSTERS, MESH_CONFIGS):
                await home.admin.request("GET", path)
            return True
        except ApiError as exc:
            if exc.status in (404, 429, 503):
                return False
            raise

    await until(served, "the MemberCluster and MeshConfig CRDs to be served")


async def test_a_drain_written_into_the_member_cluster_object_is_followed_by_every_replica(
    real_cluster_factory: Callable[..., list[RealCluster]], replicas: list[Replica], tmp_path: Path
) -> None:
    [home] = real_cluster_factory("cfg")
    await install_api(home)
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


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    found = [c for c in ((obj or {}).get("status") or {}).get("conditions") or () if c["type"] == kind]
    return found[0] if found else {}


async def test_the_mesh_config_overrides_flags_says_what_is_in_force_and_refuses_what_is_invalid(
    real_cluster_factory: Callable[..., list[RealCluster]], replicas: list[Replica], tmp_path: Path
) -> None:
    [home] = real_cluster_factory("mesh")
    await install_api(home)
    # The home cluster is also the member cluster "home": one Service, with an endpoint.
    await home.admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    await home.admin.create(service_without_selector())
    await home.admin.create(endpoint_slice(["10.1.0.5"]))
    # Before isthmus starts: only exported services, a minute's staleness, a shorter quiet period.
    mesh_config = {
        "apiVersion": "isthmus.io/v1alpha1",
        "kind": "MeshConfig",
        "metadata": {"name": "default"},
        "spec": {"exportPolicy": "serviceexport", "maxStaleness": "60s", "debounce": {"quiet": "0.05s"}},
    }
    await home.admin.request("POST", MESH_CONFIGS, mesh_config)
    await home.admin.request(
        "POST",
        MEMBER_CLUSTERS,
        {**mesh_config, "kind": "MemberCluster", "metadata": {"name": "nowhere"}, "spec": {}},
    )
    member = tmp_path / "home.kubeconfig"
    member.write_bytes(home.admin_kubeconfig.read_bytes())
    replica = Replica(
        "a", tmp_path, None, home.admin_kubeconfig, "--cluster", f"home={member}", "--max-staleness", "120"
    )
    replicas.append(replica)
    replica.start()
    await replica.ready()

    def settings() -> dict[str, Any]:
        found: dict[str, Any] = replica.get("/readyz")["settings"]
        return found

    # In force from the first view: the service is not exported, so not in the mesh.
    now = await asyncio.to_thread(settings)
    assert now["mesh_config"] == "applied", now
    in_force = now["in_force"]
    assert in_force["exportPolicy"] == {"value": "serviceexport", "source": "meshconfig"}
    assert in_force["maxStaleness"] == {"value": "60s", "source": "meshconfig"}  # over the flag's 120
    assert in_force["debounce"] == {"value": "0.05s,1s", "source": "meshconfig"}
    assert in_force["withdrawAfter"] == {"value": "never", "source": "default"}
    assert in_force["trustDomain"] == {"value": "cluster.local", "source": "default"}
    assert (await asyncio.to_thread(replica.get, "/readyz"))["services"] == 0

    # The status says the same, written by the Lease holder (the only replica).
    async def status_of(path: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        obj = await home.admin.request("GET", path)
        return obj if check(obj) else None

    obj = await until(
        lambda: status_of(f"{MESH_CONFIGS}/default", lambda o: bool(condition(o, "Accepted"))),
        "the MeshConfig's status",
    )
    assert condition(obj, "Accepted")["status"] == "True"
    assert condition(obj, "Applied")["status"] == "True"
    listed = {s["name"]: (s["value"], s["source"]) for s in obj["status"]["inForce"]}
    assert listed["maxStaleness"] == ("60s", "meshconfig")
    assert listed["clustersetRange"] == ("240.240.0.0/16", "default")
    # Made by isthmus for its member cluster (so that `kubectl patch` finds it), with its conditions.
    home_obj = await until(
        lambda: status_of(
            f"{MEMBER_CLUSTERS}/home", lambda o: condition(o, "Synced").get("status") == "True"
        ),
        "member cluster home's Synced condition",
        retry_on=(ApiError,),  # 404 until the status Lease's holder made it
    )
    assert condition(home_obj, "Accepted")["status"] == "True"
    nowhere = await until(
        lambda: status_of(f"{MEMBER_CLUSTERS}/nowhere", lambda o: bool(condition(o, "Synced"))),
        "member cluster nowhere's Synced condition",
    )
    assert (condition(nowhere, "Synced")["status"], condition(nowhere, "Synced")["reason"]) == (
        "False",
        "NotAMember",
    )

    # Changed while running: every service again.
    await home.admin.request("PATCH", f"{MESH_CONFIGS}/default", {"spec": {"exportPolicy": "all"}}, MERGE)

    async def services(n: int) -> bool:
        return bool((await asyncio.to_thread(replica.get, "/readyz"))["services"] == n)

    # shop/web and default/kubernetes (the API server's own Service, which has no endpoint here).
    await until(lambda: services(2), "web to join the mesh once every service is exported")
    assert (await asyncio.to_thread(settings))["in_force"]["exportPolicy"]["value"] == "all"

    # The schema refuses what it can see is wrong: isthmus never hears of it.
    for bad in ({"trustDomain": "Not_A_Domain"}, {"debounce": {"quiet": "soon"}}, {"clustersetRange": "x"}):
        with pytest.raises(ApiError) as refused:
            await home.admin.request("PATCH", f"{MESH_CONFIGS}/default", {"spec": bad}, MERGE)
        assert refused.value.status == 422, (bad, refused.value)

    # Valid for the schema, not together with the rest: reported, and nothing of it applied.
    await home.admin.request(
        "PATCH",
        f"{MESH_CONFIGS}/default",
        {"spec": {"withdrawAfter": "30s", "exportPolicy": "serviceexport"}},
        MERGE,
    )
    obj = await until(
        lambda: status_of(
            f"{MESH_CONFIGS}/default", lambda o: condition(o, "Accepted").get("status") == "False"
        ),
        "the MeshConfig's Accepted condition to turn False",
    )
    accepted = condition(obj, "Accepted")
    assert accepted["reason"] == "InvalidSpec"
    assert "withdraw" in accepted["message"], accepted
    assert accepted["observedGeneration"] == obj["metadata"]["generation"]
    now = await asyncio.to_thread(settings)
    assert now["mesh_config"].startswith("invalid"), now
    assert now["in_force"]["exportPolicy"]["value"] == "all"  # the last valid spec stays
    assert now["in_force"]["withdrawAfter"]["value"] == "never"
    assert (await asyncio.to_thread(replica.get, "/readyz"))["services"] == 2
    await home.admin.request("PATCH", f"{MESH_CONFIGS}/default", {"spec": {"withdrawAfter": "600s"}}, MERGE)
    await until(lambda: services(0), "the mended spec to apply (serviceexport again)")

    # Another MeshConfig is not read, and says so.
    await home.admin.request("POST", MESH_CONFIGS, {**mesh_config, "metadata": {"name": "other"}})
    other = await until(
        lambda: status_of(f"{MESH_CONFIGS}/other", lambda o: bool(condition(o, "Accepted"))),
        "the other MeshConfig's status",
    )
    assert (condition(other, "Accepted")["status"], condition(other, "Accepted")["reason"]) == (
        "False",
        "NotRead",
    )

    # The trust domain is the mesh CA's: changed while running, it waits for a restart.
    await home.admin.request(
        "PATCH", f"{MESH_CONFIGS}/default", {"spec": {"trustDomain": "mesh.example"}}, MERGE
    )
    obj = await until(
        lambda: status_of(
            f"{MESH_CONFIGS}/default", lambda o: condition(o, "Applied").get("status") == "False"
        ),
        "the MeshConfig's Applied condition to ask for a restart",
    )
    assert condition(obj, "Applied")["reason"] == "RestartRequired"
    assert (await asyncio.to_thread(settings))["in_force"]["trustDomain"]["value"] == "cluster.local"
    replica.stop()
    # A replica that stops gives the status Lease up: the next takes it at once, not when it expires.
    lease = await home.admin.request(
        "GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/isthmus-status"
    )
    assert not lease["spec"].get("holderIdentity"), lease["spec"]
    replica.start()
    await replica.ready()
    now = await asyncio.to_thread(settings)
    assert now["in_force"]["trustDomain"] == {"value": "mesh.example", "source": "meshconfig"}, now
    await until(
        lambda: status_of(
            f"{MESH_CONFIGS}/default", lambda o: condition(o, "Applied").get("status") == "True"
        ),
        "the MeshConfig's Applied condition after the restart",
    )
