"""GAMMA routes from member clusters, against fake API servers: HTTPRoutes and GRPCRoutes
(gateway.networking.k8s.io/v1) watched in every member cluster reach MeshView.routes.

* a route created in cluster east attached to Service web is in the view, read from east; deleted,
  it is gone;
* the same route (kind, namespace, name) in east and west is one route: the older wins, also when
  its cluster's name sorts after the other's; deleted there, the other one takes over;
* a route with a regular expression RE2 rejects is refused: not in the view, logged once (INFO,
  with the Gateway API reason) however often the cluster publishes, again for a new generation;
  the other routes and the services are unaffected;
* without the CRDs (404) or with a role that does not grant them (403) the cluster syncs with no
  routes; a CRD installed later is watched.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from test_kube_members import FAST, Graph, addresses, endpoint_slice, service

from isthmus.discovery.aggregate import Aggregator, Shard
from isthmus.discovery.kube.cluster import SOURCE
from isthmus.discovery.kube.members import Members
from isthmus.discovery.model import ClusterState, MeshView, ServiceKey, ServiceRoute
from kubeapi.kubeconfig import write_kubeconfig
from kubeapi.server import FakeKubeApi

WEB = ServiceKey("shop", "web")
ROUTE_PLURALS = ("httproutes", "grpcroutes")


def http_route(name: str, backend: str, path: dict[str, str] | None = None, **meta: Any) -> dict[str, Any]:
    match = {"path": path or {"type": "PathPrefix", "value": "/"}}
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "shop", **meta},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
            "rules": [{"matches": [match], "backendRefs": [{"name": backend, "port": 80}]}],
        },
    }


def web_routes(view: MeshView) -> list[ServiceRoute]:
    return [r for r in view.routes.get(WEB, ()) if r.kind != "TrafficSplit"]


def routed(view: MeshView) -> set[tuple[str, str, str]]:
    """(route name, cluster read from, first backend's service name) of web's GAMMA routes."""
    return {(r.name, r.cluster, r.rules[0].backends[0].service.name) for r in web_routes(view)}


def synced(*names: str) -> Callable[[MeshView], bool]:
    def check(view: MeshView) -> bool:
        return all(n in view.clusters and view.clusters[n].state is ClusterState.SYNCED for n in names)

    return check


def shard(aggregator: Aggregator, cluster: str) -> Shard:
    return aggregator.shards[(SOURCE, cluster)]


async def eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Until ``check()`` holds (for what changes no view: a shard's routes, a log line)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.02)


async def next_second() -> None:
    """Until the wall clock is in a later second than now (creationTimestamps have seconds)."""
    start = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    while datetime.datetime.now(datetime.UTC).replace(microsecond=0) == start:
        await asyncio.sleep(0.05)


@pytest.fixture
async def east_west(tmp_path: Path) -> AsyncIterator[tuple[dict[str, FakeKubeApi], Graph, Aggregator, Path]]:
    """Clusters east and west, each with the web service (one endpoint); no route CRD installed."""
    apis = {name: FakeKubeApi(bookmark_interval=0.5) for name in ("east", "west")}
    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    for i, (name, api) in enumerate(apis.items()):
        await api.start()
        api.create(service())
        api.create(endpoint_slice(f"web-{name}", [f"127.0.{i + 1}.1"]))
        write_kubeconfig(directory / f"{name}.yaml", api.url, api.token, name)
    graph = Graph()
    aggregator = Aggregator(graph.on_view, quiet=0.02, max_delay=0.2)
    task = asyncio.create_task(aggregator.run())
    yield apis, graph, aggregator, directory
    task.cancel()
    for api in apis.values():
        await api.stop()


def install_routes(api: FakeKubeApi) -> None:
    for plural in ROUTE_PLURALS:
        api.set_installed(plural, True)


async def test_an_http_route_in_east_reaches_the_mesh_view_and_goes_when_deleted(
    east_west: tuple[dict[str, FakeKubeApi], Graph, Aggregator, Path],
) -> None:
    apis, graph, aggregator, directory = east_west
    east = apis["east"]
    install_routes(east)
    task = asyncio.create_task(Members(aggregator, directory=directory, timing=FAST, poll_interval=0.1).run())
    try:
        await graph.until(lambda v: synced("east", "west")(v) and len(addresses(v)) == 2)
        assert web_routes(graph.view) == []
        east.create(http_route("web-v2-only", "web-v2", {"type": "PathPrefix", "value": "/v2"}))
        view = await graph.until(lambda v: bool(web_routes(v)))
        (found,) = web_routes(view)
        assert (found.namespace, found.name, found.cluster, found.port) == ("shop", "web-v2-only", "east", 80)
        assert not found.consumer
        (rule,) = found.rules
        assert [(m.path, m.path_type.value) for m in rule.matches] == [("/v2", "PathPrefix")]
        assert [(str(b.service), b.port) for b in rule.backends] == [("shop/web-v2", 80)]
        assert found.created == east.objects("httproutes")[0]["metadata"]["creationTimestamp"]
        assert len(addresses(view)) == 2  # the services are as they were
        # A change of the route is seen; its deletion removes it.
        east.update(http_route("web-v2-only", "web-v3"))
        await graph.until(lambda v: routed(v) == {("web-v2-only", "east", "web-v3")})
        east.delete("httproutes", "shop", "web-v2-only")
        view = await graph.until(lambda v: not web_routes(v))
        assert len(addresses(view)) == 2
    finally:
        task.cancel()


async def test_the_same_route_in_two_clusters_is_one_route_and_the_older_wins(
    east_west: tuple[dict[str, FakeKubeApi], Graph, Aggregator, Path],
) -> None:
    apis, graph, aggregator, directory = east_west
    for api in apis.values():
        install_routes(api)
    task = asyncio.create_task(Members(aggregator, directory=directory, timing=FAST, poll_interval=0.1).run())
    try:
        await graph.until(synced("east", "west"))
        # West's is created first: older, though "east" sorts before "west".
        apis["west"].create(http_route("web", "web-v1"))
        await graph.until(lambda v: routed(v) == {("web", "west", "web-v1")})
        await next_second()
        apis["east"].create(http_route("web", "web-v2"))
        await eventually(
            lambda: any(r.name == "web" for r in shard(aggregator, "east").routes), "east's route read"
        )
        view = aggregator.flush()  # east's route is in the aggregate now
        assert routed(view) == {("web", "west", "web-v1")}
        assert len(web_routes(view)) == 1
        # West's deleted: east's is the route now.
        apis["west"].delete("httproutes", "shop", "web")
        await graph.until(lambda v: routed(v) == {("web", "east", "web-v2")})
        # West's created again: now it is the younger one, and east's stays.
        apis["west"].create(http_route("web", "web-v1"))
        await eventually(
            lambda: any(r.name == "web" for r in shard(aggregator, "west").routes), "west's route read"
        )
        assert routed(aggregator.flush()) == {("web", "east", "web-v2")}
    finally:
        task.cancel()


async def test_a_route_envoy_would_reject_is_refused_once_and_the_rest_of_the_mesh_is_unaffected(
    east_west: tuple[dict[str, FakeKubeApi], Graph, Aggregator, Path], caplog: pytest.LogCaptureFixture
) -> None:
    apis, graph, aggregator, directory = east_west
    east = apis["east"]
    install_routes(east)
    caplog.set_level(logging.INFO, logger="isthmus.discovery.kube")
    task = asyncio.create_task(Members(aggregator, directory=directory, timing=FAST, poll_interval=0.1).run())
    try:
        await graph.until(synced("east", "west"))
        lookahead = {"type": "RegularExpression", "value": "/(?=v2)"}  # RE2 has no lookahead
        east.create(http_route("bad", "web-v2", lookahead, generation=1))
        east.create(http_route("good", "web-v1"))
        view = await graph.until(lambda v: bool(web_routes(v)))
        assert routed(view) == {("good", "east", "web-v1")}
        assert len(addresses(view)) == 2
        assert synced("east", "west")(view)

        def refusals() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.levelno == logging.INFO and "HTTPRoute shop/bad" in r.getMessage()
            ]

        assert len(refusals()) == 1, refusals()
        (message,) = refusals()
        assert "generation 1" in message
        assert "UnsupportedValue" in message
        assert "RE2" in message
        # The cluster publishes again and again (endpoints change): the refusal is not logged again.
        for i in range(2, 6):
            east.update(endpoint_slice("web-east", [f"127.0.1.{i}"]))
            await graph.until(lambda v, i=i: ("east", f"127.0.1.{i}") in addresses(v))
        assert len(refusals()) == 1, refusals()
        # A new generation, still refused: logged once more.
        east.update(http_route("bad", "web-v2", {"type": "RegularExpression", "value": "/(v2"}, generation=2))
        await eventually(lambda: len(refusals()) == 2, "the new generation's refusal logged")
        assert "generation 2" in refusals()[1]
        assert routed(graph.view) == {("good", "east", "web-v1")}
        # Mended: it is a route of the mesh.
        east.update(
            http_route("bad", "web-v2", {"type": "RegularExpression", "value": "/v2.*"}, generation=3)
        )
        view = await graph.until(lambda v: len(web_routes(v)) == 2)
        assert routed(view) == {("good", "east", "web-v1"), ("bad", "east", "web-v2")}
        assert len(refusals()) == 2
    finally:
        task.cancel()


async def test_without_the_crds_or_the_permission_a_cluster_syncs_with_no_routes(
    east_west: tuple[dict[str, FakeKubeApi], Graph, Aggregator, Path],
) -> None:
    apis, graph, aggregator, directory = east_west
    east, west = apis["east"], apis["west"]
    install_routes(west)
    west.create(http_route("web", "web-v1"))
    for plural in ROUTE_PLURALS:
        west.forbid(plural)
    members = Members(aggregator, directory=directory, timing=FAST, poll_interval=0.1)
    task = asyncio.create_task(members.run())
    try:
        view = await graph.until(lambda v: synced("east", "west")(v) and len(addresses(v)) == 2)
        assert web_routes(view) == []
        status = members.status()
        assert not set(status["east"].get("degraded", {})) & set(ROUTE_PLURALS), status  # type: ignore[arg-type]
        degraded = status["west"]["degraded"]
        assert set(ROUTE_PLURALS) <= set(degraded), status  # type: ignore[arg-type]
        assert "403" in str(degraded["httproutes"])  # type: ignore[index]
        # East's CRDs are installed later, west's role grants the routes: both are watched.
        install_routes(east)
        east.create(http_route("east-only", "web-v2"))
        await graph.until(lambda v: routed(v) == {("east-only", "east", "web-v2")})
        for plural in ROUTE_PLURALS:
            west.allow(plural)
        view = await graph.until(lambda v: len(web_routes(v)) == 2)
        assert routed(view) == {("east-only", "east", "web-v2"), ("web", "west", "web-v1")}
        assert synced("east", "west")(view)
    finally:
        task.cancel()
