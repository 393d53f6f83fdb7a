"""The MeshConfig (isthmus.io/v1alpha1) over the flags: its spec as settings
(config_api.mesh_overrides), validated in combination with the flags (settings.with_mesh_config),
reported with where each value comes from (settings.mesh_settings_in_force), conditions that keep
their transition time, and the control plane applying a MeshConfig while running: what it can
apply at once, what waits for a restart, and an invalid one that changes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from isthmus.app import ControlPlane
from isthmus.discovery.kube.config_api import Condition, conditions, mesh_overrides
from isthmus.settings import ServeSettings, SettingsError, mesh_settings_in_force, with_mesh_config


def mesh(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "isthmus.io/v1alpha1",
        "kind": "MeshConfig",
        "metadata": {"name": "default"},
        "spec": spec,
    }


def test_a_spec_sets_only_its_fields_as_serve_settings() -> None:
    assert mesh_overrides(mesh()) == {}
    assert mesh_overrides(
        mesh(
            trustDomain="mesh.example",
            exportPolicy="all",
            maxStaleness="90s",
            withdrawAfter="600s",
            debounce={"max": "2.5s"},
            gateways=[{"cluster": "east", "address": "gw.east", "port": 15443}],
            clustersetRange="10.200.0.0/16",
        )
    ) == {
        "trust_domain": "mesh.example",
        "export_policy": "all",  # set to the default is still set: it overrides a flag
        "max_staleness": 90.0,
        "withdraw_after": 600.0,
        "debounce_max": 2.5,
        "cluster_gateways": (("east", "gw.east", 15443),),
        "clusterset_range": "10.200.0.0/16",
    }


@pytest.mark.parametrize(
    "spec",
    [
        {"unknownField": 1},
        {"maxStaleness": "soon"},
        {"exportPolicy": "some"},
        {
            "gateways": [
                {"cluster": "east", "address": "a", "port": 1},
                {"cluster": "east", "address": "b", "port": 2},
            ]
        },
    ],
)
def test_a_spec_that_is_not_a_mesh_config_is_refused(spec: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"\S"):  # with a message saying what
        mesh_overrides(mesh(**spec))


def test_overrides_win_over_flags_and_gateways_merge_by_cluster() -> None:
    flags = ServeSettings(
        max_staleness=120.0,
        debounce_quiet=0.2,
        cluster_gateways=(("east", "1.1.1.1", 15443), ("west", "2.2.2.2", 15443)),
    )
    settings = with_mesh_config(
        flags,
        {"max_staleness": 60.0, "cluster_gateways": (("west", "gw.west", 443), ("north", "3.3.3.3", 1))},
    )
    assert settings.max_staleness == 60.0
    assert settings.debounce_quiet == 0.2  # not set: the flag's
    assert settings.cluster_gateways == (
        ("east", "1.1.1.1", 15443),
        ("north", "3.3.3.3", 1),
        ("west", "gw.west", 443),
    )


@pytest.mark.parametrize(
    ("flags", "overrides", "says"),
    [
        (ServeSettings(max_staleness=300.0), {"withdraw_after": 60.0}, "--withdraw-after"),
        (ServeSettings(withdraw_after=400.0), {"max_staleness": 500.0}, "--withdraw-after"),
        (ServeSettings(), {"debounce_quiet": 2.0}, "--debounce"),  # longer than the flag's max
        (ServeSettings(), {"max_staleness": 0.0}, "--max-staleness"),
        (ServeSettings(), {"clusterset_range": "10.0.0.0/31"}, "--clusterset-range"),
        (ServeSettings(), {"export_policy": "some"}, "--export-policy"),
        (ServeSettings(), {"xds_address": "0.0.0.0:1"}, "cannot set xds_address"),
    ],
)
def test_settings_invalid_together_are_refused_with_what_is_wrong(
    flags: ServeSettings, overrides: dict[str, object], says: str
) -> None:
    with pytest.raises(SettingsError, match=says):
        with_mesh_config(flags, overrides)


def test_each_setting_says_where_its_value_comes_from() -> None:
    flags = ServeSettings(max_staleness=120.0, trust_domain="cluster.local")  # the default, given as a flag
    overrides: dict[str, object] = {"debounce_max": 3.0, "export_policy": "serviceexport"}
    in_force = {
        name: (value, source)
        for name, value, source in mesh_settings_in_force(
            flags, with_mesh_config(flags, overrides), overrides
        )
    }
    assert in_force == {
        "trustDomain": ("cluster.local", "default"),
        "exportPolicy": ("serviceexport", "meshconfig"),
        "maxStaleness": ("120s", "flag"),
        "withdrawAfter": ("never", "default"),
        "debounce": ("0.1s,3s", "meshconfig"),
        "gateways": ("", "default"),
        "clustersetRange": ("240.240.0.0/16", "default"),
    }


def test_conditions_keep_their_transition_time_until_their_status_changes() -> None:
    first = conditions([Condition("Accepted", True, "Accepted")], [], 1)
    assert first[0]["status"] == "True"
    assert first[0]["observedGeneration"] == 1
    old = [{**first[0], "lastTransitionTime": "2026-01-01T00:00:00Z"}, {"type": "Theirs", "status": "True"}]
    same = conditions([Condition("Accepted", True, "Accepted", "again")], old, 2)
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert same[0]["observedGeneration"] == 2
    assert same[1] == {"type": "Theirs", "status": "True"}  # another writer's, kept
    flipped = conditions([Condition("Accepted", False, "InvalidSpec", "why")], old, 3)
    assert flipped[0]["lastTransitionTime"] != "2026-01-01T00:00:00Z"
    assert (flipped[0]["status"], flipped[0]["reason"], flipped[0]["message"]) == (
        "False",
        "InvalidSpec",
        "why",
    )


class StubConfig:
    """What ControlPlane asks of its ConfigApi when the MeshConfig changes."""

    namespace = "isthmus-system"

    def __init__(self) -> None:
        self.obj: dict[str, Any] | None = None

    def mesh_config(self) -> dict[str, Any] | None:
        return self.obj


async def test_the_control_plane_applies_a_mesh_config_while_running(tmp_path: Path) -> None:
    plane = ControlPlane(
        ServeSettings(ca_dir=tmp_path, debounce_quiet=0.2, clusterset_range="240.240.0.0/16")
    )
    stub = StubConfig()
    plane.config = stub  # type: ignore[assignment]
    stub.obj = mesh(debounce={"quiet": "0.01s", "max": "0.5s"}, clustersetRange="10.99.0.0/16")
    plane._mesh_changed()
    assert (plane.aggregator.quiet, plane.aggregator.max_delay) == (0.01, 0.5)
    assert plane.settings.clusterset_range == "10.99.0.0/16"
    assert plane._report().mesh_error is None
    # An invalid one: nothing changes, and the report says why.
    stub.obj = mesh(debounce={"quiet": "5s"})
    plane._mesh_changed()
    assert plane.aggregator.quiet == 0.01
    report = plane._report()
    assert report.mesh_error is not None
    assert "--debounce" in report.mesh_error
    assert dict((n, v) for n, v, _ in report.in_force)["debounce"] == "0.01s,0.5s"
    # Removed: back to the flags.
    stub.obj = None
    plane._mesh_changed()
    assert plane.aggregator.quiet == 0.2
    assert plane.settings == plane.flags


async def test_a_trust_domain_changed_while_running_waits_for_a_restart(tmp_path: Path) -> None:
    from isthmus.app import load_ca

    plane = ControlPlane(ServeSettings(ca_dir=tmp_path))
    plane.cache.use_ca(await asyncio.to_thread(load_ca, plane.settings))
    stub = StubConfig()
    plane.config = stub  # type: ignore[assignment]
    stub.obj = mesh(trustDomain="mesh.example", maxStaleness="30s")
    plane._mesh_changed()
    assert plane.settings.max_staleness == 30.0  # the rest applies at once
    assert plane.settings.trust_domain == "cluster.local"
    report = plane._report()
    [applied] = report.mesh
    assert (applied.type, applied.status, applied.reason) == ("Applied", False, "RestartRequired")
    in_force = {n: (v, s) for n, v, s in report.in_force}
    assert in_force["trustDomain"] == ("cluster.local", "default")
    assert in_force["maxStaleness"] == ("30s", "meshconfig")
    # Set back to the running one: nothing waits any more.
    stub.obj = mesh(trustDomain="cluster.local")
    plane._mesh_changed()
    assert plane._report().mesh[0].status is True
