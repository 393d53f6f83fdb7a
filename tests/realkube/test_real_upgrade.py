"""The seed's upgrade promise, for real (issue 14): a member cluster's Kubernetes is upgraded under
traffic, drained through its MemberCluster object and brought back, and not one request fails.

::

    east (v1.37.2 throughout; the home cluster)            west (v1.36.3 -> v1.37.2)
      client -- web (ClusterIP) --> web-east                 client -- web (ClusterIP) --> web-west
      client -- api (clusterset IP) --> west's gateway -->   api-west <-- api (ClusterIP) -- client
      web-east <-- east's gateway <-- web, while west is drained ---------------------- client

* Two real clusters with a real node each (realkube.fixtures.clusters_with_nodes), sidecars
  injected by isthmus's webhook into every pod of namespace ``shop``, an east-west gateway in each
  cluster as a host-network pod, pods masqueraded to their node's transit address (realkube.mesh).
  West starts with the previous Kubernetes version (``KUBE_PREVIOUS_VERSION``, v1.36.3: kube-apiserver,
  kube-controller-manager, kube-scheduler, kubelet and kube-proxy, ``kube_bin("previous")``), east
  with ``KUBE_VERSION`` (v1.37.2); both run the one etcd build.
* One ``isthmus serve`` (root namespace, loopback) watches both clusters with the reader role and
  reads the configuration API in east, the home cluster (``--config-namespace isthmus-system``,
  the CRDs of deploy/crds, ``--drain-step 1``); every sidecar and both gateways reach its xDS port at
  east's transit address (forwarded into the root namespace), west's across the transit bridge.
* ``web`` runs in both clusters (each pod answers its cluster's name), ``api`` only in west. Four
  request streams, each a Python process in an injected client pod's network namespace (so its
  connections are captured by the pod's nft rules and go through the pod's sidecar, as the
  container's own would; one request at a time, a new connection each, 10 s timeout, 50 ms pause)
  run for the whole test: west's client to ``web`` and to ``api`` (by their ClusterIPs in west),
  east's client to ``web`` (ClusterIP in east) and to ``api`` (its clusterset IP, from the
  sidecar's DNS: east has no api Service).

What a drain of west changes, given the priorities: west's own client prefers west's web (its own
cluster, priority 0); drained, west's endpoints go after everything else, so that client is answered
by web-east through east's gateway. East's client was served by east already and stays so. api has
endpoints in west only: a drained cluster's endpoints are still used when nothing else is left, so
both clients keep reaching api-west (east's through west's gateway) while west is drained and
upgraded: its workloads keep running, only its Kubernetes is replaced. The test asserts each of
those (answers, and the counters of the sidecars and of east's gateway), and that during the drain
both clusters answered west's client (the drain is gradual).

The upgrade, in the order of a real one: drain west (``spec.drain.weight: 0`` patched into its
MemberCluster object; wait for ``status.drain`` done at 0); stop west's scheduler, controller manager
and API server and start them from the v1.37.2 binaries against the same etcd (never stopped) and the
same PKI and flags, until /readyz and GET /version says v1.37.2; then stop the kubelet and kube-proxy
(containerd, its shims and so the containers keep running) and start the v1.37.2 ones on the same
root directory and configuration, until the Node is Ready with kubeletVersion v1.37.2 and kube-proxy's
/metrics reports v1.37.2; healthy: a new namespace gets its ServiceAccount (the new controller
manager) and a new pod there is scheduled (the new scheduler), run by the new kubelet and Ready; the
pods that were running are still running, the same containers (containerd's task ids and pids, and
the API's restartCount): the new kubelet took them over and restarted none; then undrain (weight 100,
status done) and west's client is answered by web-west again. 0 failed requests of every stream
over the whole run. The figures (requests, how long each phase took) are printed and recorded in
docs/resilience.md, never asserted as timings.

Where reality made the scenario differ from the plain "stop everything, start the new binaries":
the control plane and the node are upgraded one after the other, the control plane first, as a
real upgrade does (a v1.36 kubelet against a v1.37 API server is a supported skew), and each
phase's time is its own. The API servers run with ``--shutdown-watch-termination-grace-period=2s``
(APISERVER_ARGS: with the default, a SIGTERMed kube-apiserver waits up to 60 s for its open watches
and the stop would end in a SIGKILL). The requests come from Python processes in the client pods'
network namespaces, not from the pods' own container (its image has curl and no shell to loop in):
the same capture and sidecar, a client that can count. Whether the new kubelet reported a pod not
Ready is recorded (polled) and printed, not asserted: that is the kubelet's behaviour, and isthmus
must cope either way; in our runs it never did.

Everything is removed at the end, also on failure or interruption: the streams, isthmus, the
namespaces and webhook configurations, the nodes and clusters (the fixtures'), the Topology.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from realkube.binaries import ROOT, kube_bin, versions
from realkube.cluster import Process, RealCluster
from realkube.fixtures import READER_NAMESPACE, clusters_with_nodes, reader_kubeconfig
from realkube.mesh import (
    GATEWAY_NS,
    GATEWAY_POD,
    GATEWAY_PORT,
    SHOP,
    Cluster,
    client_pod,
    gateway_admin,
    gateway_bootstrap,
    gateway_objects,
    import_curl,
    is_ready,
    masquerade,
    pod_pid,
    proxy_admin,
    ready_pod,
    resolve,
    stat,
)
from realkube.node import APP_IMAGE, Node, available
from realkube.objects import deployment, service
from realkube.rest import ApiError, path_of
from realkube.test_real_inject import (
    PROXY,
    Isthmus,
    names,
    namespaces,
    registered,
    serving,
    webhook_active,
    webhook_configuration,
)
from realkube.wait import until

pytestmark = [pytest.mark.realkube, pytest.mark.timeout(900)]

CONFIG_NS = READER_NAMESPACE  # the home cluster's namespace of the MemberCluster objects
MEMBER_CLUSTERS = f"/apis/isthmus.io/v1alpha1/namespaces/{CONFIG_NS}/memberclusters"
# A SIGTERMed kube-apiserver closes its watches within this time and exits; with the default (0)
# it waits for them up to its HTTP shutdown timeout, 60 s, with one watch open (measured), and the
# test's 10 s grace would end it with SIGKILL instead of the orderly stop an upgrade makes.
APISERVER_ARGS = ("--shutdown-watch-termination-grace-period=2s",)
CHECK_NS = "upgrade-check"  # not labelled for injection: the post-upgrade health check's pod
# A request stream (argv: host, port, output file[, "once"]): GET / one at a time, a new connection
# each, 10 s timeout; one JSON line per request: [started, ended, ok, answer or error]. Times are
# time.monotonic(), the system's CLOCK_MONOTONIC, which the test process reads too. SIGTERM ends it
# after the request in flight.
LOAD = """
import http.client, json, signal, sys, time
host, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
once = sys.argv[4:] == ["once"]
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
with open(out, "a", buffering=1) as f:
    while not stop:
        started = time.monotonic()
        try:
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", "/")
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace").strip()
            conn.close()
            ok = resp.status == 200
            answer = body if ok else f"HTTP {resp.status}: {body[:200]}"
        except Exception as exc:
            ok, answer = False, f"{type(exc).__name__}: {exc}"
        f.write(json.dumps([started, time.monotonic(), ok, answer]) + "\\n")
        if once:
            break
        time.sleep(0.05)
"""


def why_not() -> str | None:
    if (why := available()) is not None:
        return why
    if shutil.which("curl") is None:
        return "curl is not installed (hack/node-packages.sh installs it)"
    return None


# ---- request streams -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    started: float
    ended: float
    ok: bool
    answer: str  # the body (the answering pod's name) or the error


@dataclass
class Stream:
    """Requests from an injected pod's network namespace to ``address``:80, through its sidecar."""

    name: str
    node: Node
    pod: dict[str, Any]
    address: str
    out: Path
    process: Process | None = None

    def argv(self, *extra: str) -> list[str]:
        netns = f"/proc/{pod_pid(self.node, self.pod)}/ns/net"
        return ["nsenter", f"--net={netns}", "--", sys.executable, "-c", LOAD, self.address, "80", *extra]

    async def once(self) -> Sample:
        probe = self.out.with_suffix(".probe")
        probe.unlink(missing_ok=True)
        done = await asyncio.create_subprocess_exec(
            *self.argv(str(probe), "once"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _, err = await asyncio.wait_for(done.communicate(), 30)
        assert done.returncode == 0, err.decode()
        return read_samples(probe)[0]

    def start(self) -> None:
        """From the main thread (the stream dies with the test process: see cluster.Process)."""
        self.process = Process(f"stream {self.name}", self.argv(str(self.out)), self.out.with_suffix(".log"))
        self.process.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace=15)

    def samples(self) -> list[Sample]:
        return read_samples(self.out) if self.out.exists() else []


def read_samples(path: Path) -> list[Sample]:
    return [Sample(*json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def answers(samples: list[Sample]) -> dict[str, int]:
    counted: dict[str, int] = {}
    for sample in samples:
        key = sample.answer if sample.ok else "FAILED"
        counted[key] = counted.get(key, 0) + 1
    return counted


def between(samples: list[Sample], start: float, end: float = float("inf")) -> list[Sample]:
    """The requests started at or after ``start`` and ended by ``end``."""
    return [s for s in samples if s.started >= start and s.ended <= end]


# ---- the mesh --------------------------------------------------------------------------------------


@dataclass
class Upgrade:
    east: Cluster
    west: Cluster
    isthmus: Isthmus
    new: Path  # KUBE_VERSION's bin directory
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)  # "cluster/app" -> its Ready pod
    streams: dict[str, Stream] = field(default_factory=dict)
    watchers: list[Readiness] = field(default_factory=list)

    def logs(self) -> str:
        """The tail of every container's log on both nodes (the kubelet's podLogsDir)."""
        out = []
        for cluster in (self.east, self.west):
            for log in sorted((cluster.node.dir / "pod-logs").glob("*/*/*.log")):
                text = log.read_text(errors="replace")[-2000:]
                out.append(f"--- {cluster.name} {log.parent.parent.name} {log.parent.name}\n{text}")
        return "\n".join(out)


async def crds_served(home: RealCluster) -> None:
    for path in sorted((ROOT / "deploy" / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                await home.admin.apply(doc)

    async def served() -> bool:
        try:
            return bool(await home.admin.request("GET", MEMBER_CLUSTERS))
        except ApiError as exc:
            if exc.status in (404, 429, 503):
                return False
            raise

    await until(served, "the MemberCluster CRD to be served")


@contextlib.asynccontextmanager
async def upgrade_mesh(base: Path) -> AsyncIterator[Upgrade]:
    new, previous = kube_bin("all"), kube_bin("previous")

    def prepare(node: Node) -> None:
        node.import_envoy()
        node.import_capture()
        import_curl(node)
        masquerade(node)

    versions_of = {"west": previous}
    with clusters_with_nodes(
        ("east", "west"), base, new, prepare, kube_binaries=versions_of, apiserver_args=APISERVER_ARGS
    ) as (_, made):
        east, west = Cluster("east", made["east"]), Cluster("west", made["west"])
        kubeconfigs = base / "kubeconfigs"
        kubeconfigs.mkdir()
        for c in (east, west):
            await reader_kubeconfig(c.api, kubeconfigs / f"{c.name}.yaml")  # makes isthmus-system
        await crds_served(east.api)
        for c in (east, west):
            obj: dict[str, Any] = {"apiVersion": "isthmus.io/v1alpha1", "kind": "MemberCluster"}
            obj |= {"metadata": {"name": c.name}, "spec": {"drain": {"weight": 100}}}
            await east.api.admin.request("POST", MEMBER_CLUSTERS, obj)
        xds_host = east.node.address
        isthmus = Isthmus(base / "isthmus", kubeconfigs, xds_sans=(xds_host,), inject_xds_host=xds_host)
        isthmus.process.argv += [
            "--cluster-gateway", f"east={east.node.address}:{GATEWAY_PORT}",
            "--cluster-gateway", f"west={west.node.address}:{GATEWAY_PORT}",
            "--config-namespace", CONFIG_NS,
            "--home-kubeconfig", str(east.api.admin_kubeconfig),
            "--drain-step", "1",
        ]  # fmt: skip
        east.node.expose(isthmus.xds_port)
        upgrade = Upgrade(east, west, isthmus, new)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(serving(isthmus))
            for c in (east, west):
                await stack.enter_async_context(namespaces(c.api, {SHOP: {"isthmus.io/inject": "enabled"}}))
                config = webhook_configuration(
                    f"isthmus-upgrade-{os.getpid()}", c.name, isthmus.webhook_port, isthmus.ca_pem, [SHOP]
                )
                await stack.enter_async_context(registered(c.api, config))
            for c in (east, west):
                await webhook_active(c.api, SHOP)
                bootstrap = gateway_bootstrap(c.name, xds_host, isthmus.xds_port, c.node.address)
                for obj in gateway_objects(bootstrap, isthmus.ca_pem):
                    await c.api.admin.apply(obj)
                await c.api.admin.apply(service("web", SHOP))
                await c.api.admin.apply(deployment("web", f"web-{c.name}", SHOP))
                await c.api.admin.create(client_pod("client", c.node.address))  # no DNS there
            await west.api.admin.apply(service("api", SHOP))
            await west.api.admin.apply(deployment("api", "api-west", SHOP))
            try:
                for c, namespace, app in (
                    (east, GATEWAY_NS, GATEWAY_POD),
                    (west, GATEWAY_NS, GATEWAY_POD),
                    (east, SHOP, "web"),
                    (west, SHOP, "web"),
                    (west, SHOP, "api"),
                    (east, SHOP, "client"),
                    (west, SHOP, "client"),
                ):
                    upgrade.pods[f"{c.name}/{app}"] = await ready_pod(c.api, namespace, app)
                for key in ("east/web", "west/web", "west/api", "east/client", "west/client"):
                    assert PROXY in names(upgrade.pods[key]["spec"]["initContainers"]), key
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{upgrade.logs()}") from None
            try:
                yield upgrade
            finally:
                for stream in upgrade.streams.values():
                    stream.stop()
                for watcher in upgrade.watchers:
                    await watcher.stop()
                print(upgrade.logs())  # while the pods and their logs are still there


# ---- the upgrade's steps -----------------------------------------------------------------------------


async def set_drain(home: RealCluster, cluster: str, weight: int) -> None:
    """What an operator does (kubectl patch): the MemberCluster's spec.drain.weight."""
    body = {"spec": {"drain": {"weight": weight}}}
    headers = {"Content-Type": "application/merge-patch+json"}
    await home.admin.request("PATCH", f"{MEMBER_CLUSTERS}/{cluster}", body, headers)


async def drain_recorded(home: RealCluster, cluster: str, weight: int) -> dict[str, Any]:
    """Until the MemberCluster's status says the drain (or undrain) is done at ``weight``."""

    async def done() -> dict[str, Any] | None:
        obj = await home.admin.request("GET", f"{MEMBER_CLUSTERS}/{cluster}")
        drain = (obj.get("status") or {}).get("drain") or {}
        return drain if drain.get("weight") == weight and drain.get("state") == "done" else None

    return await until(done, f"{cluster}'s status to record the drain done at {weight}", timeout=120)


def running_tasks(node: Node) -> dict[str, int]:
    """containerd's running tasks on ``node`` (container id -> pid): a restarted container is a new id."""
    done = subprocess.run(
        ["ctr", "--address", str(node.sock), "-n", "k8s.io", "tasks", "ls"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    tasks = {}
    for line in done.stdout.splitlines()[1:]:
        task, pid, status = line.split()
        if status == "RUNNING":
            tasks[task] = int(pid)
    return tasks


async def container_statuses(cluster: RealCluster) -> dict[str, tuple[str, int]]:
    """Every container of the pods of shop and isthmus-system as the API has it: id, restarts."""
    found = {}
    for namespace in (SHOP, GATEWAY_NS):
        pods = await cluster.admin.request("GET", path_of("Pod", namespace))
        for pod in pods["items"]:
            status = pod.get("status", {})
            for c in [*status.get("initContainerStatuses", []), *status.get("containerStatuses", [])]:
                found[f"{namespace}/{pod['metadata']['name']}/{c['name']}"] = (
                    c.get("containerID", ""),
                    int(c.get("restartCount", 0)),
                )
    return found


@dataclass
class Readiness:
    """The Ready condition of the pods of shop and isthmus-system in one cluster, polled (every
    0.25 s) while the node is upgraded: whether the new kubelet ever reported one not Ready."""

    cluster: RealCluster
    not_ready: dict[str, list[float]] = field(default_factory=dict)  # pod -> when seen not Ready
    polls: int = 0
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            for namespace in (SHOP, GATEWAY_NS):
                with contextlib.suppress(ApiError, OSError, TimeoutError):
                    pods = await self.cluster.admin.request("GET", path_of("Pod", namespace))
                    for pod in pods["items"]:
                        if not is_ready(pod):
                            key = f"{namespace}/{pod['metadata']['name']}"
                            self.not_ready.setdefault(key, []).append(time.monotonic())
            self.polls += 1
            await asyncio.sleep(0.25)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def node_upgraded(cluster: RealCluster, node: str, version: str) -> dict[str, Any]:
    async def ready() -> dict[str, Any] | None:
        obj = await cluster.admin.get("Node", None, node)
        if obj is None or obj["status"]["nodeInfo"]["kubeletVersion"] != version:
            return None
        conditions = {c["type"]: c["status"] for c in obj["status"].get("conditions", [])}
        return obj if conditions.get("Ready") == "True" else None

    return await until(ready, f"{node} Ready with kubelet {version}", timeout=120)


def kube_proxy_version(node: Node) -> str:
    """kube-proxy's own version, from its /metrics (kubernetes_build_info) in the node's namespace."""
    done = node.run_in("curl", "-sS", "--max-time", "5", "http://127.0.0.1:10249/metrics")
    for line in done.stdout.splitlines():
        if line.startswith("kubernetes_build_info{"):
            return line.split('git_version="', 1)[1].split('"', 1)[0]
    return ""


async def healthy(cluster: Cluster) -> None:
    """The upgraded control plane and node at work: a new namespace gets its ServiceAccount (the
    controller manager; ``namespaces`` waits for it), a new pod is scheduled (the scheduler), run
    (the kubelet) and Ready; all removed again."""
    async with namespaces(cluster.api, {CHECK_NS: {}}):
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "check", "namespace": CHECK_NS, "labels": {"app": "check"}},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "app",
                        "image": APP_IMAGE,
                        "imagePullPolicy": "Never",
                        "args": ["serve", "check"],
                        "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
                    }
                ],
            },
        }
        await cluster.api.admin.create(pod)
        ready = await ready_pod(cluster.api, CHECK_NS, "check", timeout=60)
        assert "initContainers" not in ready["spec"], "the check namespace is not injected"
        assert ready["spec"]["nodeName"] == cluster.node.name


# ---- the test ------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Upgrade]:
    """The two clusters, isthmus and the workloads; all removed afterwards, also when the test fails
    or is interrupted (a fixture's teardown runs then too)."""
    if (why := why_not()) is not None:
        pytest.skip(why)
    async with upgrade_mesh(tmp_path / "upgrade") as made:
        yield made


async def test_a_member_cluster_is_upgraded_under_traffic_with_no_failed_request(
    mesh: Upgrade, tmp_path: Path
) -> None:
    pinned = versions()
    old_version, new_version = pinned["KUBE_PREVIOUS_VERSION"], pinned["KUBE_VERSION"]
    east, west, home = mesh.east, mesh.west, mesh.east.api
    assert await west.api.version() == old_version
    assert await east.api.version() == new_version
    node = await west.api.admin.get("Node", None, west.node.name)
    assert node is not None
    assert node["status"]["nodeInfo"]["kubeletVersion"] == old_version
    assert kube_proxy_version(west.node) == old_version

    async def cluster_ip(c: Cluster, name: str) -> str:
        found = await c.api.admin.get("Service", SHOP, name)
        assert found is not None, name
        return str(found["spec"]["clusterIP"])

    east_client, west_client = mesh.pods["east/client"], mesh.pods["west/client"]
    api_clusterset = resolve(east.node, east_client, f"api.{SHOP}.svc.cluster.local")
    assert api_clusterset.startswith("240.240."), api_clusterset
    runs = tmp_path / "streams"
    runs.mkdir()
    for name, c, pod, address, expected in (
        ("west-web", west, west_client, await cluster_ip(west, "web"), "web-west"),
        ("west-api", west, west_client, await cluster_ip(west, "api"), "api-west"),
        ("east-web", east, east_client, await cluster_ip(east, "web"), "web-east"),
        ("east-api", east, east_client, api_clusterset, "api-west"),
    ):
        stream = Stream(name, c.node, pod, address, runs / f"{name}.jsonl")

        async def answered(s: Stream = stream, want: str = expected) -> bool:
            got = await s.once()
            return got.ok and got.answer == want

        await until(answered, f"{name} answered by {expected}", timeout=60)
        mesh.streams[name] = stream
    # From here on, every request counts.
    marks: dict[str, float] = {"start": time.monotonic()}
    for stream in mesh.streams.values():
        stream.start()
    await asyncio.sleep(3)

    # 1. Drain west through its MemberCluster object in the home cluster.
    marks["drain"] = time.monotonic()
    await set_drain(home, "west", 0)
    recorded = await drain_recorded(home, "west", 0)
    marks["drained"] = time.monotonic()
    assert recorded["proxiesWaiting"] == 0, recorded
    progress = await asyncio.to_thread(isthmus_get, mesh.isthmus, "/drain")
    assert (progress["west"]["weight"], progress["west"]["state"]) == (0, "done"), progress
    web = f"outbound|80||web.{SHOP}.svc.cluster.local"
    at_gateway = f"{web}::{east.node.address}:{GATEWAY_PORT}::rq_success::"
    sni = f"outbound_.80_._.web.{SHOP}.svc.cluster.local"
    sent = f"cluster.{sni}.upstream_cx_tx_bytes_total"
    client_before = host_stat(proxy_admin(west.node, west_client, "/clusters"), at_gateway)
    gateway_before = stat(gateway_admin(east.node, "/stats"), sent)
    await asyncio.sleep(3)
    # West's client is answered by east, through east's gateway (its sidecar's requests to
    # east's gateway succeed; the gateway passes bytes on to web's sidecar in east).
    client_after = host_stat(proxy_admin(west.node, west_client, "/clusters"), at_gateway)
    gateway_after = stat(gateway_admin(east.node, "/stats"), sent)
    assert client_after > client_before, (client_before, client_after)
    assert gateway_after > gateway_before, (gateway_before, gateway_after)

    # 2. Upgrade west's control plane: the same etcd, the new binaries.
    marks["control plane down"] = time.monotonic()
    west.api.stop_control_plane()
    marks["control plane stopped"] = time.monotonic()
    west.api.start_control_plane(mesh.new)
    marks["control plane up"] = time.monotonic()
    assert await west.api.version() == new_version
    # isthmus kept west's endpoints meanwhile (no stream failed) and reads west again.
    resynced = "cluster west: API server reachable again"
    await until(lambda: asyncio.sleep(0, resynced in mesh.isthmus.log()), "isthmus to read west again")
    marks["isthmus reads west"] = time.monotonic()

    # 3. Upgrade west's node: kubelet and kube-proxy, the containers left running.
    tasks_before = running_tasks(west.node)
    statuses_before = await container_statuses(west.api)
    readiness = Readiness(west.api)
    mesh.watchers.append(readiness)
    readiness.start()
    marks["node down"] = time.monotonic()
    west.node.stop_kubelet_and_proxy()
    west.node.start_kubelet_and_proxy(mesh.new)
    await node_upgraded(west.api, west.node.name, new_version)
    marks["node up"] = time.monotonic()
    proxy = await until(lambda: asyncio.to_thread(kube_proxy_version, west.node), "kube-proxy's metrics")
    assert proxy == new_version
    await healthy(west)
    marks["healthy"] = time.monotonic()
    await asyncio.sleep(2)
    await readiness.stop()

    # 4. Undrain west: its own client is answered by west again.
    marks["undrain"] = time.monotonic()
    await set_drain(home, "west", 100)
    await drain_recorded(home, "west", 100)
    marks["undrained"] = time.monotonic()
    await asyncio.sleep(3)
    for stream in mesh.streams.values():
        assert stream.process is not None, stream.name
        assert stream.process.running, f"{stream.name} exited:\n{stream.process.tail()}"
        stream.stop()
    marks["end"] = time.monotonic()

    samples = {name: stream.samples() for name, stream in mesh.streams.items()}
    report = figures(samples, marks, old_version, new_version)
    report += f"\n  pods seen not Ready while the node was upgraded ({readiness.polls} polls): "
    report += ", ".join(f"{k} x{len(v)}" for k, v in readiness.not_ready.items()) or "none"
    print(report)

    # The same containers still run: the new kubelet restarted none of them.
    tasks_after = running_tasks(west.node)
    statuses_after = await container_statuses(west.api)
    workload = {k: v for k, v in statuses_before.items() if not k.startswith(f"{CHECK_NS}/")}
    assert {k: statuses_after.get(k) for k in workload} == workload, (statuses_before, statuses_after)
    assert all(restarts == 0 for _, restarts in workload.values()), workload
    assert {t: tasks_after.get(t) for t in tasks_before} == tasks_before, (tasks_before, tasks_after)
    for key, pod in mesh.pods.items():
        cluster = east if key.startswith("east/") else west
        meta = pod["metadata"]
        current = await cluster.api.admin.get("Pod", meta["namespace"], meta["name"])
        assert current is not None, key
        assert is_ready(current), key
        assert current["metadata"]["uid"] == pod["metadata"]["uid"], key

    # East's client reached api, which only west has, through west's gateway the whole time.
    api = f"outbound|80||api.{SHOP}.svc.cluster.local"
    through_west = host_stat(
        proxy_admin(east.node, mesh.pods["east/client"], "/clusters"),
        f"{api}::{west.node.address}:{GATEWAY_PORT}::rq_success::",
    )
    assert through_west >= len(samples["east-api"]), (through_west, len(samples["east-api"]))

    # Every proxy of west kept its one xDS stream through the upgrade (none reconnected).
    log = mesh.isthmus.log()
    for proxy in ("gateway~isthmus-gateway.isthmus-system~west", "sidecar~client.shop~west"):
        assert log.count(f"proxy {proxy} connected") == 1, proxy
    west_streams = [line for line in log.splitlines() if "~west connected" in line]
    assert len(west_streams) == 4, west_streams  # the gateway, client, web and api

    failed = {name: [s for s in got if not s.ok][:5] for name, got in samples.items()}
    assert not any(failed.values()), f"{failed}\n{report}"
    # What the drain changed, and what it did not.
    west_web = samples["west-web"]
    assert set(answers(between(west_web, marks["start"], marks["drain"]))) == {"web-west"}, report
    assert {"web-west", "web-east"} <= set(answers(between(west_web, marks["drain"], marks["drained"])))
    assert set(answers(between(west_web, marks["drained"], marks["undrain"]))) == {"web-east"}, report
    assert set(answers(between(west_web, marks["undrained"]))) == {"web-west"}, report
    assert set(answers(samples["east-web"])) == {"web-east"}, report
    assert set(answers(samples["west-api"])) == {"api-west"}, report
    assert set(answers(samples["east-api"])) == {"api-west"}, report
    # ... and every stream kept going through the upgrade (not stalled in it).
    for name, got in samples.items():
        assert between(got, marks["control plane down"], marks["control plane up"]), name
        assert between(got, marks["node down"], marks["node up"]), name


def host_stat(clusters: str, prefix: str) -> int:
    """A per-host counter of an Envoy /clusters text (``CLUSTER::HOST:PORT::NAME::VALUE``)."""
    for line in clusters.splitlines():
        if line.startswith(prefix):
            return int(line[len(prefix) :])
    raise AssertionError(f"no {prefix} in\n{clusters}")


def isthmus_get(isthmus: Isthmus, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{isthmus.admin_port}{path}", timeout=5) as response:
        return json.loads(response.read())


def figures(samples: dict[str, list[Sample]], marks: dict[str, float], old: str, new: str) -> str:
    """The run in numbers, for docs/resilience.md."""
    total = sum(len(s) for s in samples.values())
    failed = sum(1 for got in samples.values() for s in got if not s.ok)
    took = marks["end"] - marks["start"]
    lines = [f"upgrade {old} -> {new}: {failed} failed of {total} requests in {took:.1f} s"]
    for name, got in samples.items():
        lines.append(f"  {name}: {len(got)} requests, answers {answers(got)}")
    phases = (
        ("drain (status done at 0)", "drain", "drained"),
        ("control plane stop", "control plane down", "control plane stopped"),
        ("control plane down to ready on the new version", "control plane down", "control plane up"),
        ("... to isthmus reading west again", "control plane down", "isthmus reads west"),
        ("kubelet and kube-proxy down to Node Ready on the new version", "node down", "node up"),
        ("health check (namespace, pod scheduled and Ready)", "node up", "healthy"),
        ("undrain (status done at 100)", "undrain", "undrained"),
        ("drained, in all", "drained", "undrain"),
    )
    for what, start, end in phases:
        lines.append(f"  {what}: {marks[end] - marks[start]:.1f} s")
    return "\n".join(lines)
