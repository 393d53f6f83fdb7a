"""Mesh routes, feature by feature: a mesh file's Gateway API routes (or TrafficSplits) in
tests/golden/routes/FEATURE.yaml, added to one base mesh, and the virtual hosts RDS gives the
services they are attached to, for a caller in each namespace, pinned in FEATURE.json
(regenerate with `make golden` and review the diff)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format

from goldens import golden
from isthmus.discovery.file import parse_mesh
from isthmus.discovery.model import Locality
from isthmus.xds import types
from isthmus.xds.generate import GENERATORS
from isthmus.xds.proxy import Proxy, Role

FEATURES = Path(__file__).parent.parent / "golden" / "routes"

BASE = """
clusters: [{name: a, region: r1, zone: z1}, {name: b, region: r1, zone: z2}, {name: c, region: r2, zone: z9}]
services:
  - name: web
    namespace: shop
    ports: [{name: http, port: 80}, {name: admin, port: 8081}]
    endpoints: [{cluster: a, address: 127.0.1.1}, {cluster: b, address: 127.0.2.1}]
  - name: web-v1
    namespace: shop
    ports: [{name: http, port: 80}]
    endpoints: [{cluster: a, address: 127.0.1.2}, {cluster: b, address: 127.0.2.2}]
  - name: web-v2
    namespace: shop
    ports: [{name: http, port: 80}]
    endpoints: [{cluster: c, address: 127.0.3.2}]
  - name: api
    namespace: shop
    ports: [{name: grpc, port: 9090, protocol: grpc}]
    endpoints: [{cluster: a, address: 127.0.1.3}]
  - name: api-v2
    namespace: shop
    ports: [{name: grpc, port: 9090, protocol: grpc}]
    endpoints: [{cluster: c, address: 127.0.3.3}]
  - name: web
    namespace: blog
    ports: [{name: http, port: 80}]
    endpoints: [{cluster: c, address: 127.0.3.9}]
"""


def caller(namespace: str) -> Proxy:
    return Proxy(
        f"client-{namespace}", Role.SIDECAR, namespace, "client", "client", Locality("r1", "z1", "a")
    )


def render(feature: str) -> dict[str, object]:
    mesh = yaml.safe_load(BASE)
    mesh.update(yaml.safe_load((FEATURES / f"{feature}.yaml").read_text()))
    view = parse_mesh(yaml.safe_dump(mesh), f"{feature}.yaml")
    routed = {f"{key.name}.{key.namespace}.svc.cluster.local" for key in view.routes}
    out: dict[str, object] = {}
    for namespace in ("shop", "blog"):
        [config] = GENERATORS[types.ROUTE](view, caller(namespace)).values()
        out[f"caller in {namespace}"] = {
            vh.name: json_format.MessageToDict(vh, preserving_proto_field_name=True)["routes"]
            for vh in config.virtual_hosts
            if vh.name.rsplit(":", 1)[0] in routed
        }
    return out


@pytest.mark.parametrize("feature", sorted(p.stem for p in FEATURES.glob("*.yaml")))
def test_route_feature(feature: str) -> None:
    got = render(feature)
    path = FEATURES / f"{feature}.json"
    assert got == golden(path, got), f"{feature} differs from {path}; if intended, run `make golden`"
