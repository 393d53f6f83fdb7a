"""MCS ServiceImports written by isthmus into real kube-apiservers (discovery.kube.mcs), with the
roles of deploy/member-cluster/rbac.yaml: every service of the mesh gets its ServiceImport, with the
same clusterset IP in every cluster that has the CRD and the clusters that export it; a cluster
without the CRD, a namespace a cluster lacks and a ServiceImport that isthmus did not make are left
alone; a service that leaves the mesh loses its ServiceImports; and the API servers refuse none
of isthmus's requests, whose only writes are to ServiceImports."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_kube_members import Graph
from test_real_kube import READER_USER, TIMING, graph, refused, running  # noqa: F401 (graph: a fixture)

from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.kube.mcs import MANAGED_BY, Desired
from isthmus.discovery.kube.members import Members
from isthmus.discovery.model import MeshView, ServiceKey
from realkube import objects
from realkube.cluster import RealCluster
from realkube.crds import SERVICE_EXPORT, SERVICE_IMPORT, with_status
from realkube.fixtures import reader_kubeconfig
from realkube.rest import ApiError
from realkube.wait import until as waiting

pytestmark = pytest.mark.realkube


async def _equal(got: Any, want: Any) -> bool:
    return bool(await got == want)


def service(namespace: str, name: str) -> dict[str, Any]:
    return objects.service(
        name, namespace, [{"name": "http", "port": 80, "targetPort": 8080}, {"name": "tcp-db", "port": 5432}]
    )


async def until(check: Callable[[], Any], what: str, status: Callable[[], object] | None = None) -> Any:
    """realkube.wait.until, where a new CRD's first answers (404, 429) mean "not yet"."""
    return await waiting(check, what, retry_on=(ApiError,), state=status)


async def test_service_imports_in_every_cluster_with_the_crd_and_nothing_else_touched(
    real_cluster_factory: Callable[..., list[RealCluster]],
    graph: tuple[Graph, Aggregator],  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    g, aggregator = graph
    ia, ib, ic = real_cluster_factory("ia", "ib", "ic")
    for cluster in (ia, ib):
        await cluster.admin.create(SERVICE_IMPORT)
        await cluster.admin.create(with_status(copy.deepcopy(SERVICE_EXPORT)))
    for cluster in (ia, ib, ic):
        await cluster.admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    await ia.admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "only-a"}})
    await ia.admin.create(service("shop", "web"))
    other = service("shop", "web")  # ib exports web with one more port: a conflict, ia's is older
    other["spec"]["ports"].append({"name": "http-admin", "port": 9000})
    await asyncio.sleep(1.1)  # creation times have one-second resolution
    await ib.admin.create(other)
    await ia.admin.create(service("shop", "api"))
    await ia.admin.create(service("only-a", "db"))
    # In ib, a ServiceImport named like a service of the mesh that another MCS implementation made.
    foreign = {
        "apiVersion": "multicluster.x-k8s.io/v1alpha1",
        "kind": "ServiceImport",
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {"type": "ClusterSetIP", "ips": ["10.0.0.99"], "ports": [{"port": 1, "protocol": "TCP"}]},
    }
    await until(lambda: ib.admin.create(foreign), "ib's ServiceImport CRD to serve")
    for cluster, name in ((ia, "web"), (ib, "web"), (ia, "ghost")):
        export = {
            "apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceExport",
            "metadata": {"name": name, "namespace": "shop"},
        }
        await until(lambda c=cluster, e=export: c.admin.create(e), f"{cluster.name}'s ServiceExport CRD")
    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    for cluster in (ia, ib, ic):
        await reader_kubeconfig(cluster, directory / f"{cluster.name}.yaml")
    audit_start = {c.name: len(c.audit()) for c in (ia, ib, ic)}
    desired = Desired()
    views: list[MeshView] = []
    members = Members(aggregator, directory=directory, timing=TIMING, poll_interval=0.2, service_imports=True)
    inner = g.on_view

    def on_view(view: MeshView) -> None:  # what the app does with each view
        views.append(view)
        members.write_imports(desired(view))
        inner(view)

    aggregator.on_view = on_view
    web = ServiceKey("shop", "web")
    async with running(members):
        view = await g.until(lambda v: web in v.services and len(v.services[web].addresses) == 2, timeout=60)
        vip = view.services[web].vip
        assert vip.startswith("240.240."), vip
        for cluster in (ia, ib):

            async def both_exporters(c: RealCluster = cluster) -> dict[str, Any] | None:
                found = await c.admin.get("ServiceImport", "shop", "web")
                return found if found and len(found.get("status", {}).get("clusters", [])) == 2 else None

            imported = await until(both_exporters, f"{cluster.name}'s import", status=members.status)
            assert imported["metadata"]["labels"][MANAGED_BY] == "isthmus"
            assert imported["spec"]["type"] == "ClusterSetIP"
            assert imported["spec"]["ips"] == [vip]  # one address in every cluster
            assert imported["spec"]["ports"] == [
                {"name": "http", "protocol": "TCP", "port": 80, "appProtocol": "http"},
                {"name": "tcp-db", "protocol": "TCP", "port": 5432},
            ]
            assert imported["status"] == {"clusters": [{"cluster": "ia"}, {"cluster": "ib"}]}
        db = await until(lambda: ia.admin.get("ServiceImport", "only-a", "db"), "db's import")
        assert db["spec"]["ips"]
        untouched = await ib.admin.get("ServiceImport", "shop", "api")
        assert untouched is not None
        assert untouched["spec"]["ips"] == ["10.0.0.99"]
        assert MANAGED_BY not in (untouched["metadata"].get("labels") or {})

        async def reported() -> bool:
            status = members.status()
            return (
                status["ib"]["service_imports"]["skipped_namespaces"] == ["only-a"]  # type: ignore[index]
                and status["ic"]["service_imports"]["installed"] is False  # type: ignore[index]
            )

        await until(reported, "the writers' status")

        def conditions(obj: dict[str, Any] | None) -> dict[str, tuple[str, str]]:
            found = ((obj or {}).get("status") or {}).get("conditions") or []
            return {c["type"]: (c["status"], c["reason"]) for c in found}

        async def export_status(cluster: RealCluster, name: str) -> dict[str, tuple[str, str]]:
            return conditions(await cluster.admin.get("ServiceExport", "shop", name))

        valid = {"Valid": ("True", "Exported"), "Conflict": ("False", "NoConflict")}
        assert await until(lambda: _equal(export_status(ia, "web"), valid), "ia's export conditions")
        conflict = {"Valid": ("True", "Exported"), "Conflict": ("True", "PortConflict")}
        assert await until(lambda: _equal(export_status(ib, "web"), conflict), "ib's export conflict")
        ghost = {"Valid": ("False", "NoService")}
        assert await until(lambda: _equal(export_status(ia, "ghost"), ghost), "the ghost's export")
        assert members.status()["ia"]["service_imports"]["error"] == ""  # type: ignore[index]
        # web leaves the mesh in both clusters: its imports go; the foreign one stays.
        for cluster in (ia, ib):
            await cluster.admin.delete("Service", "shop", "web")

        async def gone() -> bool:
            return all([await c.admin.get("ServiceImport", "shop", "web") is None for c in (ia, ib)])

        await until(gone, "web's imports to be deleted")
        assert await ib.admin.get("ServiceImport", "shop", "api") is not None
    writes_in: dict[str, set[tuple[str, str, str]]] = {}
    for cluster in (ia, ib, ic):
        assert refused(cluster, audit_start[cluster.name]) == [], f"cluster {cluster.name} refused isthmus"
        writes = writes_in[cluster.name] = {
            (e["verb"], e["objectRef"]["resource"], e["objectRef"].get("subresource", ""))
            for e in cluster.audit()[audit_start[cluster.name] :]
            if e["user"]["username"] == READER_USER and e["verb"] not in ("get", "list", "watch")
        }
        assert {(resource, sub) for _, resource, sub in writes} <= {
            ("serviceimports", ""),
            ("serviceimports", "status"),
            ("serviceexports", "status"),
        }, writes
    assert ("create", "serviceimports", "") in writes_in["ia"], writes_in
    assert ("update", "serviceimports", "status") in writes_in["ia"], writes_in  # status: its subresource
    assert ("delete", "serviceimports", "") in writes_in["ib"], writes_in
    assert ("update", "serviceexports", "status") in writes_in["ib"], writes_in
    assert writes_in["ic"] == set(), writes_in
