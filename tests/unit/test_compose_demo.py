"""The docker-compose demo cannot run here (no Docker engine); this checks what can be checked: its
mesh parses, and the proxies it starts get the configuration the demo relies on."""

from __future__ import annotations

from pathlib import Path

import yaml

from isthmus.discovery.file import load_mesh_file
from isthmus.discovery.model import Locality
from isthmus.xds import types
from isthmus.xds.generate import GENERATORS
from isthmus.xds.generate.identity import MeshIdentity
from isthmus.xds.proxy import Proxy, Role

ROOT = Path(__file__).resolve().parents[2]
MTLS = MeshIdentity("cluster.local", "ROOT-PEM")


def test_compose_demo_mesh_gives_the_demo_its_paths() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "/src/demo/compose-mesh.yaml" in compose["services"]["isthmus"]["command"]
    view = load_mesh_file(ROOT / "demo" / "compose-mesh.yaml")
    client = Proxy(
        "client", Role.SIDECAR, "shop", "client", "client", Locality("r1", "r1-a", "east"), "0.0.0.0"
    )
    eds = GENERATORS[types.ENDPOINT](view, client, MTLS)
    web = {
        (le.priority, lb.endpoint.address.socket_address.address)
        for le in eds["outbound|80||web.shop.svc.cluster.local"].endpoints
        for lb in le.lb_endpoints
    }
    assert web == {(0, "10.1.0.10"), (1, "10.250.0.12")}, "east's web first, west's through its gateway"
    api = eds["outbound|80||api.shop.svc.cluster.local"].endpoints
    assert [lb.endpoint.address.socket_address.address for le in api for lb in le.lb_endpoints] == [
        "10.250.0.12"
    ]
    gateway = Proxy(
        "gw",
        Role.GATEWAY,
        "isthmus-system",
        "eastwest",
        "eastwest",
        Locality("r2", "r2-a", "west"),
        "0.0.0.0",
    )
    listener = GENERATORS[types.LISTENER](view, gateway, MTLS)["eastwest_15443"]
    assert sorted(c.name for c in listener.filter_chains) == [
        "outbound_.80_._.api.shop.svc.cluster.local",
        "outbound_.80_._.web.shop.svc.cluster.local",
    ]
