"""One member cluster's API server, fake or real, behind the same few async operations, so that a
test of a higher tier runs on either: write objects, give isthmus a kubeconfig, take the API server
down (its cluster's workloads keep running; writes still land, as they would through another API
server of an HA control plane) and bring it back.

* ``FakeMember``: a FakeKubeApi (tests/kubeapi); admin token; writes go straight to its store.
* ``RealMember``: a RealCluster; isthmus gets a TokenRequest token of the least-privilege reader
  (deploy/member-cluster/rbac.yaml); while the API server is down, writes go through a second API
  server on the same etcd.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from kubeapi.kubeconfig import write_kubeconfig
from kubeapi.server import FakeKubeApi
from realkube.cluster import RealCluster
from realkube.fixtures import reader_kubeconfig
from realkube.rest import Rest


class MemberApi(Protocol):
    name: str

    async def prepare(self, namespaces: tuple[str, ...]) -> None: ...
    async def apply(self, obj: dict[str, Any]) -> None: ...
    async def kubeconfig(self, path: Path) -> Path: ...
    async def stop(self) -> None: ...
    async def start(self) -> None: ...


class FakeMember:
    def __init__(self, name: str, api: FakeKubeApi) -> None:
        self.name = name
        self.api = api

    async def prepare(self, namespaces: tuple[str, ...]) -> None:
        await self.api.start()

    async def apply(self, obj: dict[str, Any]) -> None:
        self.api.apply(obj)

    async def kubeconfig(self, path: Path) -> Path:
        return write_kubeconfig(path, self.api.url, self.api.token, self.name)

    async def stop(self) -> None:
        await self.api.stop()

    async def start(self) -> None:
        await self.api.start()


class RealMember:
    def __init__(self, name: str, cluster: RealCluster) -> None:
        self.name = name
        self.cluster = cluster
        self._writer: Rest = cluster.admin

    async def prepare(self, namespaces: tuple[str, ...]) -> None:
        for namespace in namespaces:
            await self.cluster.admin.apply(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
            )

    async def apply(self, obj: dict[str, Any]) -> None:
        await self._writer.apply(obj)

    async def kubeconfig(self, path: Path) -> Path:
        return await reader_kubeconfig(self.cluster, path)

    async def stop(self) -> None:
        _, spare = self.cluster.spare_apiserver()
        await spare.wait_ready()
        self.cluster.stop_apiserver(kill=True)
        self._writer = spare

    async def start(self) -> None:
        self.cluster.start_apiserver()
        await self.cluster.wait_ready()
        self._writer = self.cluster.admin
