"""Fixtures shared by every tier: the real Kubernetes clusters of tests/realkube (started only when a
test asks for them), their logs in the report of a test that fails with them, and a check at the
end of the run that nothing it started is left (namespaces, nodes, cgroups, processes)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from realkube.fixtures import (  # noqa: F401 (fixtures, found by name)
    _dedicated_clusters,
    log_sections,
    namespace,
    real_cluster_factory,
    real_clusters,
)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.failed:
        report.sections.extend(log_sections(item))
    return report


def _leftovers() -> list[str]:
    """What this test run started and did not remove: network namespaces named after its pid, real
    nodes' directories and cgroups, child processes still running."""
    pid = str(os.getpid())
    found: list[str] = []
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith((f"isdp-{pid}-", f"isrk-{pid}-")):
            found.append(f"network namespace {name}")
    nodes = Path("/tmp/isthmus-realkube-nodes")
    found += [f"node directory {p}" for p in (nodes.glob(f"{pid}-*") if nodes.is_dir() else ())]
    found += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob(f"*/isthmus-{pid}-*")]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[1] == pid and fields[0] != "Z":
                found.append(f"process {stat.parent.name}: {(stat.parent / 'cmdline').read_bytes()[:120]!r}")
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if it leaves anything behind (the tests remove what they create)."""
    leftovers = _leftovers()
    if leftovers:
        print("\nthe test run left behind:\n  " + "\n  ".join(leftovers))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
