"""`envoy --mode validate` accepts every bootstrap `isthmus bootstrap` writes: sidecar and gateway,
JSON and YAML, SotW and Delta; and rejects a broken one (so the check has teeth)."""

from __future__ import annotations

import json

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
