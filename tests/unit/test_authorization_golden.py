"""Authorization, feature by feature: a mesh file's authorization policies in
tests/golden/authorization/FEATURE.yaml, added to one base mesh, and the filters of the inbound
listener of a shop/web sidecar (service account web), per port, pinned in FEATURE.json
(regenerate with `make golden` and review the diff). The semantics are asserted on their own in
tests/unit/test_authorization.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from test_generators import TEST_IDENTITY

from goldens import golden
from isthmus.discovery.file import parse_mesh
from isthmus.discovery.model import Locality
from isthmus.xds import naming, types
from isthmus.xds.generate import GENERATORS
from isthmus.xds.proxy import Proxy, Role

FEATURES = Path(__file__).parent.parent / "golden" / "authorization"

BASE = """
clusters: [{name: a, region: r1, zone: z1}, {name: b, region: r1, zone: z2}]
services:
  - name: web
    namespace: shop
    ports: [{name: http, port: 80, target_port: 8080}, {name: pg, port: 5432, protocol: tcp}]
    endpoints:
      - {cluster: a, address: 10.1.0.1, sidecar_port: 15006, service_account: web}
      - {cluster: b, address: 10.2.0.1, sidecar_port: 15006, service_account: web}
"""

# The generators' test identity (fixed strings for PEM), as web's workload.
assert TEST_IDENTITY.workload is not None
IDENTITY = replace(
    TEST_IDENTITY, workload=replace(TEST_IDENTITY.workload, spiffe_id="spiffe://mesh.test/ns/shop/sa/web")
)
WEB = Proxy("web-a", Role.SIDECAR, "shop", "web", "web", Locality("r1", "z1", "a"), "127.0.0.1", "127.0.0.1")


def inbound_filters(mesh: dict[str, object]) -> dict[str, object]:
    """Per inbound filter chain: its network filters, and an HTTP manager's HTTP filters (and its
    routes' per-route filter configuration, from RDS: where an HTTP port's RBAC rules are); and
    the chain's TLS peer validation (a TCP port's handshake accepts only allowed callers)."""
    view = parse_mesh(yaml.safe_dump(mesh))
    listeners = GENERATORS[types.LISTENER](view, WEB, IDENTITY)
    inbound = listeners[naming.inbound_listener(WEB.inbound_port)]
    routes = GENERATORS[types.ROUTE](view, WEB, IDENTITY)
    out: dict[str, object] = {}
    for chain in json_format.MessageToDict(inbound, preserving_proto_field_name=True)["filter_chains"]:
        filters = []
        for f in chain["filters"]:
            config = f["typed_config"]
            if "http_filters" in config:
                name = config["rds"]["route_config_name"]
                [host] = json_format.MessageToDict(routes[name], preserving_proto_field_name=True)[
                    "virtual_hosts"
                ]
                filters.append(
                    {
                        f["name"]: [
                            h.get("typed_config", {}) | {"name": h["name"]} for h in config["http_filters"]
                        ],
                        f"RDS {name}": [r.get("typed_per_filter_config", {}) for r in host["routes"]],
                    }
                )
            else:
                filters.append({f["name"]: config})
        out[chain["name"]] = filters
    return out


def render(feature: str) -> dict[str, object]:
    mesh = yaml.safe_load(BASE)
    mesh.update(yaml.safe_load((FEATURES / f"{feature}.yaml").read_text()))
    return inbound_filters(mesh)


@pytest.mark.parametrize("feature", sorted(p.stem for p in FEATURES.glob("*.yaml")))
def test_authorization_feature(feature: str) -> None:
    got = render(feature)
    path = FEATURES / f"{feature}.json"
    assert got == golden(path, got), f"{feature} differs from {path}; if intended, run `make golden`"
