"""Issue 14's whole flow, as an operator does it, against two real API servers: ``home`` (the control
plane's own cluster, also the member cluster east) and ``west``.

1. The chart, rendered with ``helm template`` (mode home, namespace isthmus-system, its defaults):
   its CRDs, ServiceAccount, RBAC and generated development root applied to home (not the
   Deployment, the Service or the PodDisruptionBudget: no image runs here); mode member's RBAC
   applied to both clusters.
2. ``isthmus cluster add east`` and ``isthmus cluster add west`` (the CLI, with the operator's admin
   kubeconfigs) write the member Secrets into home's isthmus-system.
3. A Service and its EndpointSlice in each member cluster (shop/web), the MCS ServiceImport CRD in
   both; the MeshConfig ``default`` (one setting).
4. ``isthmus serve`` as a process, with the Deployment's own arguments (addresses moved to loopback,
   the root read from the chart's Secret as the volume would mount it) and a kubeconfig holding a
   TokenRequest token of the chart's ServiceAccount instead of the in-cluster one.
5. /readyz: both member clusters synced, the MeshConfig applied; the ServiceImport isthmus writes in
   each cluster names both; a sidecar of west (an ADS client over TLS with a TokenRequest token of
   west, verified by a TokenReview with the reader account ``cluster add`` made) gets web's endpoints
   of both clusters, its own first; ``isthmus cluster list`` shows both synced.
6. West is drained by patching its MemberCluster object with the operator's credentials (as
   ``kubectl patch`` does): the steps, each ACKed by the sidecar, then status.drain done at 0; the
   sidecar's west endpoints go last.
7. isthmus is stopped and started again: west is drained from the first answer (steps [0]) and the
   first push, at the mesh version of before the restart.
8. The undrain is patched; isthmus is stopped in the middle of it and started again: it resumes
   from the weight the status recorded, never lower, and west comes back. The objects' conditions
   and the MeshConfig's settings in force are written.
9. The audit logs: no request of isthmus's accounts (the chart's in home, the readers in both) was
   refused over the whole run; the readers wrote only what they need.

Bugs this test found, fixed since and checked here: the chart's generated development root did not
sign verifiable certificates (the flow's TLS uses it, and the test at the end); a restarted isthmus
deleted the mesh's ServiceImports (a view of the clusters synced so far) and said ready before it
served the whole mesh.

Everything (the isthmus processes, the sidecar's channel, both clusters) is stopped at the end, also
when the test fails; the isthmus logs are printed then.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from isthmus.xds import types
from isthmus.xds.ca import MeshCA
from protocol.client import SotwClient, make_node
from realkube.cluster import LOOPBACK, Process, RealCluster, free_port
from realkube.crds import SERVICE_IMPORT
from realkube.objects import endpoint_slice, service_without_selector
from realkube.rest import ApiError, Rest
from realkube.test_real_chart import CHART, SYSTEM, helm
from realkube.test_real_chart import apply as apply_rendered
from realkube.wait import until

pytestmark = [pytest.mark.realkube, pytest.mark.timeout(900)]  # a cold helm build takes ~3 min

__all__ = ["helm"]  # the fixture, imported

Obj = dict[str, Any]
GROUP_VERSION = "isthmus.io/v1alpha1"
MEMBER_CLUSTERS = f"/apis/{GROUP_VERSION}/namespaces/{SYSTEM}/memberclusters"
MESH_CONFIGS = f"/apis/{GROUP_VERSION}/namespaces/{SYSTEM}/meshconfigs"
WEB = "outbound|80||web.shop.svc.cluster.local"
ADDRESSES = {"east": "10.1.0.1", "west": "10.2.0.1"}
DRAIN_STEP = 2  # seconds between steps (home.drain.step): long enough to stop isthmus mid-way
XDS_SERVER_NAME = "isthmus.isthmus-system.svc"  # an --xds-san the chart gives
# What the chart's home mode renders and this test does not apply: they need an image to run.
NOT_APPLIED = {"Deployment", "Service", "PodDisruptionBudget"}
RBAC_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
ROOT_SECRET = "isthmus-dev-ca"  # the development root the chart generates


# ---- the chart ---------------------------------------------------------------------------------------


def template(helm: Callable[..., str], release: str, *sets: str) -> list[Obj]:
    """``helm template RELEASE CHART -n isthmus-system --include-crds --set ...``."""
    args = ["template", release, str(CHART), "--namespace", SYSTEM, "--include-crds"]
    for s in sets:
        args += ["--set", s]
    return [doc for doc in yaml.safe_load_all(helm(*args)) if doc]


async def apply(rest: Rest, obj: Obj) -> None:
    """Server-side apply of what the chart renders (kubectl apply --server-side)."""
    if obj["kind"] == "CustomResourceDefinition":
        await rest.apply(obj)
    elif obj["apiVersion"] == GROUP_VERSION:  # the chart's own kinds (isthmus.io), if it renders some
        path = f"/apis/{GROUP_VERSION}/namespaces/{SYSTEM}/{obj['kind'].lower()}s/{obj['metadata']['name']}"
        headers = {"Content-Type": "application/apply-patch+yaml"}
        await rest.request("PATCH", f"{path}?fieldManager=helm-chart-test&force=true", obj, headers)
    else:
        await apply_rendered(rest, obj)


def polled(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``check`` as ``until`` polls it."""

    async def poll() -> bool:
        return check()

    return poll


async def served(rest: Rest, path: str) -> bool:
    """A new CRD's kind is listed (404 and 429 "storage is initializing" mean not yet)."""
    try:
        await rest.request("GET", path)
    except ApiError as exc:
        if exc.status in (404, 429, 503):
            return False
        raise
    return True


def verifies(root: Path, leaf_pem: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """``openssl verify`` of a certificate against the root (OpenSSL, as BoringSSL in gRPC and Envoy,
    finds the issuer by the certificate's authority key identifier)."""
    leaf = directory / "leaf.pem"
    leaf.write_text(leaf_pem)
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(root), str(leaf)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


# ---- isthmus serve, as a process ------------------------------------------------------------------


class Serve:
    """``isthmus serve`` with the chart Deployment's arguments, moved to this machine."""

    def __init__(self, args: list[str], directory: Path) -> None:
        self.xds, self.admin = free_port(), free_port()
        self.argv = [sys.executable, "-m", "isthmus.cli", "--log-level", "info"]
        for arg in args:
            if arg.startswith("--xds-address="):
                arg = f"--xds-address={LOOPBACK}:{self.xds}"
            elif arg.startswith("--admin-address="):
                arg = f"--admin-address={LOOPBACK}:{self.admin}"
            self.argv.append(arg)
        self.log = directory / "isthmus.log"
        self.runs: list[Process] = []

    @property
    def proc(self) -> Process:
        return self.runs[-1]

    def start(self) -> None:
        self.runs.append(Process("isthmus", self.argv, self.log))
        self.proc.start()

    def stop(self) -> None:
        for run in self.runs:
            run.stop(grace=20)

    @property
    def pid(self) -> int:
        assert self.proc.popen is not None
        return self.proc.popen.pid

    def get(self, path: str, token: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(f"http://{LOOPBACK}:{self.admin}{path}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 503 and path == "/readyz":
                return json.loads(exc.read())
            raise

    async def readyz(self) -> Obj | None:
        """/readyz's answer, None while nothing listens; the process must be running."""
        assert self.proc.running, self.proc.tail(60)
        try:
            answer: Obj = await asyncio.to_thread(self.get, "/readyz")
        except OSError:
            return None
        return answer


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[list[Serve]]:
    made: list[Serve] = []
    yield made
    for serve in made:
        serve.stop()
        print(f"--- isthmus ({serve.log})\n{serve.log.read_text(errors='replace')[-12000:]}")


# ---- a sidecar of west: an ADS client ---------------------------------------------------------------


class _AuthenticatedSotw(SotwClient):
    def __init__(self, channel: grpc.aio.Channel, node: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata
        super().__init__(channel, node)

    def _open(self, stub: Any) -> Any:
        return stub.StreamAggregatedResources(metadata=self._metadata)


class Sidecar:
    """A sidecar of shop/web in ``cluster`` (SotW; CDS and web's EDS): ACKs everything, as Envoy
    does, and keeps web's latest endpoints by locality."""

    def __init__(self, xds_port: int, root_pem: bytes, token: str, cluster: str) -> None:
        credentials = grpc.ssl_channel_credentials(root_certificates=root_pem)
        self.channel = grpc.aio.secure_channel(
            f"{LOOPBACK}:{xds_port}",
            credentials,
            options=[("grpc.ssl_target_name_override", XDS_SERVER_NAME)],
        )
        node = make_node(f"sidecar~{ADDRESSES[cluster]}.shop~{cluster}", cluster=cluster, namespace="shop")
        metadata = (("authorization", f"Bearer {token}"), ("isthmus-cluster", cluster))
        self.client = _AuthenticatedSotw(self.channel, node, metadata)
        self.seen: list[dict[str, tuple[int, list[str]]]] = []  # cluster -> priority, addresses
        self.weights: list[dict[str, int]] = []  # cluster -> locality weight, of the same pushes
        self.error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.client.subscribe(types.CLUSTER, [])
        await self.client.subscribe(types.ENDPOINT, [WEB])
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                reply = await self.client.recv(within=3600)
                await self.client.ack(reply)
                if reply.type_url == types.ENDPOINT and WEB in reply.resources:
                    self.seen.append(
                        {
                            group.locality.sub_zone: (
                                group.priority,
                                [e.endpoint.address.socket_address.address for e in group.lb_endpoints],
                            )
                            for group in reply.resources[WEB].endpoints
                        }
                    )
                    self.weights.append(
                        {
                            group.locality.sub_zone: group.load_balancing_weight.value
                            for group in reply.resources[WEB].endpoints
                        }
                    )
        except Exception as exc:  # the stream ended (isthmus stopped): kept for the report
            self.error = exc

    def priorities(self) -> dict[str, int]:
        """web's localities (member clusters) and their priorities, as last received."""
        return {cluster: priority for cluster, (priority, _) in (self.seen[-1] if self.seen else {}).items()}

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.client.close()
        await self.channel.close()


def west_last(push: dict[str, tuple[int, list[str]]]) -> bool:
    """Whether west's endpoints come after east's in a push (west drained to 0)."""
    return "west" in push and "east" in push and push["west"][0] > push["east"][0]


# ---- the audit logs -----------------------------------------------------------------------------------


def refusals(cluster: RealCluster) -> list[str]:
    """Requests of isthmus-system's service accounts (isthmus's own) the API server refused."""
    return [
        f"{e['user']['username']}: {e['verb']} {e['requestURI']}: {e['responseStatus']['code']}"
        for e in cluster.audit()
        if e["responseStatus"]["code"] in (401, 403)
    ]


# ---- the flow -------------------------------------------------------------------------------------------


async def test_the_whole_flow_chart_cluster_add_serve_drain_restart(
    helm: Callable[..., str],
    real_cluster_factory: Callable[..., list[RealCluster]],
    serving: list[Serve],
    tmp_path: Path,
) -> None:
    home, west = real_cluster_factory("home", "west")
    members = {"east": home, "west": west}
    operator = home.admin  # the operator's credentials (system:masters), never isthmus's
    for cluster in (home, west):
        for name in (SYSTEM, "shop"):
            await cluster.admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        await cluster.admin.apply(SERVICE_IMPORT)

    # 1. The chart, with its defaults (but the drain step): mode home into home (its development
    # root included), mode member's RBAC into both member clusters.
    home_objs = template(helm, "isthmus", f"home.drain.step={DRAIN_STEP}")
    kinds = {o["kind"] for o in home_objs}
    assert kinds >= NOT_APPLIED | {"CustomResourceDefinition", "ServiceAccount", "Role", "Secret"}, kinds
    crds = [o for o in home_objs if o["kind"] == "CustomResourceDefinition"]
    assert "memberclusters.isthmus.io" in {o["metadata"]["name"] for o in crds}
    for obj in crds:
        await apply(operator, obj)
    for path in (MEMBER_CLUSTERS, MESH_CONFIGS):
        await until(lambda path=path: served(operator, path), f"{path} to be served")
    for obj in home_objs:
        if obj["kind"] not in NOT_APPLIED and obj["kind"] != "CustomResourceDefinition":
            await apply(operator, obj)
    deployment = next(o for o in home_objs if o["kind"] == "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    for name, cluster in members.items():
        member_objs = template(
            helm,
            "isthmus-member",
            "mode=member",
            f"member.clusterName={name}",
            f"member.gateway.xdsAddress={XDS_SERVER_NAME}:15012",
        )
        rbac = [o for o in member_objs if o["kind"] in RBAC_KINDS]
        assert {(o["kind"], o["metadata"]["name"]) for o in rbac} >= {
            ("ServiceAccount", "isthmus-reader"),
            ("ClusterRole", "isthmus-reader"),
            ("ClusterRoleBinding", "isthmus-reader"),
        }
        for obj in rbac:
            await apply(cluster.admin, obj)

    # The chart's account's token (TokenRequest, as the kubelet gets it) and a kubeconfig with it; the
    # root as the Deployment's volume mounts it.
    token = await operator.service_account_token(SYSTEM, account, home.audience, seconds=3600)
    chart_kubeconfig = home.kubeconfig(tmp_path / "chart-account.kubeconfig", token)
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "ca"]
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "ca"]
    assert volume["secret"]["secretName"] == ROOT_SECRET, volume  # the chart made it
    root_secret = await operator.get("Secret", SYSTEM, volume["secret"]["secretName"])
    assert root_secret is not None
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    for item in volume["secret"]["items"]:
        (ca_dir / item["path"]).write_bytes(base64.b64decode(root_secret["data"][item["key"]]))
    root_pem = (ca_dir / "tls.crt").read_bytes()

    # 2. isthmus cluster add, as the operator runs it.
    def isthmus(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "isthmus.cli", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    home_admin = ("--home-kubeconfig", str(home.admin_kubeconfig), "--namespace", SYSTEM)
    for name, cluster in members.items():
        added = isthmus("cluster", "add", name, "--kubeconfig", str(cluster.admin_kubeconfig), *home_admin)
        assert added.returncode == 0, added.stderr
        assert f"Secret {SYSTEM}/isthmus-member-{name}" in added.stdout

    # 3. The workload: shop/web in both member clusters, and the account of west's sidecar.
    for name, cluster in members.items():
        await cluster.admin.create(service_without_selector())
        await cluster.admin.create(endpoint_slice([ADDRESSES[name]]))
    await west.admin.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web", "namespace": "shop"}}
    )

    for cluster in (home, west):  # isthmus looks for a missing CRD again only after a minute
        await until(
            lambda c=cluster: served(c.admin, "/apis/multicluster.x-k8s.io/v1alpha1/serviceimports"),
            f"the ServiceImport CRD of {cluster.name} to be served",
        )

    # The mesh's settings, in the one MeshConfig isthmus reads (kubectl apply).
    await operator.request(
        "PATCH",
        f"{MESH_CONFIGS}/default?fieldManager=kubectl&force=true",
        {
            "apiVersion": GROUP_VERSION,
            "kind": "MeshConfig",
            "metadata": {"name": "default", "namespace": SYSTEM},
            "spec": {"maxStaleness": "120s"},
        },
        {"Content-Type": "application/apply-patch+yaml"},
    )

    # 4. isthmus serve with the Deployment's arguments.
    args = list(container["args"])
    assert args[0] == "serve", args
    for flag in ("--cluster-secrets-namespace", "--config-namespace"):
        assert f"{flag}={SYSTEM}" in args, args
    prefix = mount["mountPath"].rstrip("/") + "/"
    args = [a.replace(prefix, f"{ca_dir}/") for a in args]
    assert f"--ca-cert={ca_dir}/tls.crt" in args, args
    assert f"--drain-step={DRAIN_STEP}" in args, args
    args.append(f"--home-kubeconfig={chart_kubeconfig}")  # in a pod: the in-cluster account
    serve = Serve(args, tmp_path)
    serving.append(serve)
    serve.start()

    async def synced() -> Obj | None:
        answer = await serve.readyz()
        if not answer or not answer.get("ready"):
            return None
        states = {n: s.get("state") for n, s in (answer.get("member_clusters") or {}).items()}
        return answer if states == {"east": "synced", "west": "synced"} else None

    # 5. Both member clusters synced, web merged from both.
    ready = await until(synced, "isthmus ready with east and west synced", timeout=90)
    assert {"east", "west"} <= set(ready["clusters"]), ready
    settings = ready["settings"]
    assert settings["mesh_config"] == "applied", settings
    assert settings["in_force"]["maxStaleness"]["source"] == "meshconfig", settings
    services = ready["services"]  # shop/web and default/kubernetes, merged from both clusters
    assert services == 2, ready
    early: list[Obj] = []  # /readyz answers "ready" without the whole mesh (a bug once, below)
    for name, cluster in members.items():

        async def imported(cluster: RealCluster = cluster) -> Obj | None:
            found = await cluster.admin.get("ServiceImport", "shop", "web")
            clusters = ((found or {}).get("status") or {}).get("clusters")
            return found if clusters == [{"cluster": "east"}, {"cluster": "west"}] else None

        await until(imported, f"the ServiceImport of web in {name} to name both clusters")

    sidecar_token = await west.admin.service_account_token("shop", "web", "isthmus", seconds=3600)
    sidecars: list[Sidecar] = []

    async def connect() -> Sidecar:
        sidecar = Sidecar(serve.xds, root_pem, sidecar_token, "west")
        sidecars.append(sidecar)
        await sidecar.start()
        return sidecar

    try:
        sidecar = await connect()
        both = {"west": 0, "east": 1}  # its own cluster first
        await until(
            polled(lambda: sidecar.priorities() == both),
            "west's sidecar to get web's endpoints of both clusters, its own first",
            state=lambda: (sidecar.seen[-1:], sidecar.error),
        )
        assert sidecar.seen[-1] == {"west": (0, [ADDRESSES["west"]]), "east": (1, [ADDRESSES["east"]])}

        listed = isthmus(
            "cluster", "list", *home_admin, "--admin-address", f"{LOOPBACK}:{serve.admin}", "-o", "json"
        )
        assert listed.returncode == 0, listed.stderr
        rows = {row["name"]: row for row in json.loads(listed.stdout)}
        assert set(rows) == {"east", "west"}, rows
        for name, row in rows.items():
            assert row["source"] == f"secret {SYSTEM}/isthmus-member-{name}", row
            assert row["state"] == "synced", row

        # 6. Drain west through its MemberCluster object, with the operator's credentials.
        for name in members:  # declared by the operator (kubectl apply)
            await operator.request(
                "PATCH",
                f"{MEMBER_CLUSTERS}/{name}?fieldManager=kubectl&force=true",
                {"apiVersion": GROUP_VERSION, "kind": "MemberCluster", "metadata": {"name": name}},
                {"Content-Type": "application/apply-patch+yaml"},
            )

        async def patch_weight(weight: int) -> None:  # kubectl patch membercluster west --type merge
            await operator.request(
                "PATCH",
                f"{MEMBER_CLUSTERS}/west",
                {"spec": {"drain": {"weight": weight}}},
                {"Content-Type": "application/merge-patch+json"},
            )

        def progress() -> dict[str, Any]:
            answer: dict[str, Any] = serve.get("/drain", home.admin_token).get("west") or {}
            return answer

        async def status() -> dict[str, Any]:
            obj = await operator.request("GET", f"{MEMBER_CLUSTERS}/west")
            drain: dict[str, Any] = (obj.get("status") or {}).get("drain") or {}
            return drain

        async def recorded(weight: int) -> dict[str, Any] | None:
            drain = await status()
            return drain if drain.get("weight") == weight and drain.get("state") == "done" else None

        async def done(weight: int) -> dict[str, Any] | None:
            now = await asyncio.to_thread(progress)
            return now if now.get("state") == "done" and now.get("weight") == weight else None

        await patch_weight(0)
        drained = await until(lambda: done(0), "isthmus to drain west")
        assert drained["steps"] == [75, 50, 25, 0], drained
        assert drained["timed_out"] == [], drained  # every step ACKed by the sidecar
        drain = await until(lambda: recorded(0), "west's status to record the drain")
        assert drain["proxiesWaiting"] == 0, drain
        last = {"east": 0, "west": 1}  # west's own endpoints after everything else
        await until(
            polled(lambda: sidecar.priorities() == last),
            "west's sidecar to get west's endpoints last",
            state=lambda: sidecar.seen[-1:],
        )
        # The steps on the way: west in the first priority with east, with 75, 50 and 25 percent of the
        # weight, each pushed to the sidecar (and ACKed: the drain waited for it).
        shared = [
            round(100 * weights["west"] / (weights["west"] + weights["east"]))
            for push, weights in zip(sidecar.seen, sidecar.weights, strict=True)
            if len(push) == 2 and len({priority for priority, _ in push.values()}) == 1
        ]
        assert [share for share, _ in itertools.groupby(shared)] == [75, 50, 25], (
            sidecar.seen,
            sidecar.weights,
        )

        # 7. Restart after the drain: west is drained from the first answer.
        async def restart(version: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
            """Stop isthmus, start it again: the status recorded in between, and every /drain answer
            of west until the new process is ready and serves the whole mesh (at ``version``)."""
            await sidecar.close()
            serve.proc.stop(grace=20)
            between = await status()
            serve.start()
            answers: list[dict[str, Any]] = []

            async def ready_seen() -> bool:
                with contextlib.suppress(OSError):
                    now = await asyncio.to_thread(progress)
                    if now:
                        answers.append(now)
                answer = await synced()
                if answer is not None and answer.get("services") != services:
                    early.append(answer)  # ready, but not serving the whole mesh
                return answer is not None and bool(answers)

            await until(ready_seen, "the restarted isthmus to be ready", timeout=90)

            # The sidecar connects once the whole mesh is served (ready should mean it: checked at
            # the end; a resumed drain once made a replica ready on an empty view).
            async def complete() -> bool:
                answer = await serve.readyz() or {}
                if answer.get("ready") and answer.get("services") != services:
                    early.append(answer)
                if version is not None:
                    return answer.get("mesh_version") == version
                return answer.get("services") == services

            await until(complete, "the restarted isthmus to serve the whole mesh")
            return between, answers

        before = (await serve.readyz() or {}).get("mesh_version")
        between, answers = await restart(version=before)  # the same inputs give the same version
        assert between["weight"] == 0, between
        assert answers[0]["weight"] == 0, answers
        assert answers[0]["steps"] == [0], answers  # never back to 100 on the way
        assert all(a["weight"] == 0 for a in answers), answers
        sidecar = await connect()
        await until(
            polled(lambda: bool(sidecar.seen)), "the new sidecar's endpoints", state=lambda: sidecar.error
        )
        assert sidecar.seen[0] == {"east": (0, [ADDRESSES["east"]]), "west": (1, [ADDRESSES["west"]])}, (
            sidecar.seen  # drained from the first push
        )

        # 8. Undrain; stop isthmus in the middle of it (once the status records a step), start again.
        async def leading() -> bool:  # the restarted replica writes the status once it holds the Lease
            lease = await operator.request(
                "GET", f"/apis/coordination.k8s.io/v1/namespaces/{SYSTEM}/leases/isthmus-status"
            )
            return str(lease["spec"].get("holderIdentity", "")).endswith(f"-{serve.pid}")

        await until(leading, "the restarted isthmus to hold the status Lease", timeout=60)
        await patch_weight(100)

        async def midway() -> dict[str, Any] | None:
            drain = await status()
            return drain if drain.get("state") == "running" and 0 < drain.get("weight", 0) < 100 else None

        await until(midway, "west's status to record a step of the undrain")
        between, answers = await restart()
        at = between["weight"]
        assert between["state"] == "running", between
        assert 0 < at < 100, between
        expected = [w for w in (25, 50, 75, 100) if w > at]
        first = answers[0]
        assert first["action"] == "undrain", answers
        assert first["steps"] == expected, (at, answers)
        assert first["weight"] in (at, *expected), (at, answers)
        assert all(a["weight"] >= at for a in answers), (at, answers)  # resumed, not started over
        sidecar = await connect()
        undrained = await until(lambda: done(100), "isthmus to finish the undrain", timeout=90)
        assert undrained["steps"] == expected, undrained
        await until(
            polled(lambda: sidecar.priorities() == both),
            "west's sidecar to get its own endpoints first again",
            state=lambda: sidecar.seen[-1:],
        )
        # On the way, west shared the first priority with east (weights scaled), never went last again.
        assert not [push for push in sidecar.seen if west_last(push)], sidecar.seen
        await until(lambda: recorded(100), "west's status to record the undrain", timeout=60)

        # The objects' status, by the Lease holder: both members accepted and synced, the MeshConfig
        # accepted, its maxStaleness in force from it.
        def conditions(obj: Obj) -> dict[str, str]:
            return {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions") or []}

        for name in members:

            async def member_ok(name: str = name) -> Obj | None:
                obj = await operator.request("GET", f"{MEMBER_CLUSTERS}/{name}")
                wanted = {"Accepted": "True", "Synced": "True"}
                return obj if conditions(obj) == wanted else None

            await until(member_ok, f"MemberCluster {name} accepted and synced")

        async def mesh_ok() -> Obj | None:
            obj = await operator.request("GET", f"{MESH_CONFIGS}/default")
            in_force = {s["name"]: s for s in (obj.get("status") or {}).get("inForce") or []}
            accepted = conditions(obj).get("Accepted") == "True"
            from_it = (in_force.get("maxStaleness") or {}).get("source") == "meshconfig"
            return obj if accepted and from_it else None

        await until(mesh_ok, "the MeshConfig's status: accepted, in force")
    finally:
        for sidecar in sidecars:
            await sidecar.close()

    # 9. Nothing of isthmus's was refused, in either cluster, over the whole run.
    serve.stop()
    chart_user = f"system:serviceaccount:{SYSTEM}:{account}"
    reader = f"system:serviceaccount:{SYSTEM}:isthmus-reader"
    events = home.audit()
    assert {e["user"]["username"] for e in events} >= {chart_user, reader}
    assert {e["user"]["username"] for e in west.audit()} >= {reader}
    assert refusals(home) == []
    assert refusals(west) == []
    chart_requests = {
        (e["verb"], e["objectRef"].get("resource", ""), e["objectRef"].get("subresource", ""))
        for e in events
        if e["user"]["username"] == chart_user
    }
    for cluster in (home, west):  # the readers of `cluster add`: reads, and only the writes they need
        writes = {
            (e["verb"], e["objectRef"].get("resource", ""))
            for e in cluster.audit()
            if e["user"]["username"] == reader and e["verb"] not in ("get", "list", "watch")
        }
        if cluster is west:
            assert ("create", "tokenreviews") in writes, writes  # west's sidecar's token
        assert writes <= {
            ("create", "tokenreviews"),
            ("create", "serviceimports"),
            ("update", "serviceimports"),  # and their status
            ("delete", "serviceimports"),
        }, writes
    assert {
        ("watch", "secrets", ""),
        ("watch", "memberclusters", ""),
        ("update", "memberclusters", "status"),
        ("update", "leases", ""),
        ("create", "tokenreviews", ""),
        ("create", "subjectaccessreviews", ""),
    } <= chart_requests, chart_requests

    # Bugs this test found once: a restart deleted ServiceImports, and said ready too early.
    deleted = [
        f"{c.name} {e['stageTimestamp'][11:23]} {e['requestURI']}"
        for c in (home, west)
        for e in c.audit()
        if e["verb"] == "delete" and e["objectRef"].get("resource") == "serviceimports"
    ]
    assert not deleted, f"a restarted isthmus deleted ServiceImports of the mesh: {deleted}"
    shown = [(a.get("services"), a.get("mesh_version")) for a in early[:3]]
    assert not early, f"/readyz was ready while serving less than the mesh {len(early)} times: {shown}"


def test_the_charts_development_root_signs_certificates_that_verify(
    helm: Callable[..., str], tmp_path: Path
) -> None:
    """The root the chart generates without home.ca.existingSecret, loaded as the Deployment mounts it:
    the xDS serving certificate isthmus issues with it verifies against it."""
    [secret] = [o for o in template(helm, "isthmus") if o["kind"] == "Secret"]
    assert secret["metadata"]["name"] == "isthmus-dev-ca"
    for key in ("tls.crt", "tls.key"):
        (tmp_path / key).write_bytes(base64.b64decode(secret["data"][key]))
    ca = MeshCA.from_files(tmp_path / "tls.crt", tmp_path / "tls.key")
    serving = ca.serving_certificate((XDS_SERVER_NAME,))
    checked = verifies(tmp_path / "tls.crt", serving.cert_chain, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
