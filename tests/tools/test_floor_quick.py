"""The floor tool keeps working (its quick mode): one real Envoy applies the whole configuration (every
service's cluster, each with its endpoints) and every endpoint change reaches it, touching that one
cluster's EDS only. No timing is asserted: figures belong to docs/benchmarks.md."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENVOY = Path(sys.executable).parent / "envoy"


@pytest.mark.skipif(not ENVOY.exists() and shutil.which("envoy") is None, reason="no envoy binary")
def test_quick_floor_run_applies_config_and_changes(tmp_path: Path) -> None:
    out = tmp_path / "runs.csv"
    argv = [sys.executable, "-m", "bench.floor", "--quick", "--csv", str(out)]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [row] = list(csv.DictReader(out.open()))
    services, changes = int(row["services"]), int(row["changes"])
    assert (services, changes) == (20, 5)
    # Every service's EDS cluster, plus the static xDS cluster and the inbound cluster.
    assert int(row["envoy_outbound_clusters"]) == services
    assert int(row["envoy_clusters"]) == services + 2
    assert int(row["envoy_warming_clusters"]) == 0
    assert int(row["envoy_eds_clusters_updated"]) == services
    assert int(row["ser_cds_resources"]) == services + 1
    assert int(row["ser_eds_resources"]) == services
    assert int(row["change_n"]) == changes
    assert float(row["change_eds_updates_per_change"]) == 1.0
    assert int(row["change_cds_lds_rds_updates"]) == 0
    assert int(row["errors"]) == 0
