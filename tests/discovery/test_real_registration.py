"""``isthmus cluster add | list | remove`` against two real API servers (a home cluster and a member):
the member gets the least-privilege account of deploy/member-cluster/rbac.yaml and a token for it,
the home cluster a labelled member Secret holding only that token, which discovery then uses to
sync the member; ``--dry-run`` prints the Secret and writes nothing home; a kubeconfig with an exec
plugin and an unreachable cluster are refused with a clear message and nothing made; ``remove``
undoes it."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_kube_members import Graph
from test_real_kube import TIMING, graph, running  # noqa: F401 (graph: a fixture)

from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.kube.members import Members
from isthmus.discovery.kube.secrets import MEMBER_LABEL, SecretMembers
from isthmus.discovery.model import ServiceKey
from realkube.cluster import RealCluster
from realkube.rest import Rest

pytestmark = pytest.mark.realkube

HOME_NS = "isthmus-system"


def changed_kubeconfig(source: str, target: Path, change: Callable[[dict[str, Any]], None]) -> str:
    document = yaml.safe_load(Path(source).read_text())
    change(document)
    target.write_text(yaml.safe_dump(document))
    return str(target)


def isthmus(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isthmus.cli", *argv], capture_output=True, text=True, timeout=120, check=False
    )


async def test_cluster_add_list_remove_with_two_real_api_servers(
    real_cluster_factory: Callable[..., list[RealCluster]],
    graph: tuple[Graph, Aggregator],  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    g, aggregator = graph
    home, member = real_cluster_factory("hm", "mb")
    await home.admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": HOME_NS}})
    await member.admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    await member.admin.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 80}]},
        }
    )
    home_config = str(home.admin_kubeconfig)
    member_config = str(member.admin_kubeconfig)

    # Refused before anything is made: an exec plugin, an unreachable server.
    exec_file = changed_kubeconfig(
        home_config,
        tmp_path / "exec.yaml",
        lambda d: d["users"][0].update(
            user={"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "true"}}
        ),
    )
    refused = isthmus("cluster", "add", "other", "--kubeconfig", exec_file, "--home-kubeconfig", home_config)
    assert refused.returncode == 2, refused.stderr
    assert "exec plugin" in refused.stderr
    assert "Nothing was changed" in refused.stderr
    far = changed_kubeconfig(
        home_config,
        tmp_path / "far.yaml",
        lambda d: d["clusters"][0]["cluster"].update(server="https://127.0.0.1:1"),
    )
    refused = isthmus("cluster", "add", "other", "--kubeconfig", far, "--home-kubeconfig", home_config)
    assert refused.returncode == 2, refused.stderr
    assert "Nothing was changed" in refused.stderr, refused.stderr
    assert await home.admin.get("ServiceAccount", HOME_NS, "isthmus-reader") is None  # hm was the target

    # --dry-run: the member's account is made, the Secret printed, nothing written home.
    dry = isthmus(
        "cluster", "add", "mb", "--kubeconfig", member_config, "--home-kubeconfig", home_config, "--dry-run"
    )
    assert dry.returncode == 0, dry.stderr
    printed = yaml.safe_load(dry.stdout)
    assert printed["metadata"] == {
        "name": "isthmus-member-mb",
        "namespace": HOME_NS,
        "labels": {MEMBER_LABEL: "true"},
    }
    assert await home.admin.get("Secret", HOME_NS, "isthmus-member-mb") is None

    added = isthmus("cluster", "add", "mb", "--kubeconfig", member_config, "--home-kubeconfig", home_config)
    assert added.returncode == 0, added.stderr
    secret = await home.admin.get("Secret", HOME_NS, "isthmus-member-mb")
    assert secret is not None
    assert secret["metadata"]["labels"] == {MEMBER_LABEL: "true"}
    kubeconfig = yaml.safe_load(base64.b64decode(secret["data"]["mb"]))
    (user,) = kubeconfig["users"]
    assert set(user["user"]) == {"token"}  # nothing of the operator's: no client cert, no exec
    assert user["user"]["token"] != member.admin_token
    assert kubeconfig["clusters"][0]["cluster"]["server"] == member.url
    # The token is the reader's, and the reader may read but not write.
    reader = Rest(member.url, str(member.pki.ca_cert), user["user"]["token"])
    who = await reader.request(
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    assert who["status"]["userInfo"]["username"] == "system:serviceaccount:isthmus-system:isthmus-reader"
    assert (await reader.request("GET", "/api/v1/namespaces/shop/services"))["items"]

    # Discovery syncs the member from the home cluster's Secret.
    secrets = SecretMembers(HOME_NS, kubeconfig=home_config, timing=TIMING)
    members = Members(aggregator, secrets=secrets, timing=TIMING, poll_interval=0.2)
    async with running(members):
        view = await g.until(lambda v: ServiceKey("shop", "web") in v.services, timeout=60)
        assert view.services[ServiceKey("shop", "web")].addresses[0][0] == "mb"

    listed = isthmus("cluster", "list", "--home-kubeconfig", home_config, "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == [{"name": "mb", "source": f"secret {HOME_NS}/isthmus-member-mb"}]
    again = isthmus("cluster", "add", "mb", "--kubeconfig", member_config, "--home-kubeconfig", home_config)
    assert again.returncode == 0, again.stderr  # idempotent

    removed = isthmus(
        "cluster", "remove", "mb", "--kubeconfig", member_config, "--home-kubeconfig", home_config
    )
    assert removed.returncode == 0, removed.stderr
    assert await home.admin.get("Secret", HOME_NS, "isthmus-member-mb") is None
    assert await member.admin.get("Secret", HOME_NS, "isthmus-reader-token") is None
    assert await member.admin.get("ClusterRoleBinding", None, "isthmus-reader") is None
    gone = isthmus("cluster", "remove", "mb", "--home-kubeconfig", home_config)
    assert gone.returncode == 2
    assert "no member cluster mb" in gone.stderr
