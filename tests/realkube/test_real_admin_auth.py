"""The admin API decided by a real home cluster's RBAC (`isthmus serve --admin-kube-auth`): the
caller's token verified by a TokenReview, its request by a SubjectAccessReview of the path, with
the roles of deploy/home-cluster/admin-rbac.yaml; isthmus asks with an account that may do nothing
else; `isthmus drain --kubeconfig-token` sends the kubeconfig user's token."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from isthmus import cli
from isthmus.app import ControlPlane
from isthmus.settings import ServeSettings
from realkube.binaries import ROOT
from realkube.cluster import RealCluster, free_port

pytestmark = pytest.mark.realkube

ADMIN_RBAC = ROOT / "deploy" / "home-cluster" / "admin-rbac.yaml"


async def token_of(cluster: RealCluster, namespace: str, account: str) -> str:
    return await cluster.admin.service_account_token(namespace, account, cluster.audience, seconds=600)


@pytest.fixture
async def home(
    real_clusters: dict[str, RealCluster], namespace: str, tmp_path: Path
) -> AsyncIterator[tuple[RealCluster, str]]:
    """Cluster a as the home cluster, its admin roles installed; operator (drainer), viewer and
    nobody service accounts in ``namespace``; isthmus serving its admin API with --admin-kube-auth
    and the isthmus account's kubeconfig. Yields the cluster and the admin address."""
    cluster = real_clusters["a"]
    await cluster.admin.apply_all([doc for doc in yaml.safe_load_all(ADMIN_RBAC.read_text()) if doc])
    bindings = {"operator": "isthmus-admin-drainer", "viewer": "isthmus-admin-viewer"}
    for account in ("operator", "viewer", "nobody"):
        await cluster.admin.apply(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": account, "namespace": namespace},
            }
        )
    for account, role in bindings.items():
        await cluster.admin.apply(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": f"{namespace}-{account}"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
            }
        )
    kubeconfig = cluster.kubeconfig(
        tmp_path / "home.yaml", await token_of(cluster, "isthmus-system", "isthmus")
    )
    admin_address = f"127.0.0.1:{free_port()}"
    settings = ServeSettings(
        xds_address=f"127.0.0.1:{free_port()}",
        admin_address=admin_address,
        admin_kube_auth=True,
        home_kubeconfig=str(kubeconfig),
        mtls=False,
    )
    plane = ControlPlane(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(plane.run(stop))
    try:
        await asyncio.wait_for(plane.started.wait(), 10)
        yield cluster, admin_address
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        for account in bindings:
            await cluster.admin.delete("ClusterRoleBinding", None, f"{namespace}-{account}")


async def call(address: str, method: str, path: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"http://{address}{path}", headers=headers) as resp,
    ):
        if resp.content_type != "application/json":  # /metrics: Prometheus text
            return resp.status, await resp.text()
        return resp.status, await resp.json()


async def test_the_home_clusters_rbac_decides_who_may_drain(
    home: tuple[RealCluster, str], namespace: str
) -> None:
    cluster, address = home
    audit_start = len(cluster.audit())
    operator, viewer, nobody = [
        await token_of(cluster, namespace, a) for a in ("operator", "viewer", "nobody")
    ]
    assert (await call(address, "GET", "/readyz"))[0] in (200, 503)  # probes: no token needed
    status, body = await call(address, "POST", "/drain/east")
    assert status == 401, body
    assert (await call(address, "POST", "/drain/east", "garbage-token"))[0] == 401
    status, body = await call(address, "POST", "/drain/east", nobody)
    assert status == 403, body
    assert body["error"].startswith(f"system:serviceaccount:{namespace}:nobody may not create /drain/east")
    assert (await call(address, "GET", "/drain", nobody))[0] == 403
    assert (await call(address, "GET", "/drain", viewer))[0] == 200
    # The viewer role reads the status pages and the metrics too; nobody does not.
    for page in ("/debug/syncz", "/debug/clusters", "/metrics"):
        assert (await call(address, "GET", page, viewer))[0] == 200, page
        assert (await call(address, "GET", page, nobody))[0] == 403, page
    status, body = await call(address, "POST", "/drain/east", viewer)
    assert status == 403, body
    # The operator may: the built-in example mesh has member cluster east.
    status, body = await call(address, "POST", "/drain/east", operator)
    assert status == 202, body
    assert (await call(address, "POST", "/undrain/east", operator))[0] == 202
    # isthmus's own account asked, and did nothing else.
    asked = [
        e
        for e in cluster.audit()[audit_start:]
        if e["user"]["username"] == "system:serviceaccount:isthmus-system:isthmus"
    ]
    resources = {(e["objectRef"]["resource"], e["verb"]) for e in asked}
    assert resources == {("tokenreviews", "create"), ("subjectaccessreviews", "create")}, resources
    assert all(e["responseStatus"]["code"] == 201 for e in asked)


async def test_isthmus_drain_sends_the_kubeconfig_users_token(
    home: tuple[RealCluster, str], namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster, address = home
    for account in ("operator", "nobody"):
        cluster.kubeconfig(tmp_path / f"{account}.yaml", await token_of(cluster, namespace, account))
    argv = ["drain", "east", "--no-wait", "--admin-address", address, "--kubeconfig-token"]
    assert await asyncio.to_thread(cli.main, [*argv, str(tmp_path / "nobody.yaml")]) == 1
    assert "may not create /drain/east" in capsys.readouterr().err
    assert await asyncio.to_thread(cli.main, [*argv, str(tmp_path / "operator.yaml")]) == 0
