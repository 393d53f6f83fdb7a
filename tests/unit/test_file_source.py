"""The YAML file source: parsing into the model, clear errors, and the watch loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from isthmus.discovery.file import MeshFileError, example_mesh_text, file_stat, parse_mesh, watch_mesh_file
from isthmus.discovery.model import Health, MeshView, Protocol, ServiceKey

MESH = """
clusters:
  - {name: a, region: r1, zone: z1}
  - {name: b, region: r2, zone: z2, gateway: {address: 127.0.0.9}}
services:
  - name: web
    namespace: shop
    ports: [{name: http, port: 80, target_port: 8080}, {name: grpc, port: 9090, protocol: grpc}]
    endpoints:
      - {cluster: a, address: 127.0.1.1}
      - {cluster: b, address: 127.0.2.1, zone: z3, health: unhealthy, ports: {http: 18080}}
"""


def test_parse_mesh_model() -> None:
    view = parse_mesh(MESH)
    web = view.services[ServiceKey("shop", "web")]
    assert [p.protocol for p in web.ports] == [Protocol.HTTP, Protocol.GRPC]
    assert web.clusters == {"a", "b"}
    by_addr = {e.address: e for e in web.endpoints}
    a, b = by_addr["127.0.1.1"], by_addr["127.0.2.1"]
    assert (a.locality.region, a.locality.zone, a.locality.cluster) == ("r1", "z1", "a")
    assert (b.locality.zone, b.health) == ("z3", Health.UNHEALTHY)
    assert a.port_for(web.ports[0]) == 8080
    assert b.port_for(web.ports[0]) == 18080
    assert b.port_for(web.ports[1]) == 9090
    gateway = view.clusters["b"].gateway
    assert gateway is not None
    assert gateway.port == 15443


def test_version_is_content_addressed() -> None:
    assert parse_mesh(MESH).version == parse_mesh(MESH).version
    assert parse_mesh(MESH).version != parse_mesh(MESH.replace("127.0.1.1", "127.0.1.2")).version
    # Endpoint order does not matter.
    lines = MESH.splitlines()
    swapped = "\n".join([*lines[:-2], lines[-1], lines[-2]])
    assert parse_mesh(swapped).version == parse_mesh(MESH).version


def test_example_mesh_is_valid_and_on_loopback() -> None:
    view = parse_mesh(example_mesh_text())
    assert len(view.services) >= 2
    assert len(view.clusters) >= 2
    for service in view.services.values():
        for ep in service.endpoints:
            assert ep.address.startswith("127."), "the built-in mesh must never point off the machine"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "services: [{name: x, ports: [{port: 80}], endpoints: [{cluster: nope, address: 1}]}]",
            "unknown cluster",
        ),
        ("services: [{name: x, ports: []}]", "at least one port"),
        ("services: [{name: x, ports: [{port: 70000}]}]", "not a port number"),
        ("services: [{name: x, ports: [{port: 80, protocol: carrier-pigeon}]}]", "is not one of"),
        ("clusters: [{name: a}, {name: a}]", "duplicate cluster"),
        ("services: [{ports: [{port: 80}]}]", "missing required field 'name'"),
        ("services: {name: x}", "expected a list"),
        ("services: [unclosed", "not valid YAML"),
    ],
)
def test_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(MeshFileError, match=message):
        parse_mesh(text, "mesh.yaml")


async def test_watch_reloads_and_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH)
    views: asyncio.Queue[MeshView] = asyncio.Queue()
    task = asyncio.create_task(watch_mesh_file(path, views.put_nowait, interval=0.05))
    try:
        first = await asyncio.wait_for(views.get(), 5)
        path.write_text("services: [broken")  # rejected: no new view
        await asyncio.sleep(0.3)
        assert views.empty()
        path.write_text(MESH.replace("127.0.1.1", "127.0.1.7"))
        second = await asyncio.wait_for(views.get(), 5)
    finally:
        task.cancel()
    assert first.version != second.version
    web = second.services[ServiceKey("shop", "web")]
    assert "127.0.1.7" in {e.address for e in web.endpoints}


async def test_watch_does_not_reload_the_version_already_loaded(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH)
    views: asyncio.Queue[MeshView] = asyncio.Queue()
    task = asyncio.create_task(watch_mesh_file(path, views.put_nowait, 0.05, loaded=file_stat(path)))
    try:
        await asyncio.sleep(0.3)
        assert views.empty(), "the version loaded before the watch started was parsed again"
        path.write_text(MESH.replace("127.0.1.1", "127.0.1.8"))
        changed = await asyncio.wait_for(views.get(), 5)
    finally:
        task.cancel()
    assert "127.0.1.8" in {e.address for e in changed.services[ServiceKey("shop", "web")].endpoints}
