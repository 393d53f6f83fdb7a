"""Fixtures of the data-path tier (the API itself is in datapath.harness and datapath.netns).

* ``dp``: a ``DataPath`` with member clusters "east" and "west", each in its own network namespace
  with an agent; nothing else runs yet. Everything it starts is removed at teardown, even on failure.
  Envoys reach the control plane over its Unix socket; a module or test runs in both ways with
  ``pytest.mark.parametrize("dp", XDS_MODES, indirect=True)`` ("transit": over TLS to the control
  plane's transit address, every proxy authenticated by a token; see datapath.harness).
* ``make_datapath``: ``await make_datapath("east", "west", "north", xds=...)`` for other cluster sets.
* ``envoy_bin``: the Envoy executable, or None (``DataPath.envoy`` then skips the test).
* ``eventually`` / ``holds``: the Envoy tier's bounded polling.

On a failure, the report gets the topology, the mesh file and the log tail of every process.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from datapath.harness import DataPath, envoy_binary, eventually, holds
from datapath.netns import TopologyError


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "datapath: cross-cluster data-path tests (network namespaces, real Envoys)"
    )
    # A SIGTERM (a CI job cancelled, `timeout`, `kill`) behaves like Ctrl-C: pytest then runs the
    # fixture teardowns, which delete the namespaces. (A SIGKILL cannot be caught: the processes die
    # with pytest through their parent-death signal, and the next run deletes the namespaces.)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


@pytest.fixture(scope="session")
def envoy_bin() -> str | None:
    return envoy_binary()


class DataPathFactory:
    def __init__(self, workdir: Path, envoy_bin: str | None) -> None:
        self.workdir = workdir
        self.envoy_bin = envoy_bin
        self.made: list[DataPath] = []

    async def __call__(self, *clusters: str, mode: str | None = None, xds: str = "unix") -> DataPath:
        names = clusters or ("east", "west")
        workdir = self.workdir / f"datapath-{len(self.made)}"
        made = await DataPath.start(names, workdir=workdir, envoy_bin=self.envoy_bin, mode=mode, xds=xds)
        self.made.append(made)
        return made

    def close(self) -> None:
        errors = []
        for made in reversed(self.made):
            try:
                made.close()
            except TopologyError as exc:
                errors.append(str(exc))
        if errors:
            raise TopologyError("; ".join(errors))

    def report_sections(self) -> list[tuple[str, str]]:
        return [section for made in self.made for section in made.report_sections()]


@pytest.fixture
async def make_datapath(tmp_path: Path, envoy_bin: str | None) -> AsyncIterator[DataPathFactory]:
    factory = DataPathFactory(tmp_path, envoy_bin)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
async def dp(request: pytest.FixtureRequest, make_datapath: DataPathFactory) -> DataPath:
    """``request.param`` (indirect parametrization): the xDS mode, "unix" unless given."""
    return await make_datapath("east", "west", xds=getattr(request, "param", "unix"))


@pytest.fixture(name="eventually")
def eventually_fixture() -> Callable[..., Awaitable[Any]]:
    return eventually


@pytest.fixture(name="holds")
def holds_fixture() -> Callable[..., Awaitable[None]]:
    return holds


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On a failure, show the topology, the mesh file and every process's log tail."""
    report = yield
    if report.failed and report.when in ("setup", "call"):
        factory = getattr(item, "funcargs", {}).get("make_datapath")
        if isinstance(factory, DataPathFactory):
            for title, text in factory.report_sections():
                report.sections.append((title, text))
    return report
