"""The load tool keeps working (its quick mode, in CI): every simulated Envoy completes its
configuration and sees every change, with no error; so do the rolling churn (every change
converges, every client ends holding the final endpoints) and the reconnect storm (the server
killed and started again: every client reconnects and holds the current state). No timing is
asserted: figures belong to `make bench` and docs/benchmarks.md."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def quick_run(tmp_path: Path, *args: str) -> dict[str, str]:
    out = tmp_path / "runs.csv"
    argv = [sys.executable, "-m", "bench.load", "--quick", *args, "--csv", str(out)]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [row] = list(csv.DictReader(out.open()))
    assert int(row["cold_complete"]) == int(row["clients"]) == 20
    assert int(row["conv_n"]) == int(row["changes"]) == 5
    assert int(row["errors"]) == 0
    return row


@pytest.mark.parametrize(("mode", "source"), [("sotw", "kube"), ("delta", "kube"), ("sotw", "file")])
def test_quick_load_run_completes(tmp_path: Path, mode: str, source: str) -> None:
    row = quick_run(tmp_path, "--mode", mode, "--source", source)
    assert (row["mode"], row["source"]) == (mode, source)


CHURN = ("--churn", "20", "--churn-seconds", "2")


@pytest.mark.parametrize(
    ("mode", "scenario"),
    [("delta", CHURN), ("delta", ("--reconnect-storm",)), ("sotw", (*CHURN, "--reconnect-storm"))],
    ids=["delta-churn", "delta-storm", "sotw-churn-storm"],
)
def test_quick_churn_and_storm_complete(tmp_path: Path, mode: str, scenario: tuple[str, ...]) -> None:
    row = quick_run(tmp_path, "--mode", mode, *scenario)
    if "--churn" in scenario:
        assert int(row["churn_written"]) == 40
        assert int(row["churn_conv_n"]) == 40
        assert int(row["churn_unconverged"]) == 0
        assert int(row["churn_clients_converged"]) == 20
        assert int(row["churn_assignments_wrong"]) == 0
    if "--reconnect-storm" in scenario:
        assert int(row["storm_clients_synced"]) == 20
        assert int(row["storm_breaks"]) >= 20  # every stream ended with the server and was opened again
        assert int(row["storm_assignments_wrong"]) == 0
        # A restarted server holds its answers until every member cluster has synced: no proxy
        # that reconnects while it starts is served a partial view (ConfigCache.hold).
        assert int(row["storm_clients_partial"]) == 0, (row["storm_eds_partial"], row["storm_removed"])
