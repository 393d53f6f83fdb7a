"""Authorization policies from member clusters, against fake API servers: isthmus's
AuthorizationPolicy (isthmus.io/v1alpha1) and SMI's TrafficTarget (access.smi-spec.io/v1alpha3)
with the HTTPRouteGroups and TCPRoutes (specs.smi-spec.io/v1alpha4) its rules name, watched in
every member cluster, reach MeshView.policies.

* a policy created in east selecting the service account web is in the view; deleted, it is gone;
* the same policy (kind, namespace, name) in east and west is one policy: the older wins, also when
  its cluster's name sorts after the other's;
* a TrafficTarget allows what its HTTPRouteGroup's matches say, and follows a change of the group;
* a malformed policy is refused: not in the view, logged once (WARNING, with its generation) however
  often the cluster publishes; the other policies and the services are unaffected;
* without the CRDs (404) or with a role that does not grant them (403) the cluster syncs with no
  policies; a CRD installed later is watched.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from test_kube_members import FAST, Graph, addresses, endpoint_slice
from test_kube_routes import east_west, eventually, next_second, synced  # noqa: F401 (east_west: a fixture)

from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.kube.members import Members
from isthmus.discovery.model import AuthorizationPolicy, MeshView
from kubeapi.server import FakeKubeApi

PLURALS = ("authorizationpolicies", "traffictargets", "httproutegroups", "tcproutes")
EastWest = tuple[dict[str, FakeKubeApi], Graph, Aggregator, Path]


def policy(name: str, account: str, callers: list[dict[str, str]], **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "isthmus.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop", **meta},
        "spec": {"selector": {"serviceAccount": account}, "rules": [{"callers": callers}]},
    }


def traffic_target(name: str, account: str, group: str) -> dict[str, Any]:
    return {
        "apiVersion": "access.smi-spec.io/v1alpha3",
        "kind": "TrafficTarget",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "destination": {"kind": "ServiceAccount", "name": account, "namespace": "shop"},
            "sources": [{"kind": "ServiceAccount", "name": "client", "namespace": "shop"}],
            "rules": [{"kind": "HTTPRouteGroup", "name": group}],
        },
    }


def route_group(name: str, methods: list[str], path: str) -> dict[str, Any]:
    return {
        "apiVersion": "specs.smi-spec.io/v1alpha4",
        "kind": "HTTPRouteGroup",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"matches": [{"name": "api", "methods": methods, "pathRegex": path}]},
    }


@pytest.fixture
def clusters(east_west: EastWest) -> EastWest:  # noqa: F811 (the fixture imported above)
    """Clusters east and west with the web service (test_kube_routes.east_west); no CRD installed."""
    return east_west


def install(api: FakeKubeApi) -> None:
    for plural in PLURALS:
        api.set_installed(plural, True)


def selecting(view: MeshView, account: str = "web") -> list[AuthorizationPolicy]:
    return list(view.policies.get(("shop", account), ()))


def callers(found: AuthorizationPolicy) -> list[tuple[str, str]]:
    return [(c.namespace, c.service_account) for rule in found.rules for c in rule.callers]


async def test_a_policy_in_east_reaches_the_mesh_view_and_goes_when_deleted(clusters: EastWest) -> None:
    apis, graph, aggregator, directory = clusters
    east = apis["east"]
    install(east)
    task = asyncio.create_task(Members(aggregator, directory=directory, timing=FAST, poll_interval=0.1).run())
    try:
        await graph.until(lambda v: synced("east", "west")(v) and len(addresses(v)) == 2)
        assert graph.view.policies == {}
        east.create(policy("web-callers", "web", [{"namespace": "shop", "serviceAccount": "client"}]))
        view = await graph.until(lambda v: bool(selecting(v)))
        (found,) = selecting(view)
        assert (found.kind, found.namespace, found.name, found.service_account) == (
            "AuthorizationPolicy",
            "shop",
            "web-callers",
            "web",
        )
        assert callers(found) == [("shop", "client")]
        east.delete("AuthorizationPolicy", "shop", "web-callers")
        view = await graph.until(lambda v: not v.policies)
        assert len(addresses(view)) == 2
    finally:
        task.cancel()


async def test_the_same_policy_in_two_clusters_is_one_policy_and_the_older_wins(clusters: EastWest) -> None:
    apis, graph, aggregator, directory = clusters
    east, west = apis["east"], apis["west"]
    install(east)
    install(west)
    # West's is older, though west sorts after east: the creation time decides.
    west.create(policy("web-callers", "web", [{"namespace": "shop", "serviceAccount": "from-west"}]))
    await next_second()
    east.create(policy("web-callers", "web", [{"namespace": "shop", "serviceAccount": "from-east"}]))
    task = asyncio.create_task(Members(aggregator, directory=directory, timing=FAST, poll_interval=0.1).run())
    try:
        view = await graph.until(lambda v: synced("east", "west")(v) and bool(selecting(v)))
        (found,) = selecting(view)
        assert callers(found) == [("shop", "from-west")]
        west.delete("AuthorizationPolicy", "shop", "web-callers")
        view = await graph.until(lambda v: [callers(p) for p in selecting(v)] == [[("shop", "from-east")]])
        assert len(selecting(view)) == 1
    finally:
        task.cancel()


async def test_a_traffic_target_allows_what_its_route_group_matches(clusters: EastWest) -> None:
    apis, graph, aggregator, directory = clusters
    east = apis["east"]
    install(east)
    task = asyncio.create_task(Members(aggregator, directory=directory, timing=FAST, poll_interval=0.1).run())
    try:
        await graph.until(synced("east", "west"))
        east.create(traffic_target("web-from-client", "web", "web-api"))
        view = await graph.until(lambda v: bool(selecting(v)))
        (found,) = selecting(view)
        assert (found.kind, found.name) == ("TrafficTarget", "web-from-client")
        assert found.rules == ()  # its group does not exist yet: it allows nothing
        east.create(route_group("web-api", ["GET"], "/api/.*"))
        view = await graph.until(lambda v: bool(selecting(v)) and bool(selecting(v)[0].rules))
        (rule,) = selecting(view)[0].rules
        assert [(c.namespace, c.service_account) for c in rule.callers] == [("shop", "client")]
        assert (rule.methods, rule.paths, rule.regex) == (("GET",), ("/api/.*",), True)
        east.update(route_group("web-api", ["GET", "POST"], "/api/.*"))
        await graph.until(lambda v: [r.methods for r in selecting(v)[0].rules] == [("GET", "POST")])
    finally:
        task.cancel()


async def test_a_malformed_policy_is_refused_once_fails_closed_and_the_rest_of_the_mesh_is_unaffected(
    clusters: EastWest, caplog: pytest.LogCaptureFixture
) -> None:
    apis, graph, aggregator, directory = clusters
    east = apis["east"]
    install(east)
    caplog.set_level(logging.INFO, logger="isthmus.discovery.kube")
    task = asyncio.create_task(Members(aggregator, directory=directory, timing=FAST, poll_interval=0.1).run())
    try:
        await graph.until(synced("east", "west"))
        east.create(policy("bad", "web", [{"namespace": "Not_A_Namespace"}], generation=1))
        east.create(policy("good", "web", [{"namespace": "shop", "serviceAccount": "client"}]))
        view = await graph.until(lambda v: len(selecting(v)) == 2)
        # Refused, it fails closed: it denies every call to web (it allows nothing), beside "good".
        assert {p.name: p.rules for p in selecting(view)}["bad"] == ()
        assert len(addresses(view)) == 2

        def refusals() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.levelno == logging.WARNING and "AuthorizationPolicy shop/bad" in r.getMessage()
            ]

        await eventually(lambda: len(refusals()) == 1, "the refusal logged")
        (message,) = refusals()
        assert "generation 1" in message
        assert "Not_A_Namespace" in message
        assert "may be called by nobody" in message
        # The cluster publishes again and again (endpoints change): the refusal is not logged again.
        for i in range(2, 5):
            east.update(endpoint_slice("web-east", [f"127.0.1.{i}"]))
            await graph.until(lambda v, i=i: ("east", f"127.0.1.{i}") in addresses(v))
        assert len(refusals()) == 1, refusals()
        # Mended (a new generation): it is a policy of the mesh.
        east.update(policy("bad", "web", [{"namespace": "blog"}], generation=2))
        view = await graph.until(lambda v: {p.name: p.rules for p in selecting(v)}["bad"] != ())
        assert sorted(p.name for p in selecting(view)) == ["bad", "good"]
        assert len(refusals()) == 1
    finally:
        task.cancel()


async def test_without_the_crds_or_the_permission_a_cluster_syncs_with_no_policies(
    clusters: EastWest,
) -> None:
    apis, graph, aggregator, directory = clusters
    east, west = apis["east"], apis["west"]
    install(west)
    west.create(policy("web-callers", "web", [{"namespace": "shop"}]))
    for plural in PLURALS:
        west.forbid(plural)
    members = Members(aggregator, directory=directory, timing=FAST, poll_interval=0.1)
    task = asyncio.create_task(members.run())
    try:
        view = await graph.until(lambda v: synced("east", "west")(v) and len(addresses(v)) == 2)
        assert view.policies == {}
        status = members.status()
        assert not set(status["east"].get("degraded", {})) & set(PLURALS), status  # type: ignore[arg-type]
        degraded = status["west"]["degraded"]
        assert set(PLURALS) <= set(degraded), status  # type: ignore[arg-type]
        assert "403" in str(degraded["authorizationpolicies"])  # type: ignore[index]
        # East's CRDs are installed later, west's role grants the policies: both are watched.
        install(east)
        east.create(policy("east-only", "web", [{"namespace": "blog"}]))
        await graph.until(lambda v: [p.name for p in selecting(v)] == ["east-only"])
        for plural in PLURALS:
            west.allow(plural)
        view = await graph.until(lambda v: len(selecting(v)) == 2)
        assert sorted(p.name for p in selecting(view)) == ["east-only", "web-callers"]
        assert synced("east", "west")(view)
    finally:
        task.cancel()
