"""An injected sidecar's locality comes from its node (app.ControlPlane._locate with
Members.node_locality): its bootstrap names the node ($(NODE_NAME)), not a region or zone, since
the pod is not scheduled when it is injected. The Node's topology labels decide; a node without
them takes its member cluster's region and zone; an unknown node or a bootstrap that names its own
locality is left as it is."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from isthmus.app import ControlPlane
from isthmus.discovery.model import Locality
from isthmus.settings import ServeSettings
from isthmus.xds.proxy import Proxy, Role
from kubeapi.kubeconfig import write_kubeconfig
from kubeapi.server import DEFAULT_TOKEN, FakeKubeApi


def node(name: str, **labels: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def sidecar(node_name: str, region: str = "", zone: str = "") -> Proxy:
    return Proxy(
        "sidecar~web-1.shop~east",
        Role.SIDECAR,
        "shop",
        "web",
        "web",
        Locality(region, zone, "east"),
        node_name=node_name,
    )


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    api = FakeKubeApi()
    api.create(node("n1", **{"topology.kubernetes.io/region": "eu", "topology.kubernetes.io/zone": "eu-1a"}))
    api.create(node("n2"))
    kubeconfig = write_kubeconfig(tmp_path / "east.yaml", await api.start(), DEFAULT_TOKEN, "east")
    settings = ServeSettings(
        xds_address="127.0.0.1:0",
        admin_address="127.0.0.1:0",
        clusters=(("east", Path(kubeconfig)),),
        insecure_unauthenticated_xds=True,
        mtls=False,
    )
    plane = ControlPlane(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(plane.run(stop))
    try:
        assert plane.members is not None
        for _ in range(200):
            if "east" in plane.members.members and plane.members.all_synced():
                break
            await asyncio.sleep(0.05)
        yield plane
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        await api.stop()


async def test_a_sidecar_is_placed_where_its_node_is(plane: ControlPlane) -> None:
    assert plane.ads.locate is not None
    assert plane.ads.locate(sidecar("n1")).locality == Locality("eu", "eu-1a", "east")
    assert plane.ads.locate(sidecar("n2")).locality == Locality(
        "", "", "east"
    )  # no labels, no cluster default
    assert plane.ads.locate(sidecar("gone")).locality == Locality("", "", "east")
    assert plane.ads.locate(sidecar("n1", "us", "us-2")).locality == Locality("us", "us-2", "east")
    assert plane.ads.locate(sidecar("")).locality == Locality("", "", "east")
