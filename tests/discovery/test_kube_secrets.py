"""Member clusters declared by labelled Secrets in the control plane's own cluster (a fake API
server): added, rotated and removed live; refusals reported; the home API server's loss keeps the
known members."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_kube_members import FAST, Graph, addresses, clusters, endpoint_slice, mesh, service

from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.kube.members import Members
from isthmus.discovery.kube.secrets import MEMBER_LABEL, SecretMembers, credentials_of
from isthmus.discovery.model import ClusterState, MeshView
from kubeapi.kubeconfig import kubeconfig_dict, write_kubeconfig
from kubeapi.server import FakeKubeApi

__all__ = ["clusters", "mesh"]  # fixtures shared with test_kube_members

NS = "isthmus-system"


def kubeconfig_b64(api: FakeKubeApi, cluster: str, token: str | None = None, **kw: Any) -> str:
    text = yaml.safe_dump(kubeconfig_dict(api.url, token or api.token, cluster, **kw))
    return base64.b64encode(text.encode()).decode()


def secret(name: str, data: dict[str, str], labelled: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {MEMBER_LABEL: "true"} if labelled else {"app": "other"},
        },
        "type": "Opaque",
        "data": data,
    }


@pytest.fixture
async def home(tmp_path: Path) -> AsyncIterator[tuple[FakeKubeApi, Path]]:
    api = FakeKubeApi(bookmark_interval=0.5)
    await api.start()
    yield api, write_kubeconfig(tmp_path / "home.yaml", api.url, api.token, "home")
    await api.stop()


def seed(api: FakeKubeApi, address: str) -> None:
    api.create(service())
    api.create(endpoint_slice("web", [address]))


async def test_secrets_add_rotate_and_remove_member_clusters(
    clusters: dict[str, FakeKubeApi],
    mesh: tuple[Graph, Aggregator, Path],
    home: tuple[FakeKubeApi, Path],
) -> None:
    graph, aggregator, _ = mesh
    home_api, home_kubeconfig = home
    a, b, c = clusters["a"], clusters["b"], clusters["c"]
    for i, api in enumerate((a, b, c)):
        seed(api, f"127.0.{i + 1}.1")
    home_api.create(secret("members", {"a": kubeconfig_b64(a, "a"), "b": kubeconfig_b64(b, "b")}))
    # Not labelled: not a membership Secret, even though it holds a kubeconfig.
    home_api.create(secret("unrelated", {"c": kubeconfig_b64(c, "c")}, labelled=False))
    secrets = SecretMembers(NS, str(home_kubeconfig), FAST)
    members = Members(aggregator, timing=FAST, poll_interval=30.0, secrets=secrets)
    seen: list[set[tuple[str, str]]] = []
    original = graph.on_view

    def record(view: MeshView) -> None:
        seen.append(addresses(view))
        original(view)

    aggregator.on_view = record
    task = asyncio.create_task(members.run())
    try:
        # A poll interval of 30 s: everything below happens through the watch, not the poll.
        await graph.until(lambda v: addresses(v) == {("a", "127.0.1.1"), ("b", "127.0.2.1")})
        assert members.all_synced()
        assert members.status()["a"]["source"] == f"secret {NS}/members key a"

        # A second Secret adds a cluster; an exec kubeconfig in it is refused and reported.
        home_api.create(
            secret("more", {"c": kubeconfig_b64(c, "c"), "x": kubeconfig_b64(c, "x", exec_plugin=True)})
        )
        await graph.until(lambda v: ("c", "127.0.3.1") in addresses(v))
        assert members.status()["x"]["state"] == "refused"
        assert "exec plugin" in str(members.status()["x"]["detail"])
        assert "x" not in members.members

        # Rotation: a's Secret gets a new token; the new watcher takes over with no gap.
        a.add_token("rotated")
        old = members.members["a"].watcher
        home_api.update(
            secret("members", {"a": kubeconfig_b64(a, "a", "rotated"), "b": kubeconfig_b64(b, "b")})
        )

        async def switched() -> None:
            while members.members["a"].watcher is old:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(switched(), 15)
        a.rotate_token("rotated")  # the old token stops working: only the new watcher can see changes
        a.update(endpoint_slice("web", ["127.0.1.2"]))
        await graph.until(lambda v: ("a", "127.0.1.2") in addresses(v))
        has_a = [any(cluster == "a" for cluster, _ in view) for view in seen]
        assert all(has_a[has_a.index(True) :]), "cluster a's endpoints never vanished during the rotation"

        # Removing a key removes that cluster only; deleting a Secret removes its clusters.
        home_api.update(secret("members", {"a": kubeconfig_b64(a, "a", "rotated")}))
        view = await graph.until(lambda v: "b" not in v.clusters)
        assert {cl for cl, _ in addresses(view)} == {"a", "c"}
        home_api.delete("secrets", NS, "more")
        view = await graph.until(lambda v: "c" not in v.clusters)
        assert addresses(view) == {("a", "127.0.1.2")}
        assert "x" not in members.status()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_home_api_server_loss_keeps_known_members(
    clusters: dict[str, FakeKubeApi],
    mesh: tuple[Graph, Aggregator, Path],
    home: tuple[FakeKubeApi, Path],
) -> None:
    graph, aggregator, _ = mesh
    home_api, home_kubeconfig = home
    a, b = clusters["a"], clusters["b"]
    seed(a, "127.0.1.1")
    seed(b, "127.0.2.1")
    home_api.create(secret("members", {"a": kubeconfig_b64(a, "a")}))
    secrets = SecretMembers(NS, str(home_kubeconfig), FAST)
    members = Members(aggregator, timing=FAST, poll_interval=0.1, secrets=secrets)
    task = asyncio.create_task(members.run())
    try:
        await graph.until(lambda v: addresses(v) == {("a", "127.0.1.1")})
        await home_api.stop()

        async def reported() -> None:
            while not secrets.detail:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(reported(), 10)
        assert "a" in members.members, "losing the home API server removes no member cluster"
        a.update(endpoint_slice("web", ["127.0.1.5"]))
        await graph.until(lambda v: addresses(v) == {("a", "127.0.1.5")})
        assert graph.view.clusters["a"].state is ClusterState.SYNCED
        # While it was down, b was added: the home server comes back with history gone (410 -> relist).
        home_api.update(secret("members", {"a": kubeconfig_b64(a, "a"), "b": kubeconfig_b64(b, "b")}))
        await home_api.start()
        await graph.until(lambda v: addresses(v) == {("a", "127.0.1.5"), ("b", "127.0.2.1")})
        assert members.membership_status()["secrets"] == {
            "source": secrets.source,
            "synced": True,
            "detail": "",
        }
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_credentials_of_reports_bad_names_and_values() -> None:
    good = base64.b64encode(yaml.safe_dump(kubeconfig_dict("http://127.0.0.1:1", "t", "a")).encode()).decode()
    found = credentials_of(
        {
            f"{NS}/one": secret("one", {"a": good, "Bad_Name": good, "junk": "%%%not-base64"}),
            f"{NS}/two": secret("two", {"a": good}),  # a second declaration of a: the first Secret wins
        }
    )
    assert set(found.credentials) == {"a"}
    assert found.origins["a"] == f"secret {NS}/one key a"
    assert "not a valid cluster name" in found.errors["Bad_Name"]
    assert "not base64" in found.errors["junk"]
