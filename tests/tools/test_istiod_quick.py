"""The istiod comparison keeps working (bench.istiod --quick: 20 clients, 3 x 20 x 3, about 40 s):
istiod and isthmus, in turn against the same three real API servers, each bring every simulated
Envoy to a complete configuration and every endpoint change to every client, with no error and no
NACK. Only where istiod is built (hack/istiod.sh, `make bench-istiod`): skipped otherwise, as its
build takes minutes of both cores. No timing is asserted: figures belong to docs/benchmarks.md."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from realkube.binaries import versions

ROOT = Path(__file__).resolve().parents[2]


def istiod_built() -> bool:
    """What bench.istiod.istiod_built checks: hack/istiod.sh's binary and CRD file in their cache."""
    cache = Path(os.environ.get("ISTHMUS_CACHE") or Path.home() / ".cache" / "isthmus")
    cache = cache / "istiod" / versions()["ISTIO_VERSION"]
    binary = cache / "bin" / "pilot-discovery"
    return os.access(binary, os.X_OK) and (cache / "crd-all.gen.yaml").is_file()


pytestmark = [
    pytest.mark.realkube,
    pytest.mark.skipif(not istiod_built(), reason="istiod is not built (bash hack/istiod.sh)"),
]


@pytest.mark.timeout(150)
def test_quick_istiod_and_isthmus_runs_complete(tmp_path: Path) -> None:
    out = tmp_path / "runs.csv"
    argv = [sys.executable, "-m", "bench.istiod", "--quick", "--mode", "delta", "--csv", str(out)]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert [row["server"] for row in rows] == ["istiod", "isthmus"]
    for row in rows:
        assert row["flat"] == "True"  # every cluster's endpoints directly (no mTLS, one network)
        assert int(row["conv_n"]) == int(row["changes"]) == 3
        assert int(row["conv_recipients"]) == 20
        assert int(row["errors"]) == int(row["nacks"]) == 0
        assert int(row["proxy_eds_n"]) == 21  # 20 services and the API server's own
