"""The load tool keeps working (its quick mode, in CI): every simulated Envoy completes its
configuration and sees every change, with no error. No timing is asserted: figures belong to
`make bench` and docs/benchmarks.md."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("mode", "source"), [("sotw", "kube"), ("delta", "kube"), ("sotw", "file")])
def test_quick_load_run_completes(tmp_path: Path, mode: str, source: str) -> None:
    out = tmp_path / "runs.csv"
    argv = [sys.executable, "-m", "bench.load", "--quick", "--mode", mode, "--source", source]
    argv += ["--csv", str(out)]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [row] = list(csv.DictReader(out.open()))
    assert (row["mode"], row["source"]) == (mode, source)
    assert int(row["cold_complete"]) == int(row["clients"]) == 20
    assert int(row["conv_n"]) == int(row["changes"]) == 5
    assert int(row["errors"]) == 0
