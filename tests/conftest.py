"""Fixtures shared by every tier: the real Kubernetes clusters of tests/realkube (started only when a
test asks for them), and their logs in the report of a test that fails with them."""

from __future__ import annotations

from collections.abc import Iterator

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
