"""Kubernetes discovery against real kube-apiservers (tests/realkube): what the fake tier checks,
proven on the real thing, with the least-privilege role of deploy/member-cluster/rbac.yaml and
tokens from the TokenRequest API.

* three member clusters into one graph; a change, a removal and a return; a credential rotation with
  no gap; the whole run refused nothing (the API servers' audit logs say so), and the same service
  account may write nothing and read no Secret;
* membership from labelled Secrets in a home cluster, read with a Role limited to one namespace;
* an API server stopped while a second one on the same etcd takes writes, etcd compacted, then the
  first one back: the watch resumes with a 410, relists, and the graph holds exactly the new state;
* kubeconfigs that cannot work (another cluster's CA, an expired token, a service account without
  rights) are reported for their cluster only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from kubernetes_asyncio import client
from test_kube_members import Graph

from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.kube.kubeconfig import Credentials
from isthmus.discovery.kube.members import Members
from isthmus.discovery.kube.reflector import Reflector, Timing
from isthmus.discovery.kube.secrets import MEMBER_LABEL, SecretMembers
from isthmus.discovery.model import ClusterState, MeshView, ServiceKey
from realkube.cluster import ISSUER, RealCluster
from realkube.crds import TRAFFIC_SPLIT
from realkube.fixtures import READER, READER_NAMESPACE, install_reader, rbac_objects, reader_kubeconfig
from realkube.rest import ApiError, Rest

pytestmark = pytest.mark.realkube

TIMING = Timing(
    watch_timeout=20, idle_timeout=90.0, request_timeout=5.0, backoff_initial=0.2, backoff_max=2.0
)
READER_USER = f"system:serviceaccount:{READER_NAMESPACE}:{READER}"


def service(namespace: str, name: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }


def endpoint_slice(namespace: str, name: str, addresses: list[str], svc: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in sorted(addresses)],
    }


def endpoints(view: MeshView, key: ServiceKey) -> set[tuple[str, str]]:
    svc = view.services.get(key)
    return {(e.locality.cluster, e.address) for e in svc.endpoints} if svc else set()


def state(name: str) -> Callable[[MeshView], ClusterState | None]:
    def of(view: MeshView) -> ClusterState | None:
        member = view.clusters.get(name)
        return member.state if member is not None else None

    return of


@pytest.fixture
async def graph() -> AsyncIterator[tuple[Graph, Aggregator]]:
    g = Graph()
    aggregator = Aggregator(g.on_view, quiet=0.02, max_delay=0.2)
    task = asyncio.create_task(aggregator.run())
    yield g, aggregator
    task.cancel()


@contextlib.asynccontextmanager
async def running(members: Members | SecretMembers) -> AsyncIterator[None]:
    task = asyncio.create_task(members.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def refused(cluster: RealCluster, since: int = 0) -> list[str]:
    """The reader's requests that the API server refused (401/403), from its audit log."""
    return [
        f"{e['verb']} {e['requestURI']}: {e['responseStatus']['code']}"
        for e in cluster.audit()[since:]
        if e["user"]["username"] == READER_USER and e["responseStatus"]["code"] in (401, 403)
    ]


# Its own waits are bounded (30 + 15 + 15 + 15 + 30 + 15 s, and the clusters' start in its setup):
# the suite's 120 s is less than their sum, and was hit on a loaded machine without any one of them
# failing.
@pytest.mark.timeout(300)
async def test_three_real_clusters_one_graph_with_least_privilege(
    real_clusters: dict[str, RealCluster], namespace: str, graph: tuple[Graph, Aggregator], tmp_path: Path
) -> None:
    g, aggregator = graph
    web = ServiceKey(namespace, "web")
    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    audit_start = {name: len(c.audit()) for name, c in real_clusters.items()}
    for i, (name, cluster) in enumerate(real_clusters.items()):
        await cluster.admin.create(service(namespace))
        await cluster.admin.create(endpoint_slice(namespace, f"web-{name}", [f"10.{i}.0.1", f"10.{i}.0.2"]))
        await reader_kubeconfig(cluster, directory / f"{name}.yaml")
    members = Members(aggregator, directory=directory, timing=TIMING, poll_interval=0.2)
    async with running(members):
        view = await g.until(lambda v: len(endpoints(v, web)) == 6, timeout=30)
        assert {c for c, _ in endpoints(view, web)} == {"a", "b", "c"}
        assert all(state(n)(view) is ClusterState.SYNCED for n in "abc"), view.clusters
        # One watch event in b changes b's endpoints only.
        await real_clusters["b"].admin.apply(endpoint_slice(namespace, "web-b", ["10.1.0.9"]))
        view = await g.until(lambda v: ("b", "10.1.0.9") in endpoints(v, web))
        assert endpoints(view, web) == {
            ("a", "10.0.0.1"),
            ("a", "10.0.0.2"),
            ("b", "10.1.0.9"),
            ("c", "10.2.0.1"),
            ("c", "10.2.0.2"),
        }
        # c leaves the mesh and comes back.
        (directory / "c.yaml").unlink()
        await g.until(lambda v: "c" not in v.clusters and len(endpoints(v, web)) == 3)
        await reader_kubeconfig(real_clusters["c"], directory / "c.yaml")
        await g.until(lambda v: len(endpoints(v, web)) == 5)
        # a's token is rotated (a new TokenRequest): the new watcher warms up beside the old one,
        # and a's endpoints never leave the graph.
        gaps: list[MeshView] = []
        inner = g.on_view

        def watch_gaps(view: MeshView) -> None:
            if not {e for e in endpoints(view, web) if e[0] == "a"}:
                gaps.append(view)
            inner(view)

        aggregator.on_view = watch_gaps
        old = members.members["a"].watcher.credentials.digest
        await reader_kubeconfig(real_clusters["a"], directory / "a.yaml")
        await real_clusters["a"].admin.apply(endpoint_slice(namespace, "web-a", ["10.0.0.3"]))
        deadline = time.monotonic() + 30
        while members.members["a"].watcher.credentials.digest == old or members.status()["a"]["rotating"]:
            assert time.monotonic() < deadline, members.status()
            await asyncio.sleep(0.1)
        await g.until(lambda v: ("a", "10.0.0.3") in endpoints(v, web))
        assert not gaps, f"a's endpoints left the graph during the rotation: {gaps[0]}"
    for name, cluster in real_clusters.items():
        assert refused(cluster, audit_start[name]) == [], f"cluster {name} refused isthmus"
        verbs = {
            e["verb"] for e in cluster.audit()[audit_start[name] :] if e["user"]["username"] == READER_USER
        }
        assert verbs <= {"get", "list", "watch"}, verbs
    # The same service account can write nothing and read no Secret.
    token = await real_clusters["a"].admin.service_account_token(READER_NAMESPACE, READER, ISSUER)
    reader = Rest(real_clusters["a"].url, str(real_clusters["a"].pki.ca_cert), token)
    for attempt in (
        reader.create(service(namespace, "intruder")),
        reader.request("GET", "/api/v1/secrets"),
        reader.request("GET", f"/api/v1/namespaces/{READER_NAMESPACE}/secrets"),
        reader.request("DELETE", f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices/web-a"),
    ):
        with pytest.raises(ApiError) as denied:
            await attempt
        assert denied.value.status == 403


async def test_membership_from_secrets_read_with_a_namespaced_role(
    real_clusters: dict[str, RealCluster], namespace: str, graph: tuple[Graph, Aggregator], tmp_path: Path
) -> None:
    g, aggregator = graph
    home = real_clusters["a"]
    web = ServiceKey(namespace, "web")
    for name in ("b", "c"):
        await real_clusters[name].admin.create(service(namespace))
        await real_clusters[name].admin.create(endpoint_slice(namespace, "web", [f"10.9.{ord(name)}.1"]))
    # isthmus's account in the home cluster may read Secrets of its own namespace only.
    await home.admin.apply_all(
        [
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": "isthmus", "namespace": namespace},
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "isthmus-members", "namespace": namespace},
                "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "isthmus-members", "namespace": namespace},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "isthmus-members",
                },
                "subjects": [{"kind": "ServiceAccount", "name": "isthmus", "namespace": namespace}],
            },
        ]
    )
    home_token = await home.admin.service_account_token(namespace, "isthmus", ISSUER)
    home_kubeconfig = home.kubeconfig(tmp_path / "home.yaml", home_token)

    async def member_secret(names: tuple[str, ...]) -> dict[str, Any]:
        data = {}
        for name in names:
            path = await reader_kubeconfig(real_clusters[name], tmp_path / f"{name}.yaml")
            data[name] = base64.b64encode(path.read_bytes()).decode()
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "members", "namespace": namespace, "labels": {MEMBER_LABEL: "true"}},
            "type": "Opaque",
            "data": data,
        }

    await home.admin.create(await member_secret(("b", "c")))
    secrets = SecretMembers(namespace, kubeconfig=str(home_kubeconfig), timing=TIMING)
    members = Members(aggregator, secrets=secrets, timing=TIMING, poll_interval=0.2)
    async with running(members):
        await g.until(lambda v: {c for c, _ in endpoints(v, web)} == {"b", "c"}, timeout=30)
        await home.admin.replace(await member_secret(("b",)))  # key c is gone
        await g.until(lambda v: "c" not in v.clusters and {c for c, _ in endpoints(v, web)} == {"b"})
        assert members.status()["c"]["state"] == "removed"
    # That account cannot read Secrets anywhere else.
    reader = Rest(home.url, str(home.pki.ca_cert), home_token)
    with pytest.raises(ApiError) as denied:
        await reader.request("GET", f"/api/v1/namespaces/{READER_NAMESPACE}/secrets")
    assert denied.value.status == 403


async def test_restart_with_writes_meanwhile_and_a_compacted_etcd(
    real_cluster_factory: Callable[..., list[RealCluster]], graph: tuple[Graph, Aggregator], tmp_path: Path
) -> None:
    g, aggregator = graph
    [cluster] = real_cluster_factory("d")
    web = ServiceKey("shop", "web")
    await cluster.admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    await cluster.admin.create(service("shop"))
    for i in (1, 2, 3):
        await cluster.admin.create(endpoint_slice("shop", f"web-{i}", [f"10.4.0.{i}"]))
    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    await reader_kubeconfig(cluster, directory / "d.yaml")
    members = Members(aggregator, directory=directory, timing=TIMING, poll_interval=0.2)
    async with running(members):
        await g.until(
            lambda v: len(endpoints(v, web)) == 3 and state("d")(v) is ClusterState.SYNCED, timeout=30
        )
        _, spare = cluster.spare_apiserver()
        cluster.stop_apiserver(kill=True)
        await g.until(lambda v: state("d")(v) is ClusterState.UNREACHABLE, timeout=30)
        # Writes through the other API server while isthmus's is down, then etcd forgets the history.
        await spare.wait_ready()
        await spare.delete("EndpointSlice", "shop", "web-2")
        await spare.apply(endpoint_slice("shop", "web-1", ["10.4.0.11"]))
        await spare.create(endpoint_slice("shop", "web-4", ["10.4.0.4"]))
        for i in range(5):  # more revisions past the reflector's resourceVersion
            await spare.apply(
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{i}", "namespace": "shop"}}
            )
        await cluster.compact()
        relists_before = members.members["d"].watcher.watch_stats()["endpointslices"]["relists"]
        cluster.start_apiserver()
        await cluster.wait_ready()
        back = time.monotonic()
        want = {("d", "10.4.0.11"), ("d", "10.4.0.3"), ("d", "10.4.0.4")}
        view = await g.until(
            lambda v: endpoints(v, web) == want and state("d")(v) is ClusterState.SYNCED, timeout=60
        )
        took = time.monotonic() - back
        stats = members.members["d"].watcher.watch_stats()
        assert stats["endpointslices"]["relists"] > relists_before, stats  # 410 Gone: relisted
        assert view.services[web].endpoints  # no ghost of web-2, no duplicate
        # The /version probe wakes the watches (measured 0.8-0.9 s here); the doubling backoff alone
        # took 6-22 s. The bound is loose: it fails only that behaviour, not a slow machine.
        assert took < 5.0, f"synced {took:.1f}s after the API server was ready again"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def expired_token(cluster: RealCluster) -> str:
    """A service-account token signed with the cluster's own key, for the reader, expired a minute ago."""
    key = serialization.load_pem_private_key(cluster.pki.sa_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = int(time.time())
    header = {"alg": "ES256", "typ": "JWT"}
    claims = {
        "iss": ISSUER,
        "aud": [ISSUER],
        "sub": READER_USER,
        "iat": now - 600,
        "nbf": now - 600,
        "exp": now - 60,
        "kubernetes.io": {"namespace": READER_NAMESPACE, "serviceaccount": {"name": READER, "uid": "0"}},
    }
    signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


async def test_kubeconfigs_that_cannot_work_are_reported_for_their_cluster_only(
    real_clusters: dict[str, RealCluster], namespace: str, graph: tuple[Graph, Aggregator], tmp_path: Path
) -> None:
    g, aggregator = graph
    a, b = real_clusters["a"], real_clusters["b"]
    web = ServiceKey(namespace, "web")
    await a.admin.create(service(namespace))
    await a.admin.create(endpoint_slice(namespace, "web", ["10.8.0.1"]))
    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    await reader_kubeconfig(a, directory / "good.yaml")
    token = await a.admin.service_account_token(READER_NAMESPACE, READER, ISSUER)
    a.kubeconfig(directory / "wrong-ca.yaml", token, ca_pem=b.pki.ca_pem)
    a.kubeconfig(directory / "expired.yaml", expired_token(a))
    await install_reader(a)
    await a.admin.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody", "namespace": namespace}}
    )
    nobody = await a.admin.service_account_token(namespace, "nobody", ISSUER)
    a.kubeconfig(directory / "no-rights.yaml", nobody)
    members = Members(aggregator, directory=directory, timing=TIMING, poll_interval=0.2)
    async with running(members):
        await g.until(lambda v: endpoints(v, web) == {("good", "10.8.0.1")}, timeout=30)

        def reported() -> dict[str, str]:
            status = members.status()
            return {
                n: str(status[n]["detail"])
                for n in ("wrong-ca", "expired", "no-rights")
                if status[n]["detail"]
            }

        deadline = time.monotonic() + 30
        while len(reported()) < 3:
            assert time.monotonic() < deadline, members.status()
            await asyncio.sleep(0.2)
        details = reported()
        status = members.status()
        assert status["good"]["state"] == "synced"
        assert {status[n]["state"] for n in details} <= {"syncing", "unreachable"}, status
        assert (
            "CERTIFICATE_VERIFY_FAILED" in details["wrong-ca"] or "certificate" in details["wrong-ca"].lower()
        )
        assert "401" in details["expired"], details
        assert "403" in details["no-rights"], details


async def test_a_crd_installed_while_watched_keeps_the_cluster_synced(
    real_cluster_factory: Callable[..., list[RealCluster]], graph: tuple[Graph, Aggregator], tmp_path: Path
) -> None:
    """A real API server answers 429 "storage is (re)initializing" for a new CRD's first requests."""
    g, aggregator = graph
    [cluster] = real_cluster_factory("e")
    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    await reader_kubeconfig(cluster, directory / "e.yaml")
    states: list[ClusterState | None] = []
    inner = g.on_view

    def record(view: MeshView) -> None:
        states.append(state("e")(view))
        inner(view)

    aggregator.on_view = record
    members = Members(aggregator, directory=directory, timing=TIMING, poll_interval=0.2)
    async with running(members):
        await g.until(lambda v: state("e")(v) is ClusterState.SYNCED, timeout=30)
        await cluster.admin.create(TRAFFIC_SPLIT)
        await cluster.admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
        split = {
            "apiVersion": "split.smi-spec.io/v1alpha2",
            "kind": "TrafficSplit",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"service": "web", "backends": [{"service": "web-v2", "weight": 100}]},
        }
        deadline = time.monotonic() + 30
        while True:  # the admin's own first writes may get the 429 too
            try:
                await cluster.admin.create(split)
                break
            except ApiError as exc:
                if exc.status not in (404, 429) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        await g.until(lambda v: ServiceKey("shop", "web") in v.splits, timeout=60)
        assert ClusterState.UNREACHABLE not in states, states
        assert members.status()["e"]["state"] == "synced"


async def test_bookmarks_from_a_real_server_keep_the_watch_current(
    real_clusters: dict[str, RealCluster], namespace: str, tmp_path: Path
) -> None:
    """A watch of one namespace's EndpointSlices gets bookmarks carrying the resourceVersion of
    changes elsewhere, so it resumes from a current version without relisting."""
    cluster = real_clusters["a"]
    other = f"{namespace}-other"
    await cluster.admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": other}})
    path = await reader_kubeconfig(cluster, tmp_path / "a.yaml")
    api = await Credentials.parse("a", path.read_text(), str(path)).api_client()
    changes: list[object] = []
    try:
        discovery = client.DiscoveryV1Api(api)
        list_fn = functools.partial(discovery.list_namespaced_endpoint_slice, namespace)
        # The server ends each watch after 4 s; its bookmarks come before that.
        timing = Timing(watch_timeout=4, idle_timeout=30.0, request_timeout=5.0)
        reflector = Reflector("endpointslices", list_fn, changes.append, timing=timing)
        task = asyncio.create_task(reflector.run())
        try:
            await asyncio.wait_for(reflector.synced.wait(), 30)
            listed = int(reflector.resource_version)
            deadline = time.monotonic() + 40
            i = 0
            while reflector.bookmarks < 2 or int(reflector.resource_version) <= listed:
                assert time.monotonic() < deadline, (reflector.bookmarks, reflector.resource_version, listed)
                i += 1
                await cluster.admin.apply(endpoint_slice(other, f"s{i % 3}", [f"10.7.1.{i % 250}"]))
                await asyncio.sleep(0.3)
            assert reflector.events == 0, "changes of another namespace were delivered"
            assert reflector.relists == 1  # resuming from a bookmark's resourceVersion needs no relist
            assert changes == [], changes
            await cluster.admin.create(endpoint_slice(namespace, "web", ["10.7.0.1"]))
            while reflector.events < 1:
                assert time.monotonic() < deadline + 30
                await asyncio.sleep(0.1)
            assert f"{namespace}/web" in reflector.store
        finally:
            task.cancel()
    finally:
        await api.close()
        await cluster.admin.delete("Namespace", None, other)


async def test_a_role_without_the_optional_kinds_degrades_only_those_features(
    real_clusters: dict[str, RealCluster], namespace: str, graph: tuple[Graph, Aggregator], tmp_path: Path
) -> None:
    """An operator who uses neither ServiceExports, TrafficSplits, GAMMA routes nor authorization
    policies grants none of them: the real API server answers 403 for them, and the cluster stays
    synced with its services."""
    g, aggregator = graph
    cluster = real_clusters["b"]
    web = ServiceKey(namespace, "web")
    await cluster.admin.create(service(namespace))
    await cluster.admin.create(endpoint_slice(namespace, "web", ["10.6.0.1"]))
    await install_reader(cluster)
    account, role = "narrow-reader", f"isthmus-narrow-{namespace}"
    rules = [
        rule
        for rule in next(o for o in rbac_objects() if o["kind"] == "ClusterRole")["rules"]  # type: ignore[union-attr]
        if rule["apiGroups"] in ([""], ["discovery.k8s.io"])
    ]
    await cluster.admin.apply_all(
        [
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": account, "namespace": READER_NAMESPACE},
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": role},
                "rules": rules,
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": role},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": READER_NAMESPACE}],
            },
        ]
    )
    token = await cluster.admin.service_account_token(READER_NAMESPACE, account, ISSUER)
    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    cluster.kubeconfig(directory / "b.yaml", token)
    members = Members(aggregator, directory=directory, timing=TIMING, poll_interval=0.2)
    try:
        async with running(members):
            await g.until(lambda v: endpoints(v, web) == {("b", "10.6.0.1")}, timeout=30)
            deadline = time.monotonic() + 30
            optional = {
                "serviceexports",
                "trafficsplits",
                "httproutes",
                "grpcroutes",
                "authorizationpolicies",
                "traffictargets",
                "httproutegroups",
                "tcproutes",
            }
            while set(members.status()["b"].get("degraded", {})) != optional:  # type: ignore[arg-type]
                assert time.monotonic() < deadline, members.status()
                await asyncio.sleep(0.2)
            assert members.status()["b"]["state"] == "synced", members.status()
    finally:
        await cluster.admin.delete("ClusterRoleBinding", None, role)
        await cluster.admin.delete("ClusterRole", None, role)
