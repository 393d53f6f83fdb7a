"""The Helm chart deploy/helm/isthmus against the real helm and a real kube-apiserver.

* ``helm lint`` and ``helm template`` for the default values and the values files of ci/ (every
  option set, both modes); what they render is strict YAML, its control plane arguments are parsed by
  the real ``isthmus serve`` command line, the gateway's init container arguments make a bootstrap with
  the real ``isthmus bootstrap``, the generated development root loads as isthmus's mesh CA, and the
  member mode's roles are the rules of deploy/member-cluster/rbac.yaml;
* every object both modes render (all options set) is accepted by a real kube-apiserver (server-side
  apply, then read back): namespaced ones in a namespace of the test, cluster-scoped ones with names of
  this run, all removed afterwards;
* the RBAC, for real, in a cluster of its own that is home and member at once: isthmus's membership
  (the member Secret, read with the home chart's account), discovery and ServiceImport writes (with a
  token of the member chart's reader account), a TokenReview of the chart's gateway account and the
  admin API's reviews run against it; the audit log shows no refused request of either account, and
  both are refused (403) what they do not need: Secrets elsewhere, writes.

helm is built by hack/helm.sh (pinned in hack/versions.env) from the Go module proxy, once per machine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import functools
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from isthmus.cli import _parser as isthmus_parser
from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.kube.mcs import MANAGED_BY, Desired
from isthmus.discovery.kube.members import Members
from isthmus.discovery.kube.reflector import Timing
from isthmus.discovery.kube.reviews import Reviewer
from isthmus.discovery.kube.secrets import MEMBER_LABEL, SecretMembers
from isthmus.discovery.model import MeshView, ServiceKey
from isthmus.xds.ca import MeshCA
from realkube.binaries import ROOT, versions
from realkube.cluster import RealCluster
from realkube.crds import SERVICE_EXPORT, SERVICE_IMPORT, TRAFFIC_SPLIT, with_status
from realkube.fixtures import RBAC
from realkube.objects import endpoint_slice, service_without_selector
from realkube.rest import ApiError, Rest, forbidden
from realkube.wait import until

pytestmark = [pytest.mark.realkube, pytest.mark.timeout(900)]  # a cold helm build takes ~3 min

CHART = ROOT / "deploy" / "helm" / "isthmus"
VALUES = {
    "home-default": [],
    "home-all": [CHART / "ci" / "home-all-values.yaml"],
    "member": [CHART / "ci" / "member-values.yaml"],
    "member-all": [CHART / "ci" / "member-all-values.yaml"],
}
SYSTEM = "isthmus-system"
TIMING = Timing(
    watch_timeout=20, idle_timeout=90.0, request_timeout=5.0, backoff_initial=0.2, backoff_max=2.0
)
Obj = dict[str, Any]


# ---- helm ------------------------------------------------------------------------------------------


@functools.cache
def helm_binary() -> Path:
    """hack/helm.sh's helm (``ISTHMUS_HELM`` overrides it); skipped only without a Go toolchain."""
    given = os.environ.get("ISTHMUS_HELM")
    if given:
        return Path(given)
    home = Path(os.environ.get("ISTHMUS_CACHE", Path.home() / ".cache" / "isthmus"))
    cached = home / "helm" / versions()["HELM_VERSION"] / "bin" / "helm"
    if not cached.exists() and shutil.which("go") is None:
        pytest.skip("helm is built from the Go module proxy by hack/helm.sh, and there is no Go toolchain")
    done = subprocess.run(
        ["bash", str(ROOT / "hack" / "helm.sh")], check=True, stdout=subprocess.PIPE, text=True, timeout=1800
    )
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    binary = helm_binary()
    home = tmp_path_factory.mktemp("helm-home")  # helm's own cache and config: not the user's
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str) -> str:
        done = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, f"helm {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    return run


class _Strict(yaml.SafeLoader):
    """YAML that refuses a key twice in one mapping (kubectl does; yaml.safe_load keeps the last)."""


def _no_duplicates(loader: _Strict, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        assert key not in seen, f"key {key!r} twice at {key_node.start_mark}"
        seen.add(key)
    return loader.construct_mapping(node, deep)


_Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def render(
    helm: Callable[..., str], which: str, namespace: str = SYSTEM, release: str = "isthmus", *sets: str
) -> list[Obj]:
    args = ["template", release, str(CHART), "--namespace", namespace]
    for path in VALUES[which]:
        args += ["--values", str(path)]
    for s in sets:
        args += ["--set", s]
    return [doc for doc in yaml.load_all(helm(*args), Loader=_Strict) if doc]


def by_kind(objs: list[Obj]) -> dict[tuple[str, str], Obj]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def container_args(deployment: Obj, name: str, init: bool = False) -> list[str]:
    spec = deployment["spec"]["template"]["spec"]
    return next(c["args"] for c in spec["initContainers" if init else "containers"] if c["name"] == name)


# ---- rendering, no API server ----------------------------------------------------------------------


def test_lint_and_template_every_values_file(helm: Callable[..., str], tmp_path: Path) -> None:
    assert versions()["HELM_VERSION"] in helm("version", "--short")
    for files in VALUES.values():
        helm("lint", "--strict", str(CHART), "--namespace", SYSTEM, *[f"--values={f}" for f in files])
    for which in ("home-default", "home-all"):
        objs = by_kind(render(helm, which))
        deployment = objs[("Deployment", "isthmus")]
        args = container_args(deployment, "isthmus")
        # Every argument is a flag of the real `isthmus serve`, with a value it accepts.
        parsed = isthmus_parser().parse_args(args)
        assert parsed.command == "serve"
        assert parsed.cluster_secrets_namespace == SYSTEM
        assert parsed.xds_address == "0.0.0.0:15012"
        assert parsed.admin_address == "0.0.0.0:15014"
        assert "isthmus.isthmus-system.svc" in parsed.xds_san
        assert parsed.ca_cert
        assert parsed.ca_key
        assert parsed.admin_kube_auth
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-admin"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-admin"}
        assert {"name": "http-admin", "containerPort": 15014} in container["ports"]
        security = container["securityContext"]
        assert security["runAsNonRoot"]
        assert security["readOnlyRootFilesystem"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert container["resources"]["requests"]
        assert pod["securityContext"]["runAsNonRoot"]
        assert "podAntiAffinity" in pod["affinity"]
        assert ("PodDisruptionBudget", "isthmus") in objs
        service = objs[("Service", "isthmus")]
        assert {p["port"] for p in service["spec"]["ports"]} >= {15012, 15014}
        # The home cluster's roles: Secrets of the release namespace (a Role), the MemberCluster
        # and MeshConfig objects and the status Lease there (the configuration API), the admin reviews.
        assert objs[("Role", "isthmus-member-secrets")]["rules"] == [
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]},
            {
                "apiGroups": ["isthmus.io"],
                "resources": ["memberclusters"],
                "verbs": ["get", "list", "watch", "create", "patch"],
            },
            {"apiGroups": ["isthmus.io"], "resources": ["meshconfigs"], "verbs": ["list", "watch"]},
            {
                "apiGroups": ["isthmus.io"],
                "resources": ["memberclusters/status", "meshconfigs/status"],
                "verbs": ["update"],
            },
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "verbs": ["get", "create", "update"],
            },
        ]
        assert not [o for o in objs.values() if o["kind"] == "ClusterRole" and "secrets" in json.dumps(o)]
    default = by_kind(render(helm, "home-default"))
    assert default[("Deployment", "isthmus")]["spec"]["replicas"] == 2
    # The generated development root is one isthmus loads as its mesh CA, and it is said loudly.
    secret = default[("Secret", "isthmus-dev-ca")]
    for key in ("tls.crt", "tls.key"):
        (tmp_path / key).write_bytes(base64.b64decode(secret["data"][key]))
    MeshCA.from_files(tmp_path / "tls.crt", tmp_path / "tls.key")
    everything = by_kind(render(helm, "home-all"))
    assert ("Secret", "isthmus-dev-ca") not in everything
    serve = isthmus_parser().parse_args(container_args(everything[("Deployment", "isthmus")], "isthmus"))
    assert serve.webhook_address == "0.0.0.0:15017"
    assert serve.service_imports is False
    assert {p["port"] for p in everything[("Service", "isthmus")]["spec"]["ports"]} == {15012, 15014, 15017}

    rbac = by_kind([o for o in yaml.safe_load_all(RBAC.read_text()) if o])
    for which in ("member", "member-all"):
        objs = by_kind(render(helm, which))
        # The member mode's roles are deploy/member-cluster/rbac.yaml's, rule for rule.
        for name in ("isthmus-reader", "isthmus-service-imports", "isthmus-route-status"):
            assert objs[("ClusterRole", name)]["rules"] == rbac[("ClusterRole", name)]["rules"], name
            binding, expected = objs[("ClusterRoleBinding", name)], rbac[("ClusterRoleBinding", name)]
            assert binding["roleRef"] == expected["roleRef"]
            assert binding["subjects"] == expected["subjects"]
        assert {k for k in objs if k[0] in ("ClusterRole", "Role")} == {
            ("ClusterRole", "isthmus-reader"),
            ("ClusterRole", "isthmus-service-imports"),
            ("ClusterRole", "isthmus-route-status"),
        }
        gateway = objs[("Service", "isthmus-eastwest")]
        assert gateway["metadata"]["labels"]["isthmus.io/gateway"] == "eastwest"
        assert gateway["spec"]["type"] == "LoadBalancer"
        assert gateway["spec"]["ports"] == [{"name": "tls", "port": 15443, "targetPort": "tls"}]
        deployment = objs[("Deployment", "isthmus-eastwest")]
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "isthmus-gateway"
        # The init container's arguments make a bootstrap with the real `isthmus bootstrap`.
        args = container_args(deployment, "bootstrap", init=True)
        args = [a.replace("$(POD_NAME)", "eastwest-1").replace("$(NODE_NAME)", "node-1") for a in args]
        out = tmp_path / f"{which}-bootstrap.json"
        args = [a if not a.startswith("--output=") else f"--output={out}" for a in args]
        subprocess.run([str(ROOT / ".venv" / "bin" / "isthmus"), *args], check=True, timeout=60)
        node = json.loads(out.read_text())["node"]
        assert node["id"] == "gateway~eastwest-1.isthmus-system~east"
        assert node["metadata"]["isthmus"]["role"] == "gateway"
    webhook = by_kind(render(helm, "member-all"))[
        ("MutatingWebhookConfiguration", "isthmus-sidecar-injector")
    ]
    [hook] = webhook["webhooks"]
    assert hook["clientConfig"]["url"] == "https://isthmus-webhook.example.net:15017/inject/east"
    assert base64.b64decode(hook["clientConfig"]["caBundle"]).startswith(b"-----BEGIN CERTIFICATE-----")
    assert hook["failurePolicy"] == "Fail"


# ---- what it renders, applied to a real API server -------------------------------------------------


def path_of(obj: Obj, name: bool = True) -> str:
    api = obj["apiVersion"]
    prefix = "/api/v1" if api == "v1" else f"/apis/{api}"
    plural = {
        "Namespace": "namespaces",
        "ServiceAccount": "serviceaccounts",
        "Secret": "secrets",
        "ConfigMap": "configmaps",
        "Service": "services",
        "Deployment": "deployments",
        "PodDisruptionBudget": "poddisruptionbudgets",
        "Role": "roles",
        "RoleBinding": "rolebindings",
        "ClusterRole": "clusterroles",
        "ClusterRoleBinding": "clusterrolebindings",
        "MutatingWebhookConfiguration": "mutatingwebhookconfigurations",
    }[obj["kind"]]
    namespace = obj["metadata"].get("namespace")
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
    return f"{path}/{obj['metadata']['name']}" if name else path


async def apply(rest: Rest, obj: Obj) -> Obj:
    """Server-side apply of any kind the chart renders."""
    headers = {"Content-Type": "application/apply-patch+yaml"}
    return await rest.request(
        "PATCH", f"{path_of(obj)}?fieldManager=helm-chart-test&force=true", obj, headers
    )


def missing(applied: Any, stored: Any, where: str = "") -> list[str]:
    """What of ``applied`` the stored object does not hold as given (the server adds defaults)."""
    if isinstance(applied, dict):
        if not isinstance(stored, dict):
            return [f"{where}: {stored!r}"]
        return [m for k, v in applied.items() for m in missing(v, stored.get(k), f"{where}.{k}")]
    if isinstance(applied, list):
        if not isinstance(stored, list) or len(stored) != len(applied):
            return [f"{where}: {stored!r}"]
        return [
            m
            for i, (a, s) in enumerate(zip(applied, stored, strict=True))
            for m in missing(a, s, f"{where}[{i}]")
        ]
    return [] if applied == stored else [f"{where}: {applied!r} != {stored!r}"]


async def test_everything_rendered_is_accepted_by_a_real_api_server(
    helm: Callable[..., str], real_clusters: dict[str, RealCluster]
) -> None:
    cluster = real_clusters["a"]
    run = uuid.uuid4().hex[:6]
    namespace, prefix = f"chart-{run}", f"isthmus-{run}"
    objs = [
        *render(helm, "home-all", namespace, "home", f"fullnameOverride={prefix}"),
        *render(helm, "member-all", namespace, "member", f"fullnameOverride={prefix}"),
        *render(helm, "home-default", namespace, "dev", f"fullnameOverride={prefix}-dev"),
        *render(helm, "member", namespace, "minimal", f"fullnameOverride={prefix}-min"),
    ]
    cluster_scoped = [o for o in objs if "namespace" not in o["metadata"]]
    assert {o["metadata"].get("namespace", namespace) for o in objs} == {namespace}
    assert all(o["metadata"]["name"].startswith(prefix) for o in cluster_scoped)
    assert len({(o["kind"], o["metadata"]["name"]) for o in objs}) == len(objs)
    await cluster.admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    try:
        for obj in objs:
            try:
                await apply(cluster.admin, obj)
            except ApiError as exc:
                raise AssertionError(f"{obj['kind']} {obj['metadata']['name']}: {exc}") from exc
            stored = await cluster.admin.request("GET", path_of(obj))
            assert not missing(obj, stored, obj["kind"]), missing(obj, stored, obj["kind"])
        assert {o["kind"] for o in objs} >= {
            "Deployment", "Service", "ServiceAccount", "PodDisruptionBudget", "Role", "RoleBinding",
            "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Secret", "MutatingWebhookConfiguration",
        }  # fmt: skip
    finally:
        for obj in cluster_scoped:
            with contextlib.suppress(ApiError):
                await cluster.admin.request("DELETE", path_of(obj))
        await cluster.admin.delete("Namespace", None, namespace)


# ---- the chart's RBAC, for real --------------------------------------------------------------------


class Views:
    """The latest MeshView, and waiting for one that satisfies a condition."""

    def __init__(self) -> None:
        self.view = MeshView.build((), ())
        self.changed = asyncio.Event()

    def on_view(self, view: MeshView) -> None:
        self.view = view
        self.changed.set()

    async def until(self, check: Callable[[MeshView], bool], timeout: float = 30.0) -> MeshView:
        async with asyncio.timeout(timeout):
            while not check(self.view):
                self.changed.clear()
                await self.changed.wait()
        return self.view


@contextlib.asynccontextmanager
async def running(*tasks: Callable[[], Any]) -> AsyncIterator[None]:
    started = [asyncio.create_task(t()) for t in tasks]
    try:
        yield
    finally:
        for task in started:
            task.cancel()
        for task in started:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def kubeconfig_text(cluster: RealCluster, token: str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "c",
                    "cluster": {
                        "server": cluster.url,
                        "certificate-authority-data": base64.b64encode(
                            cluster.pki.ca_cert.read_bytes()
                        ).decode(),
                    },
                }
            ],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }
    )


def refused(cluster: RealCluster, user: str) -> list[str]:
    return [
        f"{e['verb']} {e['requestURI']}: {e['responseStatus']['code']}"
        for e in cluster.audit()
        if e["user"]["username"] == user and e["responseStatus"]["code"] in (401, 403)
    ]


@pytest.fixture
def chart_cluster(real_cluster_factory: Callable[..., list[RealCluster]]) -> RealCluster:
    [cluster] = real_cluster_factory("chart")
    return cluster


async def test_the_charts_accounts_run_isthmus_and_are_refused_nothing_else(
    helm: Callable[..., str], chart_cluster: RealCluster, tmp_path: Path
) -> None:
    """One cluster, home and member at once (isthmus-system, the chart's default names): membership
    from a Secret read with the home account, discovery and ServiceImports with the member reader
    account, a review of the gateway account's token, the admin API's reviews."""
    cluster = chart_cluster
    admin = cluster.admin
    for definition in (SERVICE_IMPORT, with_status(copy.deepcopy(SERVICE_EXPORT)), TRAFFIC_SPLIT):
        await admin.create(definition)
    await admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM}})
    # helm install, as an operator does: the home chart with its defaults, the member chart.
    kube = ("--kubeconfig", str(cluster.admin_kubeconfig), "--namespace", SYSTEM)
    notes = helm("install", "isthmus", str(CHART), *kube)
    assert "DEVELOPMENT MESH ROOT" in notes
    member_files = [f"--values={f}" for f in VALUES["member"]]
    helm("install", "isthmus-member", str(CHART), *kube, *member_files)
    root = await admin.get("Secret", SYSTEM, "isthmus-dev-ca")
    assert root is not None
    helm("upgrade", "isthmus", str(CHART), *kube, "--set", "home.replicas=3")
    again = await admin.get("Secret", SYSTEM, "isthmus-dev-ca")
    assert again is not None
    assert again["data"] == root["data"], "an upgrade keeps the generated root"
    # A workload, exported.
    await admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    await admin.create(service_without_selector())
    await admin.create(endpoint_slice(["10.9.0.1"]))
    export = {
        "apiVersion": "multicluster.x-k8s.io/v1alpha1",
        "kind": "ServiceExport",
        "metadata": {"name": "web", "namespace": "shop"},
    }
    await until(lambda: admin.create(export), "the ServiceExport CRD to serve", retry_on=(ApiError,))

    # The chart's accounts' tokens (TokenRequest, as `isthmus cluster add` and the kubelet get them).
    reader_token = await admin.service_account_token(SYSTEM, "isthmus-reader", cluster.audience)
    home_token = await admin.service_account_token(SYSTEM, "isthmus", cluster.audience)
    gateway_token = await admin.service_account_token(SYSTEM, "isthmus-gateway", "isthmus")
    home_kubeconfig = tmp_path / "home.kubeconfig"
    home_kubeconfig.write_text(kubeconfig_text(cluster, home_token))
    member_secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "isthmus-member-east", "namespace": SYSTEM, "labels": {MEMBER_LABEL: "true"}},
        "data": {"east": base64.b64encode(kubeconfig_text(cluster, reader_token).encode()).decode()},
    }
    await admin.create(member_secret)
    # An operator bound to the chart's viewer role, for the admin API's reviews.
    await admin.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "ops", "namespace": "shop"}}
    )
    await admin.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "ops-viewer"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "isthmus-admin-viewer",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "ops", "namespace": "shop"}],
        }
    )
    ops_token = await admin.service_account_token("shop", "ops", cluster.audience)

    views = Views()
    aggregator = Aggregator(views.on_view, quiet=0.02, max_delay=0.2)
    secrets = SecretMembers(SYSTEM, kubeconfig=str(home_kubeconfig), timing=TIMING)
    members = Members(aggregator, secrets=secrets, timing=TIMING, poll_interval=0.2, service_imports=True)
    desired = Desired()

    def on_view(view: MeshView) -> None:  # what the app does with each view
        members.write_imports(desired(view))
        views.on_view(view)

    aggregator.on_view = on_view
    web = ServiceKey("shop", "web")
    async with running(aggregator.run, members.run):
        view = await views.until(lambda v: web in v.services and bool(v.services[web].endpoints), timeout=60)
        assert {e.locality.cluster for e in view.services[web].endpoints} == {"east"}

        async def imported() -> Obj | None:
            found = await admin.request(
                "GET", "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/shop/serviceimports"
            )
            return next((i for i in found["items"] if i["metadata"]["name"] == "web"), None)

        imp = await until(
            imported, "the ServiceImport isthmus writes", retry_on=(ApiError,), state=members.status
        )
        assert imp["metadata"]["labels"][MANAGED_BY] == "isthmus"
        # The gateway account's projected token is reviewed with the reader's credentials.
        review = await members.review("east", gateway_token, ("isthmus",))
        assert review.authenticated, review
        assert review.username == f"system:serviceaccount:{SYSTEM}:isthmus-gateway"
        assert members.status()["east"]["state"] == "synced", members.status()
        # --admin-kube-auth with the home account: the operator may read and may not drain.
        reviewer = Reviewer.home(str(home_kubeconfig))
        try:
            caller = await reviewer.review(ops_token, (cluster.audience,))
            assert caller.authenticated, caller
            args = (caller.username, caller.groups, caller.uid, caller.extra)
            assert (await reviewer.access(*args, "get", "/status")).allowed
            assert not (await reviewer.access(*args, "create", "/drain/east")).allowed
        finally:
            await reviewer.close()
        await asyncio.sleep(1)  # a few more watch rounds

    reader_user = f"system:serviceaccount:{SYSTEM}:isthmus-reader"
    home_user = f"system:serviceaccount:{SYSTEM}:isthmus"
    events = cluster.audit()
    assert {e["user"]["username"] for e in events} >= {reader_user, home_user}
    assert refused(cluster, reader_user) == []
    assert refused(cluster, home_user) == []
    writes = {
        (e["verb"], e["objectRef"].get("resource", ""))
        for e in events
        if e["user"]["username"] == reader_user and e["verb"] not in ("get", "list", "watch")
    }
    assert writes <= {
        ("create", "tokenreviews"),
        ("create", "serviceimports"),
        ("update", "serviceimports"),
        ("update", "serviceexports"),  # its status subresource
    }, writes
    assert ("create", "serviceimports") in writes
    assert ("create", "tokenreviews") in writes
    home_verbs = {
        (e["verb"], e["objectRef"].get("resource", ""), e["objectRef"].get("namespace", ""))
        for e in events
        if e["user"]["username"] == home_user
    }
    assert home_verbs <= {
        ("list", "secrets", SYSTEM),
        ("watch", "secrets", SYSTEM),
        ("get", "secrets", SYSTEM),
        ("create", "tokenreviews", ""),
        ("create", "subjectaccessreviews", ""),
    }, home_verbs

    # ... and the same accounts are refused what they do not need.
    reader = Rest(cluster.url, str(cluster.pki.ca_cert), reader_token)
    home = Rest(cluster.url, str(cluster.pki.ca_cert), home_token)
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "shop"}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "y", "namespace": "shop"}}
    for who in (reader, home):
        assert await forbidden(who, "GET", "/api/v1/secrets")
        assert await forbidden(who, "GET", "/api/v1/namespaces/shop/secrets")
        assert await forbidden(who, "POST", "/api/v1/namespaces/shop/configmaps", config_map)
        assert await forbidden(who, "POST", "/api/v1/namespaces/shop/services", service)
        assert await forbidden(
            who, "DELETE", "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/web-1"
        )
        assert await forbidden(who, "DELETE", "/api/v1/namespaces/shop/services/web")
    assert await forbidden(reader, "GET", f"/api/v1/namespaces/{SYSTEM}/secrets")
    assert await forbidden(
        reader, "PATCH", "/api/v1/namespaces/shop/services/web", {"metadata": {"labels": {"a": "b"}}}
    )
    # The home account: Secrets of its own namespace only, read-only; nothing of the workloads.
    listed = await home.request("GET", f"/api/v1/namespaces/{SYSTEM}/secrets")
    assert "isthmus-member-east" in {s["metadata"]["name"] for s in listed["items"]}
    assert await forbidden(
        home, "POST", f"/api/v1/namespaces/{SYSTEM}/secrets", {**member_secret, "metadata": {"name": "z"}}
    )
    assert await forbidden(home, "DELETE", f"/api/v1/namespaces/{SYSTEM}/secrets/isthmus-member-east")
    assert await forbidden(home, "GET", "/api/v1/namespaces/shop/services")
    assert await forbidden(home, "GET", "/api/v1/pods")
