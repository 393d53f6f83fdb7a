"""`isthmus bootstrap` output and the Node -> Proxy parsing it must round-trip through."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from google.protobuf import json_format

from isthmus.cli import main
from isthmus.discovery.model import Locality
from isthmus.xds.proxy import InvalidNode, Role, proxy_from_node

ARGS = [
    "bootstrap",
    "--role",
    "sidecar",
    "--cluster",
    "east",
    "--namespace",
    "shop",
    "--service",
    "web",
    "--service-account",
    "web-sa",
    "--region",
    "us-east1",
    "--zone",
    "us-east1-b",
    "--xds-address",
    "127.0.0.1:25010",
    "--admin-port",
    "25000",
    "--outbound-port",
    "25001",
]


def _load(path: Path) -> dict[str, object]:
    text = path.read_text()
    data: dict[str, object] = yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)
    return data


@pytest.mark.parametrize(("suffix", "delta"), [(".json", False), (".yaml", True)])
def test_bootstrap_round_trips_to_proxy(tmp_path: Path, suffix: str, delta: bool) -> None:
    out = tmp_path / f"envoy{suffix}"
    assert main([*ARGS, *(["--delta"] if delta else []), "-o", str(out)]) == 0
    boot = json_format.ParseDict(_load(out), bootstrap_pb2.Bootstrap())
    ads = boot.dynamic_resources.ads_config
    assert ads.api_type == (ads.DELTA_GRPC if delta else ads.GRPC)
    assert boot.admin.address.socket_address.port_value == 25000
    xds = boot.static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint
    assert (xds.address.socket_address.address, xds.address.socket_address.port_value) == ("127.0.0.1", 25010)
    proxy = proxy_from_node(boot.node)
    assert proxy.role is Role.SIDECAR
    assert (proxy.namespace, proxy.service, proxy.service_account) == ("shop", "web", "web-sa")
    assert proxy.locality == Locality("us-east1", "us-east1-b", "east")
    assert proxy.outbound_port == 25001


@pytest.mark.parametrize(
    "bad",
    [["--xds-address", "nonsense"], ["--admin-port", "70000"], ["--outbound-port", "0"]],
)
def test_bootstrap_rejects_bad_flags(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ARGS, *bad]) == 2
    assert "isthmus:" in capsys.readouterr().err


def test_node_errors_are_clear() -> None:
    boot = bootstrap_pb2.Bootstrap()
    with pytest.raises(InvalidNode, match="Node with an id"):
        proxy_from_node(boot.node)
    boot.node.id = "x"
    boot.node.metadata.update({"isthmus": {"role": "ingress"}})
    with pytest.raises(InvalidNode, match="not sidecar or gateway"):
        proxy_from_node(boot.node)
    boot.node.metadata.update({"isthmus": {"role": "sidecar", "outbound_port": "eighty"}})
    with pytest.raises(InvalidNode, match="not an integer"):
        proxy_from_node(boot.node)


def test_serve_refuses_missing_mesh_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--mesh", str(tmp_path / "absent.yaml")]) == 2
    assert "not a readable file" in capsys.readouterr().err
