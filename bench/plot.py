"""Plots of bench.curves' CSV: convergence, cold start, CPU per change and peak RSS against the
number of clients and of services, one line per target. Writes PNGs next to the CSV.

Usage: python -m bench.plot docs/bench/curves.csv
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

METRICS = (
    ("conv_p99_ms", "convergence p99 (ms)"),
    ("cold_start_s", "cold start, all clients (s)"),
    ("conv_server_cpu_per_change_ms", "server CPU per change (ms)"),
    ("server_peak_rss_mib", "server peak RSS (MiB)"),
)


def plot(rows: list[dict[str, str]], axis: str, fixed: tuple[str, str], out: Path) -> None:
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    for ax, (metric, label) in zip(axes, METRICS, strict=True):
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            if r[fixed[0]] == fixed[1] and r.get(metric) not in (None, "", "nan"):
                lines[f"{r['target']} ({r['mode']})"].append((float(r[axis]), float(r[metric])))
        for name, points in sorted(lines.items()):
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel(axis)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{axis} varied, {fixed[0]} = {fixed[1]} (3 clusters x 10 endpoints)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    path = Path((argv or sys.argv[1:])[0])
    rows = list(csv.DictReader(path.open()))
    plot(rows, "clients", ("services", "1000"), path.with_name("clients.png"))
    plot(rows, "services", ("clients", "300"), path.with_name("services.png"))
    print(f"wrote {path.with_name('clients.png')} and {path.with_name('services.png')}")


if __name__ == "__main__":
    main()
