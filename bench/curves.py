"""Scaling curves: bench.load over N clients and S services, for isthmus and the go-control-plane peer.

Runs each point as its own `python -m bench.load` process (a fresh server and load tool) and appends
its row to a CSV; `python -m bench.plot CSV` draws the PNGs. Points: N = 100, 300, 1,000, 2,000 at
S = 1,000, and S = 100, 1,000, 3,000, 5,000 at N = 300 (3 clusters, 10 endpoints, mTLS, Delta unless
--mode sotw).

Usage: python -m bench.curves --csv docs/bench/curves.csv [--targets isthmus,gcp] [--changes M]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = (100, 300, 1000, 2000)
SERVICES = (100, 1000, 3000, 5000)


def points() -> list[tuple[int, int]]:
    out = [(n, 1000) for n in CLIENTS]
    out += [(300, s) for s in SERVICES if (300, s) not in out]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    p.add_argument("--csv", type=Path, required=True)
    p.add_argument("--targets", default="isthmus,gcp")
    p.add_argument("--changes", type=int, default=10)
    p.add_argument(
        "--mode",
        default="delta",
        choices=("sotw", "delta"),
        help="delta by default: go-control-plane's SotW resends every subscribed assignment on each "
        "change, which makes the load tool, not the servers, the bottleneck beyond a few hundred clients",
    )
    p.add_argument("--skip", type=int, default=0, help="resume: skip this many runs")
    args = p.parse_args(argv)
    failed = 0
    runs = [(c, s, t) for c, s in points() for t in args.targets.split(",")]
    for clients, services, target in runs[args.skip :]:
        argv = [sys.executable, "-m", "bench.load", "--target", target, "--clients", str(clients)]
        argv += ["--services", str(services), "--changes", str(args.changes), "--csv", str(args.csv)]
        argv += ["--mode", args.mode]
        argv += ["--source", "kube"] if target == "isthmus" else []
        print(f"== {target}: {clients} clients, 3 x {services} x 10", flush=True)
        result = subprocess.run(argv, cwd=ROOT, check=False)
        failed += result.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
