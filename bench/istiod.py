"""istiod and isthmus side by side: the same simulated Envoys against the same real API servers.

Real Kubernetes for three member clusters (etcd, kube-apiserver, kube-controller-manager on loopback,
tests/realkube's RealCluster, started as the real-Kubernetes tier starts them) hold the W1 workload
of bench.load: in every cluster, services ``svc-S`` (namespace ``bench-S%10``, one port ``http``
8080, no selector) and one EndpointSlice each with E ready endpoints (bench.discovery's objects and
addresses, without their targetRef and nodeName: no Pods or Nodes exist, and istiod holds back an
endpoint whose Pod it has not seen). Then, one after the other (``--server``), each control plane
watches the three API servers and serves N simulated Envoys (bench.adsclient, SotW or Delta):

* istiod: pilot-discovery (hack/istiod.sh builds it; bench/peers/istiod/README.md) with m0 as its
  own (config) cluster, the 15 Istio CRDs and namespace istio-system applied, and m1, m2
  registered as remote clusters by Secrets labelled ``istio/multiCluster=true`` in istio-system;
  plain-text xDS on loopback, no CA, no injector, mesh config ``enableAutoMtls: false``. Clients
  have istiod's node ids (``sidecar~IP~NAME.NS~NS.svc.cluster.local``) and ISTIO_VERSION,
  CLUSTER_ID, NAMESPACE, ... in their metadata.
* isthmus: ``isthmus serve --cluster mC=KUBECONFIG ...`` with a TokenRequest token of the
  least-privilege reader (deploy/member-cluster/rbac.yaml) for each cluster, as the real-Kubernetes
  tests run it; ``--no-mtls`` (istiod has no certificates to hand out without its CA and agent);
  the clients are bench.load's (bench.load.client_node).

Measured per server, as bench.load does: startup (spawn -> a probe proxy holds every service's
complete assignment: all 3 x E endpoints, or E plus the other clusters' gateways), cold start (N
clients connected at once -> every client holds an ACKed CDS, EDS for each EDS cluster, LDS and
RDS), convergence (one endpoint's address changed by a server-side apply of its EndpointSlice in
one API server, from the write's start -> the last client that sees that endpoint ACKed an EDS
response holding the new address; p50/p90/p99 over K changes, the API write and the debounce
included), the server's CPU seconds per phase (/proc of its process), the load tool's CPU and the
API servers' (etcd and kube-apiserver of the three clusters) per phase, peak RSS, responses and
MB, and what one proxy is sent (resources and bytes per type, from a SotW probe after the changes).

istiod's cache: right after it starts, before any push, it generates every connecting proxy's
configuration from scratch (Istiod.warm says why); ``--istiod-warm`` fills its cache first, as
pushes do in a running mesh.

Usage: python -m bench.istiod [--quick] [--clients N] [--services S] [--clusters C] [--endpoints E]
       [--changes K] [--mode sotw|delta] [--server both|istiod|isthmus] [--istiod-warm]
       [--dump DIR] [--keep-logs DIR] [--csv FILE]
Everything listens on 127.0.0.1; every process and the work directory go at the end, also on
Ctrl-C or failure (the children also have a parent-death signal).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import csv
import json
import os
import platform
import random
import resource
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import aiohttp
import grpc
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import text_format

from bench import discovery
from bench.adsclient import (
    CDS,
    EDS,
    LDS,
    RDS,
    SimEnvoy,
    Totals,
    cluster_info,
    listener_info,
    name_of,
    open_stream,
)
from bench.load import (
    ROOT,
    VENV_BIN,
    Change,
    Shape,
    Workload,
    client_node,
    gateway,
    member,
    pct,
    proc_rss,
    proc_usage,
    region,
    service_account,
    service_name,
    workload_arguments,
    zone,
)

sys.path.insert(0, str(ROOT / "tests"))  # the real-Kubernetes tier's harness: realkube, datapath
from realkube.binaries import versions
from realkube.cluster import LOOPBACK, Process, RealCluster, free_port
from realkube.fixtures import reader_kubeconfig, start_all
from realkube.rest import path_of

Obj = dict[str, Any]
ISTIO_NAMESPACE = "istio-system"
ISTIO_PROXY_VERSION = "1.31.0"  # the module's VERSION file says 1.31: the clients claim that proxy version
SCRIPT = ROOT / "hack" / "istiod.sh"
SHORT = {CDS: "CDS", EDS: "EDS", LDS: "LDS", RDS: "RDS"}

# istiod's environment: what it takes to serve upstream Envoys plain-text xDS on loopback (the
# README of bench/peers/istiod says why each is set). Debounce and push throttle stay as shipped.
ISTIOD_ENV = {
    "POD_NAMESPACE": ISTIO_NAMESPACE,
    "POD_NAME": "istiod-bench",
    "REVISION": "default",
    "ENABLE_CA_SERVER": "false",
    "INJECT_ENABLED": "false",
    "PILOT_ENABLE_METADATA_EXCHANGE": "false",
    "PILOT_ENABLE_ALPN_FILTER": "false",
    "PILOT_MAX_REQUESTS_PER_SECOND": "100000",
}
MESH_CONFIG = {"enableAutoMtls": False, "rootNamespace": ISTIO_NAMESPACE, "trustDomain": "cluster.local"}

# The load tool's gRPC channel options (bench.load.run's).
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


# ---- the istiod binary and CRDs -------------------------------------------------------------


def istiod_cache() -> Path:
    """Where hack/istiod.sh puts pilot-discovery and the CRD file (ISTIO_VERSION of hack/versions.env)."""
    base = Path(os.environ.get("ISTHMUS_CACHE") or Path.home() / ".cache" / "isthmus")
    return base / "istiod" / str(versions()["ISTIO_VERSION"])


def istiod_built() -> tuple[Path, Path] | None:
    """(pilot-discovery, crd-all.gen.yaml) if hack/istiod.sh has built them, else None (no build)."""
    cache = istiod_cache()
    binary, crds = cache / "bin" / "pilot-discovery", cache / "crd-all.gen.yaml"
    return (binary, crds) if os.access(binary, os.X_OK) and crds.is_file() else None


def istiod_build() -> tuple[Path, Path]:
    """hack/istiod.sh (nothing to do when built; ~4 min of both cores the first time)."""
    done = subprocess.run(["bash", str(SCRIPT)], check=True, stdout=subprocess.PIPE, text=True, timeout=3000)
    binary = Path(done.stdout.strip().splitlines()[-1])
    return binary, binary.parent.parent / "crd-all.gen.yaml"


# ---- the workload in the real API servers ---------------------------------------------------


def service(s: int) -> Obj:
    port = {"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"}
    meta = {"name": service_name(s), "namespace": discovery.namespace(s)}
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {"ports": [port]}}


def endpoint_slice(workload: Workload, c: int, s: int) -> Obj:
    """bench.discovery's slice of service s in cluster c (with the workload's moved addresses),
    without targetRef and nodeName: no Pods or Nodes exist here."""
    obj = discovery.endpoint_slice(workload.kube, c, s, moved=workload.moved.get((c, s)))
    for endpoint in obj["endpoints"]:
        endpoint.pop("targetRef", None)
        endpoint.pop("nodeName", None)
    return obj


def namespace_obj(name: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


class Api:
    """Writes to one real API server as its admin, over kept-alive connections (a change's write
    does not pay a TLS handshake)."""

    def __init__(self, cluster: RealCluster) -> None:
        self.cluster = cluster
        self._session: aiohttp.ClientSession | None = None
        self._ssl = ssl.create_default_context(cafile=str(cluster.pki.ca_cert))

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                base_url=self.cluster.url,
                headers={"Authorization": f"Bearer {self.cluster.admin_token}"},
                timeout=aiohttp.ClientTimeout(total=120),
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=32),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def apply(self, obj: Obj) -> None:
        """Server-side apply (create or replace the fields given), as kubectl apply --server-side."""
        meta = obj["metadata"]
        path = path_of(obj["kind"], meta.get("namespace"), meta["name"])
        headers = {"Content-Type": "application/apply-patch+yaml"}
        async with self.session.patch(
            f"{path}?fieldManager=isthmus-bench&force=true", data=json.dumps(obj), headers=headers
        ) as resp:
            if resp.status >= 300:
                raise RuntimeError(
                    f"{self.cluster.name}: apply {obj['kind']} {meta['name']}: {await resp.text()}"
                )
            await resp.read()

    async def get(self, path: str) -> Obj:
        async with self.session.get(path) as resp:
            if resp.status >= 300:
                raise RuntimeError(f"{self.cluster.name}: GET {path}: HTTP {resp.status}")
            result: Obj = await resp.json()
            return result


async def apply_many(api: Api, objs: list[Obj], parallel: int = 16) -> None:
    gate = asyncio.Semaphore(parallel)

    async def one(obj: Obj) -> None:
        async with gate:
            await api.apply(obj)

    await asyncio.gather(*(one(obj) for obj in objs))


async def seed(apis: list[Api], workload: Workload) -> None:
    """Every cluster's namespaces, Services and EndpointSlices (the clusters in parallel)."""
    shape = workload.shape

    async def cluster(c: int) -> None:
        names = [f"bench-{k}" for k in range(discovery.NAMESPACES)] + [ISTIO_NAMESPACE]
        await apply_many(apis[c], [namespace_obj(n) for n in names])
        objs = [service(s) for s in range(shape.services)]
        objs += [endpoint_slice(workload, c, s) for s in range(shape.services)]
        await apply_many(apis[c], objs)

    await asyncio.gather(*(cluster(c) for c in range(shape.clusters)))


async def install_istio(apis: list[Api], crd_file: Path, workdir: Path) -> None:
    """The Istio CRDs in every cluster (established), and in m0 (istiod's own cluster) a remote
    Secret for each other cluster: its kubeconfig under the key of its cluster id."""
    text = await asyncio.to_thread(crd_file.read_text)
    crds = [d for d in yaml.safe_load_all(text) if d and d.get("kind") == "CustomResourceDefinition"]

    async def established(api: Api, name: str) -> bool:
        obj = await api.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        conditions = (obj.get("status") or {}).get("conditions") or []
        return any(x.get("type") == "Established" and x.get("status") == "True" for x in conditions)

    for api in apis:
        await apply_many(api, crds, parallel=4)
    deadline = time.monotonic() + 60
    for api in apis:
        for crd in crds:
            while not await established(api, crd["metadata"]["name"]):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"CRD {crd['metadata']['name']} not established")
                await asyncio.sleep(0.2)
    for api in apis[1:]:
        cluster = api.cluster
        kubeconfig = cluster.kubeconfig(workdir / f"{cluster.name}-istiod.kubeconfig", cluster.admin_token)
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": f"istio-remote-secret-{cluster.name}",
                "namespace": ISTIO_NAMESPACE,
                "labels": {"istio/multiCluster": "true"},
                "annotations": {"networking.istio.io/cluster": cluster.name},
            },
            "type": "Opaque",
            "data": {cluster.name: base64.b64encode(kubeconfig.read_bytes()).decode()},
        }
        await apis[0].apply(secret)
    print(f"istio: {len(crds)} CRDs in each cluster, remote Secrets for {[a.cluster.name for a in apis[1:]]}")


# ---- the servers ----------------------------------------------------------------------------


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except (OSError, urllib.error.URLError):
        return False


class Server(Protocol):
    name: str
    xds_address: str
    proc: Process

    def start(self) -> None: ...
    def ready(self) -> bool: ...
    def node(self, shape: Shape, i: int) -> tuple[str, base_pb2.Node]: ...


class Istiod:
    """pilot-discovery with m0 as its own cluster (the others come from the remote Secrets)."""

    name = "istiod"

    def __init__(self, binary: Path, clusters: list[RealCluster], workdir: Path) -> None:
        self.workdir = workdir / "istiod"
        self.workdir.mkdir()
        home = clusters[0]
        kubeconfig = home.kubeconfig(self.workdir / "home.kubeconfig", home.admin_token)
        mesh = self.workdir / "mesh.yaml"
        mesh.write_text(yaml.safe_dump(MESH_CONFIG))
        networks = self.workdir / "meshNetworks.yaml"
        networks.write_text("networks: {}\n")
        self.xds_address = f"{LOOPBACK}:{free_port()}"
        self.http = f"{LOOPBACK}:{free_port()}"
        self.monitoring = f"{LOOPBACK}:{free_port()}"
        argv = [
            "env",
            *(f"{k}={v}" for k, v in ISTIOD_ENV.items()),
            f"CLUSTER_ID={home.name}",
            str(binary),
            "discovery",
            f"--kubeconfig={kubeconfig}",
            f"--clusterID={home.name}",
            f"--meshConfig={mesh}",
            f"--networksConfig={networks}",
            f"--grpcAddr={self.xds_address}",
            "--secureGRPCAddr=",
            "--httpsAddr=",
            f"--httpAddr={self.http}",
            f"--monitoringAddr={self.monitoring}",
            f"--ctrlz_address={LOOPBACK}",
            f"--ctrlz_port={free_port()}",
            "--domain=cluster.local",
        ]
        self.proc = Process("istiod", argv, self.workdir / "istiod.log")

    def start(self) -> None:
        self.proc.start()

    def ready(self) -> bool:
        return http_ok(f"http://{self.http}/ready")

    async def warm(self, shape: Shape) -> float:
        """Fill istiod's XDS cache as a running mesh has it filled (--istiod-warm). A proxy's first
        requests are generated with the time of the last push it got, none for a new connection,
        and istiod's cache keeps nothing generated without a time (pilot/pkg/xds/ads.go,
        pilot/pkg/model/typed_xds_cache.go): right after startup every connecting proxy is
        generated from scratch. Here one proxy per member cluster (clients 0 .. C-1) connects, a
        full push is asked for (GET /debug/adsz?push=true on istiod's HTTP port) and answered;
        what those pushes generated is cached for the clients of the same cluster and locality.
        Returns the seconds it took."""
        t0 = time.monotonic()
        hold = asyncio.Event()
        served = [asyncio.Event() for _ in range(shape.clusters)]
        snaps = [Snapshot() for _ in range(shape.clusters)]
        holders = [
            asyncio.create_task(
                probe(self.xds_address, self.node(shape, c)[1], 180.0, hold, served[c], snaps[c])
            )
            for c in range(shape.clusters)
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in served)), 120.0)
            before = [x.responses for x in snaps]
            url = f"http://{self.http}/debug/adsz?push=true"
            answer = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=30).read())
            print(f"istiod warm: {answer.decode().strip()}")
            deadline = time.monotonic() + 120.0
            # The push is there when each holder got CDS, EDS, LDS and RDS again; then quiet.
            while any(x.responses < b + 4 for x, b in zip(snaps, before, strict=True)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"istiod warm: the push did not reach {[x.responses for x in snaps]}")
                await asyncio.sleep(0.1)
            for e in served:
                e.clear()
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in served)), 120.0)
            hold.set()
            await asyncio.gather(*holders)
        finally:
            for task in holders:
                task.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
        return time.monotonic() - t0

    def node(self, shape: Shape, i: int) -> tuple[str, base_pb2.Node]:
        """Client i as istiod expects a sidecar: cluster i % C, service (i // C) % S (as bench.load),
        with an address of its own (one of its service's endpoints in its cluster)."""
        c, s = i % shape.clusters, (i // shape.clusters) % shape.services
        e = (i // (shape.clusters * shape.services)) % shape.endpoints
        ip = shape.mesh.address(c, s, e)
        ns, pod = discovery.namespace(s), f"{service_name(s)}-client-{i}"
        node = base_pb2.Node(
            id=f"sidecar~{ip}~{pod}.{ns}~{ns}.svc.cluster.local", cluster=f"{service_name(s)}.{ns}"
        )
        node.locality.region, node.locality.zone = region(c), zone(c)
        node.metadata.update(
            {
                "ISTIO_VERSION": ISTIO_PROXY_VERSION,
                "CLUSTER_ID": member(c),
                "NAMESPACE": ns,
                "NAME": pod,
                "INSTANCE_IPS": ip,
                "SERVICE_ACCOUNT": service_account(s),
                "LABELS": {"app": service_name(s)},
                "WORKLOAD_NAME": service_name(s),
                "INTERCEPTION_MODE": "REDIRECT",
            }
        )
        return member(c), node


class Isthmus:
    """``isthmus serve`` watching the member clusters with the least-privilege reader's tokens."""

    name = "isthmus"

    def __init__(self, kubeconfigs: dict[str, Path], workdir: Path) -> None:
        self.xds_address = f"{LOOPBACK}:{free_port()}"
        self.admin_address = f"{LOOPBACK}:{free_port()}"
        argv = [str(VENV_BIN / "isthmus"), "--log-level", "warning", "serve"]
        for c, (name, path) in enumerate(kubeconfigs.items()):
            argv += ["--cluster", f"{name}={path}", "--cluster-gateway", f"{name}={gateway(c)}"]
        argv += ["--xds-address", self.xds_address, "--admin-address", self.admin_address]
        argv += ["--no-mtls", "--insecure-unauthenticated-xds"]
        self.proc = Process("isthmus", argv, workdir / "isthmus.log")

    def start(self) -> None:
        self.proc.start()

    def ready(self) -> bool:
        return http_ok(f"http://{self.admin_address}/readyz")

    def node(self, shape: Shape, i: int) -> tuple[str, base_pb2.Node]:
        return client_node(shape, i)


def pid_of(proc: Process) -> int:
    assert proc.popen is not None
    return int(proc.popen.pid)  # setpriv and env exec the program: the same pid


def cpu_of(pids: list[int]) -> float:
    return sum(proc_usage(pid)[0] for pid in pids)


def machine_cpu() -> tuple[float, float]:
    """(busy, steal): CPU seconds the whole machine has been busy (all cores, irq and softirq
    included, as the kernel also charges those to the running process) and those the hypervisor
    took (steal), from /proc/stat: how much of a phase went to processes outside the benchmark."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


# ---- one proxy's configuration (a SotW probe) -----------------------------------------------


@dataclass
class Snapshot:
    """What one proxy was sent: per type, resource name -> serialized resource; response bytes."""

    resources: dict[str, dict[str, bytes]] = field(default_factory=dict)
    response_bytes: dict[str, int] = field(default_factory=dict)
    responses: int = 0

    def assignments(self) -> dict[str, tuple[str, ...]]:
        """EDS name -> the endpoint addresses it holds."""
        out = {}
        for name, value in self.resources.get(EDS, {}).items():
            cla = endpoint_pb2.ClusterLoadAssignment.FromString(value)
            lbs = [lb for loc in cla.endpoints for lb in loc.lb_endpoints]
            out[name] = tuple(sorted({lb.endpoint.address.socket_address.address for lb in lbs}))
        return out


async def probe(
    address: str,
    node: base_pb2.Node,
    limit: float = 30.0,
    hold: asyncio.Event | None = None,
    served: asyncio.Event | None = None,
    snap: Snapshot | None = None,
) -> Snapshot:
    """One SotW ADS stream as Envoy opens it (CDS, LDS, then EDS and RDS for what they name), every
    response ACKed; returns once every requested type has been answered and nothing came for 0.5 s
    (``served`` is set then) or, with ``hold``, once that is set (pushes are ACKed meanwhile).
    ``snap``: the Snapshot to fill (the caller may watch it grow)."""
    snap = Snapshot() if snap is None else snap
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    responses: asyncio.Queue[bytes] = asyncio.Queue()
    reader: asyncio.Task[None] | None = None
    try:
        call = open_stream(channel, "sotw")(wait_for_ready=True)
        first = True
        wanted: dict[str, list[str]] = {}

        async def send(type_url: str, names: list[str], version: str = "", nonce: str = "") -> None:
            nonlocal first
            request = discovery_pb2.DiscoveryRequest(
                type_url=type_url, resource_names=names, version_info=version, response_nonce=nonce
            )
            if first:
                request.node.CopyFrom(node)
                first = False
            await call.write(request)

        async def read() -> None:
            while (raw := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                responses.put_nowait(raw)
            raise RuntimeError("the server ended the probe's stream")

        await send(CDS, [])
        await send(LDS, [])
        reader = asyncio.create_task(read())
        answered: set[str] = set()
        async with asyncio.timeout(limit):
            while True:
                get = asyncio.ensure_future(responses.get())
                done, _ = await asyncio.wait({get, reader}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    get.cancel()
                    reader.result()  # raises what ended it
                if get not in done:
                    get.cancel()
                    if {CDS, LDS} | {t for t, names in wanted.items() if names} <= answered:
                        if served is not None:
                            served.set()
                        if hold is None or hold.is_set():
                            break
                    continue
                raw = get.result()
                r = discovery_pb2.DiscoveryResponse.FromString(raw)
                values = {name_of(a.value): a.value for a in r.resources}
                t = r.type_url
                snap.response_bytes[t] = snap.response_bytes.get(t, 0) + len(raw)
                snap.responses += 1
                if t in (CDS, LDS):
                    snap.resources[t] = values
                else:
                    snap.resources.setdefault(t, {}).update(values)
                answered.add(t)
                names: list[str] = []
                if t == CDS:
                    names = sorted({e for e in (cluster_info(v)[1] for v in values.values()) if e})
                    wanted[EDS] = names
                    await send(EDS, names)
                elif t == LDS:
                    names = sorted({n for v in values.values() for n in listener_info(v)[1]})
                    wanted[RDS] = names
                    await send(RDS, names)
                await send(t, wanted.get(t, []), r.version_info, r.nonce)
        call.cancel()
    finally:
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        await channel.close(None)
    return snap


def synced(snap: Snapshot, shape: Shape) -> bool | None:
    """None until the probe holds every service's assignment complete; then whether the network is
    flat (every cluster's endpoints directly: C x E addresses) or not (E plus C-1 gateways)."""
    held = {n: a for n, a in snap.assignments().items() if "||svc-" in n}
    if len(held) < shape.services:
        return None
    sizes = {len(a) for a in held.values()}
    flat, gated = shape.clusters * shape.endpoints, shape.endpoints + shape.clusters - 1
    if sizes == {flat}:
        return True
    if sizes == {gated}:
        return False
    return None


def describe(snap: Snapshot) -> dict[str, Any]:
    """Per type: resources and bytes (serialized resources; the responses' total in brackets)."""
    out: dict[str, Any] = {}
    for t in (CDS, EDS, LDS, RDS):
        res = snap.resources.get(t, {})
        out[f"proxy_{SHORT[t].lower()}_n"] = len(res)
        out[f"proxy_{SHORT[t].lower()}_kb"] = sum(len(v) for v in res.values()) / 1e3
    out["proxy_total_kb"] = sum(snap.response_bytes.values()) / 1e3
    return out


def dump(snap: Snapshot, directory: Path, name: str) -> None:
    """The probe's resources as text protos, one file per type (a few of the many alike)."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2

    kinds: dict[str, Any] = {
        CDS: cluster_pb2.Cluster,
        EDS: endpoint_pb2.ClusterLoadAssignment,
        LDS: listener_pb2.Listener,
        RDS: route_pb2.RouteConfiguration,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for t, cls in kinds.items():
        res = snap.resources.get(t, {})
        keep = [n for n in sorted(res) if "||svc-" not in n] + [n for n in sorted(res) if "||svc-" in n][:2]
        lines = [f"# {len(res)} {SHORT[t]} resources, {sum(map(len, res.values()))} bytes; names:"]
        lines += [f"#   {n} ({len(res[n])} bytes)" for n in keep]
        for n in keep:
            lines += [f"--- {n}", text_format.MessageToString(cls.FromString(res[n]))]
        (directory / f"{name}-{SHORT[t]}.txt").write_text("\n".join(lines))


# ---- one server's run -----------------------------------------------------------------------


@dataclass
class Pending:
    change: Change
    remaining: set[int]
    acks: dict[int, float] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)


async def until_quiet(totals: Totals, quiet: float = 1.0, limit: float = 20.0) -> float:
    """Wait until no response came for ``quiet`` seconds (at most ``limit``); returns the wait."""
    t0 = time.monotonic()
    last, since = totals.responses, t0
    while time.monotonic() - t0 < limit:
        await asyncio.sleep(0.1)
        if totals.responses != last:
            last, since = totals.responses, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return time.monotonic() - t0


async def run_server(
    server: Server,
    args: argparse.Namespace,
    shape: Shape,
    workload: Workload,
    apis: list[Api],
    first_change: int,
) -> dict[str, Any]:
    row: dict[str, Any] = {"server": server.name}
    kube_pids = [pid_of(p) for a in apis for p in (a.cluster.etcd, a.cluster.apiserver)]

    def usage() -> tuple[float, float, float]:
        """(server CPU, API servers' CPU, the tool's CPU) so far."""
        return proc_usage(pid_of(server.proc))[0], cpu_of(kube_pids), time.process_time()

    def others(machine0: tuple[float, float], used: float) -> tuple[float, float]:
        """CPU seconds of everything else on the machine since ``machine0`` (``used``: ours), and
        the seconds stolen by the hypervisor."""
        busy, steal = machine_cpu()
        return busy - machine0[0] - used, steal - machine0[1]

    # ---- startup: spawn -> a probe proxy holds the whole mesh ----
    kube0 = cpu_of(kube_pids)
    t0 = time.monotonic()
    server.start()
    probe_node = server.node(shape, 0)[1]
    flat: bool | None = None
    deadline = t0 + args.timeout
    while flat is None:
        if not server.proc.running:
            raise RuntimeError(f"{server.name} exited:\n{server.proc.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server.name} did not serve the whole mesh in {args.timeout:g} s")
        if await asyncio.to_thread(server.ready):
            with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
                flat = synced(await probe(server.xds_address, probe_node), shape)
        if flat is None:
            await asyncio.sleep(0.5)
    row["startup_s"] = time.monotonic() - t0
    cpu1, kube1, tool1 = usage()
    row["startup_server_cpu_s"] = cpu1
    row["startup_kube_cpu_s"] = kube1 - kube0
    row["startup_rss_mib"] = proc_rss(pid_of(server.proc)) / 2**20
    row["flat"] = flat
    row["warm_s"] = row["warm_server_cpu_s"] = float("nan")
    if args.istiod_warm and isinstance(server, Istiod):
        row["warm_s"] = await server.warm(shape)
        row["warm_server_cpu_s"] = proc_usage(pid_of(server.proc))[0] - cpu1
    await asyncio.sleep(1.0)  # the probes' streams are gone before the clients come

    # ---- cold start ----
    totals = Totals()
    pending: list[Pending] = []
    all_complete = asyncio.Event()
    completed = 0

    def on_complete(_: SimEnvoy) -> None:
        nonlocal completed
        completed += 1
        if completed == shape.clients:
            all_complete.set()

    def on_eds(client: SimEnvoy, raw: bytes, *rest: Any) -> None:
        now = rest[-1]  # (names, ack time) or (ack time): bench.adsclient's hook, either version
        for p in pending:
            if client.index in p.remaining and p.change.marker in raw:
                p.remaining.discard(client.index)
                p.acks[client.index] = now
                if not p.remaining:
                    p.done.set()

    channels = [
        grpc.aio.insecure_channel(server.xds_address, options=[*CHANNEL_OPTIONS, ("bench.channel", k)])
        for k in range(args.channels)
    ]
    streams = [open_stream(ch, args.mode) for ch in channels]
    clients = []
    for i in range(shape.clients):
        cluster, node = server.node(shape, i)
        clients.append(
            SimEnvoy(
                i,
                node,
                cluster,
                args.mode,
                streams[i % len(streams)],
                totals,
                mtls=False,
                on_eds=on_eds,
                on_complete=on_complete,
            )
        )
    cpu1, kube1, tool1 = usage()
    machine1 = machine_cpu()
    t1 = time.monotonic()
    tasks = [asyncio.create_task(cl.run()) for cl in clients]
    try:
        try:
            await asyncio.wait_for(all_complete.wait(), args.timeout)
        except TimeoutError:
            totals.errors.append(
                f"cold start: only {completed}/{shape.clients} complete after {args.timeout:g} s"
            )
            for cl in [cl for cl in clients if cl.complete_at is None][:3]:
                held = {SHORT.get(t, t): len(n) for t, n in cl.held.items()}
                subscribed = {SHORT.get(t, t): len(n) for t, n in cl.subscribed.items()}
                totals.errors.append(f"incomplete: {cl.node.id} held {held} subscribed {subscribed}")
        cold = [cl.complete_at - t1 for cl in clients if cl.complete_at is not None]
        cpu2, kube2, tool2 = usage()
        row["cold_start_s"] = max(cold) if len(cold) == shape.clients else float("nan")
        row["cold_p50_s"] = pct(cold, 50)
        row["cold_server_cpu_s"] = cpu2 - cpu1
        row["cold_tool_cpu_s"] = tool2 - tool1
        row["cold_kube_cpu_s"] = kube2 - kube1
        row["cold_other_cpu_s"], row["cold_steal_s"] = others(
            machine1, cpu2 - cpu1 + tool2 - tool1 + kube2 - kube1
        )
        row["cold_server_peak_rss_mib"] = proc_usage(pid_of(server.proc))[1] / 2**20
        row["cold_responses"] = totals.responses
        row["cold_by_type"] = ", ".join(f"{SHORT.get(t, t)} {n}" for t, n in sorted(totals.by_type.items()))
        row["cold_mb"] = totals.bytes / 1e6
        row["cold_mb_per_client"] = totals.bytes / 1e6 / shape.clients
        row["settle_s"] = await until_quiet(totals)
        row["settle_responses"] = totals.responses - row["cold_responses"]

        # ---- convergence: one endpoint's address, applied through its API server ----
        conv: list[float] = []
        first: list[float] = []
        writes: list[float] = []
        resp0, bytes0, eds0 = totals.responses, totals.bytes, totals.by_type.get(EDS, 0)
        cpu3, kube3, tool3 = usage()
        machine3 = machine_cpu()
        for k in range(args.changes):
            i = first_change + k
            change, c, s = workload.change(i)
            who = {cl.index for cl in clients if flat or cl.member == change.cluster}
            p = Pending(change, set(who))
            pending.append(p)
            started = time.monotonic()
            await apis[c].apply(endpoint_slice(workload, c, s))
            writes.append(time.monotonic() - started)
            try:
                await asyncio.wait_for(p.done.wait(), args.change_timeout)
                conv.append(max(p.acks.values()) - started)
                first.append(min(p.acks.values()) - started)
            except TimeoutError:
                totals.errors.append(
                    f"change {i}: {len(p.remaining)} of {len(who)} clients never ACKed {change.address}"
                )
            pending.remove(p)
            await asyncio.sleep(args.gap + random.uniform(0, 0.1))
        cpu4, kube4, tool4 = usage()
        n = max(1, args.changes)
        row["conv_n"] = len(conv)
        row["conv_recipients"] = shape.clients if flat else shape.clients // shape.clusters
        row["conv_p50_ms"] = pct(conv, 50) * 1e3
        row["conv_p90_ms"] = pct(conv, 90) * 1e3
        row["conv_p99_ms"] = pct(conv, 99) * 1e3
        row["conv_max_ms"] = max(conv) * 1e3 if conv else float("nan")
        row["conv_first_p50_ms"] = pct(first, 50) * 1e3
        row["api_write_p50_ms"] = pct(writes, 50) * 1e3
        row["conv_server_cpu_per_change_ms"] = (cpu4 - cpu3) / n * 1e3
        row["conv_tool_cpu_per_change_ms"] = (tool4 - tool3) / n * 1e3
        row["conv_kube_cpu_per_change_ms"] = (kube4 - kube3) / n * 1e3
        used = cpu4 - cpu3 + tool4 - tool3 + kube4 - kube3
        other, steal = others(machine3, used)
        row["conv_other_cpu_per_change_ms"] = other / n * 1e3
        row["conv_steal_per_change_ms"] = steal / n * 1e3
        row["conv_responses_per_change"] = (totals.responses - resp0) / n
        row["conv_eds_per_change"] = (totals.by_type.get(EDS, 0) - eds0) / n
        row["conv_mb_per_change"] = (totals.bytes - bytes0) / 1e6 / n
        row["server_cpu_total_s"] = cpu4
        row["server_peak_rss_mib"] = proc_usage(pid_of(server.proc))[1] / 2**20
        row["server_rss_end_mib"] = proc_rss(pid_of(server.proc)) / 2**20
        row["responses"] = totals.responses
        row["mb_received"] = totals.bytes / 1e6
        row["nacks"] = totals.nacks
    finally:
        for cl in clients:
            cl.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close(None)

    # ---- what one proxy is sent (client 0's node, the state after the changes) ----
    snap = await probe(server.xds_address, probe_node)
    row.update(describe(snap))
    if args.dump is not None:
        dump(snap, args.dump, server.name)
    row["errors"] = len(totals.errors)
    for e in totals.errors[:10]:
        print(f"error ({server.name}): {e}", file=sys.stderr)
    if args.keep_logs is not None:
        keep_logs(server, args)
    server.proc.stop(grace=15, sig=signal.SIGINT if server.name == "isthmus" else signal.SIGTERM)
    return row


def keep_logs(server: Server, args: argparse.Namespace) -> None:
    """--keep-logs DIR: the server's log and (istiod) its Prometheus metrics, named by mode and server."""
    args.keep_logs.mkdir(parents=True, exist_ok=True)
    stem = args.keep_logs / f"{args.mode}-{server.name}"
    stem.with_suffix(".log").write_bytes(server.proc.log_path.read_bytes())
    if isinstance(server, Istiod):
        url = f"http://{server.monitoring}/metrics"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=10) as r:
            stem.with_suffix(".metrics").write_bytes(r.read())


# ---- the whole run --------------------------------------------------------------------------


def report(args: argparse.Namespace, shape: Shape, rows: list[dict[str, Any]]) -> None:
    def f(row: dict[str, Any], key: str, digits: int = 2) -> str:
        v = row.get(key, "")
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("startup: spawn -> whole mesh served (s)", lambda r: f(r, "startup_s")),
        (
            "startup: server CPU / API servers' CPU (s)",
            lambda r: f"{f(r, 'startup_server_cpu_s')} / {f(r, 'startup_kube_cpu_s')}",
        ),
        (
            "istiod: cache warmed by a push first (s, server CPU s)",
            lambda r: (
                f"{f(r, 'warm_s')} ({f(r, 'warm_server_cpu_s')})" if r["warm_s"] == r["warm_s"] else "no"
            ),
        ),
        (
            "network as served",
            lambda r: "flat (every endpoint directly)" if r["flat"] else "through gateways",
        ),
        (
            "cold start: all clients complete (p50) (s)",
            lambda r: f"{f(r, 'cold_start_s')} ({f(r, 'cold_p50_s')})",
        ),
        (
            "cold start: CPU server / tool / API servers / others (steal) (s)",
            lambda r: (
                f"{f(r, 'cold_server_cpu_s')} / {f(r, 'cold_tool_cpu_s')} / {f(r, 'cold_kube_cpu_s')}"
                f" / {f(r, 'cold_other_cpu_s')}"
            ),
        ),
        ("cold start: responses (by type)", lambda r: f"{r['cold_responses']} ({r['cold_by_type']})"),
        (
            "cold start: MB / MB per client",
            lambda r: f"{f(r, 'cold_mb', 1)} / {f(r, 'cold_mb_per_client', 2)}",
        ),
        (
            "after cold start: quiet after (s) / responses",
            lambda r: f"{f(r, 'settle_s', 1)} / {r['settle_responses']}",
        ),
        (
            f"convergence, n={args.changes}: p50 / p90 / p99 / max (ms)",
            lambda r: (
                f"{f(r, 'conv_p50_ms', 0)} / {f(r, 'conv_p90_ms', 0)} / {f(r, 'conv_p99_ms', 0)} / "
                f"{f(r, 'conv_max_ms', 0)} (n={r['conv_n']}, {r['conv_recipients']} clients each)"
            ),
        ),
        (
            "convergence: first client p50 / API write p50 (ms)",
            lambda r: f"{f(r, 'conv_first_p50_ms', 0)} / {f(r, 'api_write_p50_ms', 0)}",
        ),
        (
            "per change: CPU server / tool / API servers / others (steal) (ms)",
            lambda r: (
                f"{f(r, 'conv_server_cpu_per_change_ms', 0)} / {f(r, 'conv_tool_cpu_per_change_ms', 0)} / "
                f"{f(r, 'conv_kube_cpu_per_change_ms', 0)} / {f(r, 'conv_other_cpu_per_change_ms', 0)} "
                f"({f(r, 'conv_steal_per_change_ms', 0)})"
            ),
        ),
        (
            "per change: responses (EDS) / MB",
            lambda r: (
                f"{f(r, 'conv_responses_per_change', 1)} ({f(r, 'conv_eds_per_change', 1)}) / "
                f"{f(r, 'conv_mb_per_change', 2)}"
            ),
        ),
        (
            "server: CPU total (s) / peak RSS (MiB) (after cold start, at the end)",
            lambda r: (
                f"{f(r, 'server_cpu_total_s')} / {f(r, 'server_peak_rss_mib', 0)} "
                f"({f(r, 'cold_server_peak_rss_mib', 0)}, {f(r, 'server_rss_end_mib', 0)})"
            ),
        ),
        *[
            (
                f"one proxy: {k} resources / kB",
                (lambda r, k=k: f"{r[f'proxy_{k.lower()}_n']} / {f(r, f'proxy_{k.lower()}_kb', 1)}"),
            )
            for k in ("CDS", "EDS", "LDS", "RDS")
        ],
        ("one proxy: kB of responses in all", lambda r: f(r, "proxy_total_kb", 1)),
        ("errors / NACKs", lambda r: f"{r['errors']} / {r['nacks']}"),
    ]
    print(
        f"\n{args.mode}, {shape.clients} clients, {shape.clusters} x {shape.services} x {shape.endpoints} "
        f"({shape.mesh.total} endpoints) in real API servers, {args.channels} channel(s), "
        f"{args.changes} changes"
    )
    width = max(len(k) for k, _ in lines)
    header = "".join(f"  {r['server']:<36}" for r in rows)
    print(f"{'':<{width}}{header}")
    for k, fn in lines:
        print(f"{k:<{width}}" + "".join(f"  {fn(r):<36}" for r in rows))


async def bench(
    args: argparse.Namespace,
    shape: Shape,
    clusters: list[RealCluster],
    crds: Path | None,
    binary: Path | None,
    work: Path,
) -> list[dict[str, Any]]:
    workload = Workload(shape)
    apis = [Api(c) for c in clusters]
    rows = []
    try:
        t0 = time.monotonic()
        await seed(apis, workload)
        took = time.monotonic() - t0
        print(f"seeded {shape.clusters} x ({shape.services} Services + EndpointSlices) in {took:.1f} s")
        order = ["istiod", "isthmus"] if args.server == "both" else [args.server]
        for k, name in enumerate(order):
            server: Server
            if name == "istiod":
                assert binary is not None
                assert crds is not None
                await install_istio(apis, crds, work)
                server = Istiod(binary, clusters, work)
            else:
                kubeconfigs = {
                    c.name: await reader_kubeconfig(c, work / f"{c.name}-reader.kubeconfig") for c in clusters
                }
                server = Isthmus(kubeconfigs, work)
            try:
                rows.append(await run_server(server, args, shape, workload, apis, k * args.changes))
            except BaseException:
                print(
                    f"--- {server.name} log ({server.proc.log_path})\n{server.proc.tail(60)}", file=sys.stderr
                )
                raise
            finally:
                server.proc.stop(grace=10)
            await asyncio.sleep(2)
    finally:
        for api in apis:
            await api.close()
    return rows


@contextlib.contextmanager
def interrupted_on_term() -> Iterator[None]:
    """SIGTERM ends the run as Ctrl-C does (everything is cleaned up on the way out)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.istiod", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="20 clients, 3 x 20 x 3, 3 changes")
    workload_arguments(p)
    p.add_argument("--server", choices=("both", "istiod", "isthmus"), default="both")
    p.add_argument("--channels", type=int, default=0, help="gRPC channels (default: one per 1,000 clients)")
    p.add_argument("--gap", type=float, default=0.3, help="pause between changes (s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900.0, help="startup and cold start limit (s)")
    p.add_argument("--change-timeout", type=float, default=30.0)
    p.add_argument(
        "--istiod-warm",
        action="store_true",
        help="fill istiod's XDS cache before the clients connect: one proxy per cluster connected "
        "through a full push (as in a mesh where pushes happen); without it istiod generates every "
        "connecting proxy's configuration from scratch",
    )
    p.add_argument("--dump", type=Path, help="write one proxy's resources as text protos into this directory")
    p.add_argument("--keep-logs", type=Path, help="copy each server's log (istiod: and metrics) here")
    p.add_argument("--csv", type=Path, help="append one row per server to this CSV file")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.clusters, args.services, args.endpoints, args.changes = 20, 3, 20, 3, 3
    if args.clusters < 2:
        p.error("--clusters must be at least 2 (istiod's own and a remote one)")
    if args.clients < args.clusters:
        p.error("--clients must be at least --clusters")
    if args.channels <= 0:
        args.channels = -(-args.clients // 1000)
    random.seed(args.seed)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    shape = Shape(args.clients, args.clusters, args.services, args.endpoints)
    binary = crds = None
    if args.server != "isthmus":
        binary, crds = istiod_built() or istiod_build()
    from realkube.binaries import kube_bin

    kube = kube_bin("control")
    with interrupted_on_term(), tempfile.TemporaryDirectory(prefix="isthmus-istiod-") as tmp:
        work = Path(tmp)
        clusters = [RealCluster(member(c), work / member(c), kube) for c in range(shape.clusters)]
        start_all(clusters)  # from this (the main) thread: the children's parent-death signal
        try:
            rows = asyncio.run(bench(args, shape, clusters, crds, binary, work))
        finally:
            for cluster in clusters:
                cluster.stop()
    stamp = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "mode": args.mode,
        "clients": shape.clients,
        "clusters": shape.clusters,
        "services": shape.services,
        "endpoints": shape.endpoints,
        "changes": args.changes,
        "channels": args.channels,
        "tool_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    rows = [stamp | row for row in rows]
    report(args, shape, rows)
    print(f"load tool: peak RSS {stamp['tool_peak_rss_mib']:.0f} MiB")
    if args.csv is not None:
        new = not args.csv.exists() or args.csv.stat().st_size == 0
        if not new:
            with args.csv.open(newline="") as fh:
                header = next(csv.reader(fh), [])
            if header != list(rows[0]):
                print(f"error: {args.csv} has other columns than this run; use another file", file=sys.stderr)
                return 2
        with args.csv.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()})
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
