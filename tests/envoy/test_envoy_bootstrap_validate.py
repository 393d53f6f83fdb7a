"""`envoy --mode validate` accepts every bootstrap `isthmus bootstrap` writes: sidecar and gateway,
JSON and YAML, SotW and Delta; and rejects a broken one (so the check has teeth)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.envoy


@pytest.mark.parametrize("fmt", ["json", "yaml"])
@pytest.mark.parametrize("role", ["sidecar", "gateway"])
def test_envoy_validates_generated_bootstrap(procs, role, fmt, delta) -> None:
    boot = procs.bootstrap(xds_port=15010, delta=delta, role=role, fmt=fmt)
    text = boot.path.read_text()
    doc = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    assert doc["node"]["id"] == boot.node_id
    assert doc["node"]["metadata"]["isthmus"]["role"] == role
    ads = doc["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == ("DELTA_GRPC" if delta else "GRPC"), ads

    result = procs.validate(boot.path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"envoy --mode validate rejected {boot.path.name}:\n{output}\n{text}"
    assert "OK" in output, output


def test_envoy_validate_rejects_a_broken_bootstrap(procs) -> None:
    boot = procs.bootstrap(xds_port=15010, delta=False)
    doc = json.loads(boot.path.read_text())
    doc["dynamic_resources"]["ads_config"]["api_type"] = "NOT_AN_API_TYPE"
    broken = boot.path.with_name("broken.json")
    broken.write_text(json.dumps(doc))
    result = procs.validate(broken)
    assert result.returncode != 0, result.stdout + result.stderr


@pytest.mark.parametrize("role", ["sidecar", "gateway"])
def test_envoy_validates_unix_socket_bootstrap(procs, tmp_path, role) -> None:
    """xDS over a Unix socket (a pipe address) with an application address: still valid."""
    path = tmp_path / f"unix-{role}.yaml"
    argv = [sys.executable, "-m", "isthmus.cli", "bootstrap", "--role", role, "--cluster", "east"]
    argv += ["--namespace", "shop", "--service", "web", "--xds-address", f"unix:{tmp_path}/xds.sock"]
    argv += ["--listen-address", "10.1.0.10", "--app-address", "10.1.0.10", "-o", str(path)]
    subprocess.run(argv, check=True, capture_output=True, text=True)
    doc = yaml.safe_load(path.read_text())
    [cluster] = doc["static_resources"]["clusters"]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address == {"pipe": {"path": f"{tmp_path}/xds.sock"}}
    assert doc["node"]["metadata"]["isthmus"]["app_address"] == "10.1.0.10"
    result = procs.validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
