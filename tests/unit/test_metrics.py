"""Prometheus metrics (isthmus.metrics): the names, types and labels docs/metrics.md promises, bounded
label values, and each metric moving where the code does what it counts: a real AdsServer and a
gRPC client (responses, ACK latency, NACKs, convergence after an aggregator's view and not after a
view set directly nor for a first configuration, connected proxies), the aggregate (member cluster
state and weight), a reflector (watch events, relists, errors), the CA (issuance, rotation), the
cache (views, generation), the send budget, and GET /metrics behind the admin check.

The registry is the process's: every assertion compares a value before and after, or reads series
of names no other test uses."""

from __future__ import annotations

import asyncio
import datetime
import gc
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from isthmus import metrics
from isthmus.admin.app import Readiness, make_admin_app, start_admin
from isthmus.discovery.aggregate import Aggregator, Shard
from isthmus.discovery.kube.reflector import Reflector, Timing
from isthmus.discovery.model import (
    FULL_WEIGHT,
    ClusterState,
    Endpoint,
    Locality,
    MemberCluster,
    MeshView,
    ServiceKey,
    ServicePort,
)
from isthmus.identity.admin_tokens import AdminTokens
from isthmus.xds import types
from isthmus.xds.ca import MeshCA
from isthmus.xds.cache import ConfigCache
from isthmus.xds.proxy import Proxy, Role
from isthmus.xds.server import AdsServer
from protocol.client import CLIENTS, AdsClient, eventually, make_node

REGISTRY = metrics.REGISTRY
WEB = ServiceKey("shop", "web")
HTTP = (ServicePort("http", 80, 8080),)
LOCALITY = Locality("r", "z", "m-east")

# name -> (type, label names) of every isthmus_ metric (docs/metrics.md lists the same).
EXPECTED: dict[str, tuple[str, set[str]]] = {
    "isthmus_xds_connected_proxies": ("gauge", {"cluster", "role", "mode"}),
    "isthmus_xds_responses": ("counter", {"type"}),
    "isthmus_xds_nacks": ("counter", {"type"}),
    "isthmus_xds_ack_latency_seconds": ("histogram", {"type"}),
    "isthmus_proxy_convergence_seconds": ("histogram", set()),
    "isthmus_xds_streams": ("counter", {"mode"}),
    "isthmus_xds_authentications": ("counter", {"result"}),
    "isthmus_xds_send_budget_used_bytes": ("gauge", set()),
    "isthmus_xds_send_budget_limit_bytes": ("gauge", set()),
    "isthmus_xds_send_budget_waiting_responses": ("gauge", set()),
    "isthmus_mesh_views": ("counter", set()),
    "isthmus_mesh_view_info": ("gauge", {"version"}),
    "isthmus_mesh_view_generation_seconds": ("histogram", {"type"}),
    "isthmus_member_cluster_state": ("gauge", {"cluster", "state"}),
    "isthmus_member_cluster_weight_ratio": ("gauge", {"cluster"}),
    "isthmus_member_cluster_watch_events": ("counter", {"cluster", "kind"}),
    "isthmus_member_cluster_relists": ("counter", {"cluster", "kind"}),
    "isthmus_member_cluster_watch_errors": ("counter", {"cluster", "kind"}),
    "isthmus_ca_certificates_issued": ("counter", {"kind"}),
    "isthmus_ca_certificates_rotated": ("counter", {"kind"}),
}
FORBIDDEN_LABELS = {
    "proxy",
    "node",
    "node_id",
    "pod",
    "resource",
    "name",
    "service",
    "namespace",
    "version_info",
}


def families() -> dict[str, Any]:
    """The registry as Prometheus reads it: the text format, parsed."""
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain"), content_type
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(name: str, **labels: str) -> float:
    found = REGISTRY.get_sample_value(name, labels)
    return 0.0 if found is None else found


def samples(name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for f in REGISTRY.collect() for s in f.samples if s.name == name]


# ---- names, types, labels --------------------------------------------------------------------


def test_every_metric_has_its_documented_name_type_and_labels() -> None:
    metrics.xds_type("cds").responses.inc(0)  # labelled families show their labels once a child exists
    found = {name: f for name, f in families().items() if name.startswith("isthmus_")}
    assert set(found) == set(EXPECTED), sorted(set(found) ^ set(EXPECTED))
    for name, (kind, labels) in EXPECTED.items():
        family = found[name]
        assert family.type == kind, (name, family.type)
        assert family.documentation, name
        for sample in family.samples:
            names = set(sample.labels) - ({"le"} if kind == "histogram" else set())
            assert names == labels, (name, sample)


def test_names_follow_prometheus_conventions() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    for name, (kind, labels) in EXPECTED.items():
        assert re.fullmatch(r"isthmus_[a-z]+(_[a-z]+)+", name), name
        exposed = f"{name}_total" if kind == "counter" else name
        assert f"`{exposed}`" in docs, f"{exposed} is not in docs/metrics.md"
        assert not labels & FORBIDDEN_LABELS, (name, labels)
        if kind == "histogram":
            assert name.endswith("_seconds"), name
    for name in ("isthmus_xds_connected_proxies", "isthmus_member_cluster_state"):
        assert EXPECTED[name][0] == "gauge"


def test_cluster_states_are_every_cluster_state_and_withdrawn() -> None:
    assert set(metrics.CLUSTER_STATES) == {s.value for s in ClusterState} | {"withdrawn"}


# ---- xDS: a real server and client -----------------------------------------------------------


def shard(cluster: str, *addresses: str, state: ClusterState = ClusterState.SYNCED) -> Shard:
    member = MemberCluster(cluster, region="r", zone="z", state=state)
    eps = tuple(Endpoint(a, Locality("r", "z", cluster)) for a in addresses)
    return Shard(member, {WEB: HTTP}, {WEB: eps})


class Plane:
    """An aggregator feeding a cache served by a real AdsServer, as app.ControlPlane wires them."""

    def __init__(self) -> None:
        self.cache = ConfigCache()
        self.aggregator = Aggregator(self.cache.set_view)
        self.server = AdsServer(self.cache, "127.0.0.1:0")
        self.clients: list[AdsClient] = []
        self.channels: list[grpc.aio.Channel] = []

    async def client(self, mode: str, node_id: str, cluster: str = "m-east") -> AdsClient:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.channels.append(channel)
        node = make_node(node_id, cluster=cluster, namespace="shop", service="client")
        client = CLIENTS[mode](channel, node)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        for channel in self.channels:
            await channel.close()
        await self.server.stop(0.5)


@pytest.fixture
async def plane() -> AsyncIterator[Plane]:
    p = Plane()
    p.aggregator.set_shard("kube", shard("m-east", "127.0.1.1"))
    p.aggregator.flush()
    await p.server.start()
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture(params=["sotw", "delta"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def configured(client: AdsClient) -> str:
    """Subscribe as Envoy does (CDS, then EDS for its clusters), ACK everything; the EDS name."""
    await client.subscribe(types.CLUSTER)
    cds = await client.recv_ack()
    eds_names = [n for n, c in cds.resources.items() if c.HasField("eds_cluster_config")]
    assert eds_names, cds
    await client.subscribe(types.ENDPOINT, eds_names)
    await client.recv_ack()
    return eds_names[0]


def convergence_count() -> float:
    return value("isthmus_proxy_convergence_seconds_count")


async def test_responses_acks_convergence_and_connected_proxies(plane: Plane, mode: str) -> None:
    labels = {"cluster": "m-east", "role": "sidecar", "mode": mode}
    before = {
        "cds": value("isthmus_xds_responses_total", type="cds"),
        "eds": value("isthmus_xds_responses_total", type="eds"),
        "acks": value("isthmus_xds_ack_latency_seconds_count", type="eds"),
        "streams": value("isthmus_xds_streams_total", mode=mode),
        "convergence": convergence_count(),
    }
    client = await plane.client(mode, f"metrics-{mode}")
    await configured(client)
    assert value("isthmus_xds_connected_proxies", **labels) == 1
    assert value("isthmus_xds_streams_total", mode=mode) == before["streams"] + 1
    assert value("isthmus_xds_responses_total", type="cds") == before["cds"] + 1
    # counted once the server's write returns, which may be after the client has read it
    await eventually(
        lambda: value("isthmus_xds_responses_total", type="eds") == before["eds"] + 1,
        what="the EDS response counted",
    )
    await eventually(
        lambda: value("isthmus_xds_ack_latency_seconds_count", type="eds") == before["acks"] + 1,
        what="the EDS ACK observed",
    )
    # A first configuration is not a convergence: the proxy was not there for any event.
    await client.quiet()
    assert convergence_count() == before["convergence"]

    # A view set directly (no discovery event) is pushed, and not counted.
    moved = replace(plane.cache.view.services[WEB], endpoints=(Endpoint("127.0.1.9", LOCALITY),))
    plane.cache.set_view(MeshView.of({WEB: moved}, plane.cache.view.clusters.values()))
    assert [r.type_url for r in await client.drain()] == [types.ENDPOINT]
    assert convergence_count() == before["convergence"]
    counted = convergence_count()

    # One endpoint moves: one EDS response, its ACK, one convergence.
    eds_before = value("isthmus_xds_responses_total", type="eds")
    plane.aggregator.set_shard("kube", shard("m-east", "127.0.1.2"))
    plane.aggregator.flush()
    reply = await client.recv_ack()
    assert reply.type_url == types.ENDPOINT, reply
    await eventually(lambda: convergence_count() == counted + 1, what="the convergence observed")
    await client.quiet()
    assert value("isthmus_xds_responses_total", type="eds") == eds_before + 1
    assert value("isthmus_proxy_convergence_seconds_sum") > 0

    await client.close()
    await eventually(
        lambda: value("isthmus_xds_connected_proxies", **labels) == 0, what="the gauge back to 0"
    )


async def test_a_nack_counts_by_type_and_is_no_ack(plane: Plane, mode: str) -> None:
    nacks = value("isthmus_xds_nacks_total", type="eds")
    client = await plane.client(mode, f"nacker-{mode}")
    await configured(client)
    await client.quiet()  # the last ACK read by the server
    acks = value("isthmus_xds_ack_latency_seconds_count", type="eds")
    plane.aggregator.set_shard("kube", shard("m-east", "127.0.1.3"))
    plane.aggregator.flush()
    reply = await client.recv()
    await client.nack(reply, "rejected on purpose")
    await eventually(lambda: value("isthmus_xds_nacks_total", type="eds") == nacks + 1, what="the NACK")
    assert value("isthmus_xds_nacks_total", type="cds") >= 0
    await client.quiet()
    assert value("isthmus_xds_ack_latency_seconds_count", type="eds") == acks


async def test_connected_proxies_labels_stay_bounded(plane: Plane) -> None:
    """Fifty proxies, each claiming its own cluster the mesh does not have: one 'unknown' series,
    and no label value anywhere names a proxy."""
    clients = [await plane.client("sotw", f"bounded-{i}", cluster=f"bogus-{i}") for i in range(50)]
    for client in clients:
        await client.subscribe(types.CLUSTER)
    for client in clients:
        await client.recv_ack()
    unknown = {"cluster": metrics.UNKNOWN_CLUSTER, "role": "sidecar", "mode": "sotw"}
    assert value("isthmus_xds_connected_proxies", **unknown) == 50
    clusters = {labels["cluster"] for labels, _ in samples("isthmus_xds_connected_proxies")}
    assert not any(c.startswith("bogus-") for c in clusters), clusters
    everything = [s for f in families().values() for s in f.samples]
    values = {v for s in everything for v in s.labels.values()}
    assert not any(v.startswith(("bounded-", "bogus-")) for v in values)
    series = [s for s in everything if s.name.startswith("isthmus_")]
    assert len(series) < 1000, len(series)


# ---- the aggregate: member cluster state and weight ------------------------------------------


def test_member_cluster_state_is_one_series_per_state() -> None:
    aggregator = Aggregator(lambda view: None)
    aggregator.set_shard("kube", shard("st-a", "127.0.2.1", state=ClusterState.SYNCING))
    aggregator.set_shard("kube", shard("st-b", "127.0.2.2", state=ClusterState.UNREACHABLE))
    aggregator.flush()

    def states(cluster: str) -> dict[str, float]:
        return {
            labels["state"]: v
            for labels, v in samples("isthmus_member_cluster_state")
            if labels["cluster"] == cluster
        }

    assert states("st-a") == {s: (1.0 if s == "syncing" else 0.0) for s in metrics.CLUSTER_STATES}
    assert states("st-b")["unreachable"] == 1
    assert sum(states("st-b").values()) == 1
    aggregator.set_shard("kube", shard("st-a", "127.0.2.1"))
    withdrawn = Shard(MemberCluster("st-b", state=ClusterState.STALE), withdrawn=True)
    aggregator.set_shard("kube", withdrawn)
    aggregator.set_cluster_weight("st-a", 0)
    aggregator.flush()
    assert states("st-a")["synced"] == 1
    assert sum(states("st-a").values()) == 1
    assert states("st-b")["withdrawn"] == 1
    assert sum(states("st-b").values()) == 1
    assert value("isthmus_member_cluster_weight_ratio", cluster="st-a") == 0
    assert value("isthmus_member_cluster_weight_ratio", cluster="st-b") == 1
    aggregator.set_cluster_weight("st-a", FULL_WEIGHT)
    aggregator.remove_shard("kube", "st-b")
    aggregator.flush()
    assert value("isthmus_member_cluster_weight_ratio", cluster="st-a") == 1
    assert states("st-b") == {}, "a cluster that left the mesh keeps no series"
    assert REGISTRY.get_sample_value("isthmus_member_cluster_weight_ratio", {"cluster": "st-b"}) is None


# ---- discovery: a reflector's events, relists and errors -------------------------------------


class FakeResponse:
    def __init__(self, body: dict[str, Any] | None = None, lines: list[dict[str, Any]] | None = None) -> None:
        self.status = 200
        self._body = body or {}
        self.content = asyncio.StreamReader()
        for line in lines or []:
            self.content.feed_data(json.dumps(line).encode() + b"\n")
        self.content.feed_eof()

    async def json(self) -> dict[str, Any]:
        return self._body

    def release(self) -> None:
        pass


def pod(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "shop", "resourceVersion": version}}


async def test_reflector_counts_events_relists_and_errors() -> None:
    labels = {"cluster": "refl-east", "kind": "pods"}
    before = {
        name: value(name, **labels)
        for name in (
            "isthmus_member_cluster_watch_events_total",
            "isthmus_member_cluster_relists_total",
            "isthmus_member_cluster_watch_errors_total",
        )
    }
    calls: list[str] = []
    done = asyncio.Event()

    async def list_fn(**kw: Any) -> FakeResponse:
        if not kw.get("watch"):
            calls.append("list")
            return FakeResponse({"metadata": {"resourceVersion": "1"}, "items": [pod("a", "1")]})
        calls.append("watch")
        if calls.count("watch") == 1:
            events = [
                {"type": "ADDED", "object": pod("b", "2")},
                {"type": "MODIFIED", "object": pod("b", "3")},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "4"}}},
                {"type": "ERROR", "object": {"code": 410, "message": "too old"}},
            ]
            return FakeResponse(lines=events)
        if calls.count("watch") == 2:
            raise ConnectionError("refused")
        done.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    timing = Timing(backoff_initial=0.01, backoff_max=0.01)
    reflector = Reflector("pods", list_fn, lambda keys: None, timing=timing, cluster="refl-east")
    task = asyncio.create_task(reflector.run())
    try:
        await asyncio.wait_for(done.wait(), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert calls[:4] == ["list", "watch", "list", "watch"], calls
    assert (
        value("isthmus_member_cluster_watch_events_total", **labels)
        == before["isthmus_member_cluster_watch_events_total"] + 2
    )  # the bookmark is not an event
    assert value("isthmus_member_cluster_relists_total", **labels) == (
        before["isthmus_member_cluster_relists_total"] + 1  # the first list is no relist
    )
    assert value("isthmus_member_cluster_watch_errors_total", **labels) == (
        before["isthmus_member_cluster_watch_errors_total"] + 1
    )
    # A reflector of the home cluster (no member cluster) is not counted.
    home = Reflector("secrets", list_fn, lambda keys: None)
    assert not home._counted


# ---- the CA ----------------------------------------------------------------------------------


def test_certificates_issued_and_rotated() -> None:
    now = [datetime.datetime(2026, 11, 23, 12, 0, tzinfo=datetime.UTC)]
    ca = MeshCA(*MeshCA.generate_root("metrics.test"), ttl=datetime.timedelta(hours=2), clock=lambda: now[0])

    def counts() -> tuple[float, float, float, float]:
        return (
            value("isthmus_ca_certificates_issued_total", kind="workload"),
            value("isthmus_ca_certificates_rotated_total", kind="workload"),
            value("isthmus_ca_certificates_issued_total", kind="serving"),
            value("isthmus_ca_certificates_rotated_total", kind="serving"),
        )

    start = counts()
    ca.certificate("shop", "web")
    ca.certificate("shop", "web")  # the same one
    ca.certificate("shop", "api")
    ca.serving_certificate(("127.0.0.1",))
    assert [b - a for a, b in zip(start, counts(), strict=True)] == [2, 0, 1, 0]
    now[0] += datetime.timedelta(hours=1, minutes=1)  # past half-life
    assert len(ca.rotate_due()) == 2
    ca.serving_certificate(("127.0.0.1",))  # due: issued again on use
    assert [b - a for a, b in zip(start, counts(), strict=True)] == [4, 2, 2, 1]


# ---- the cache: views and generation ---------------------------------------------------------


def test_views_and_generation_per_type() -> None:
    cache = ConfigCache()
    proxy = Proxy("gen-1", Role.SIDECAR, "shop", "client", "client", Locality("r", "z", "gen-east"))
    views = value("isthmus_mesh_views_total")
    generated = value("isthmus_mesh_view_generation_seconds_count", type="cds")
    view = MeshView.build((), [MemberCluster("gen-east")])
    assert cache.set_view(view)
    assert not cache.set_view(view)  # the same version: not a new view
    assert value("isthmus_mesh_views_total") == views + 1
    info = samples("isthmus_mesh_view_info")
    assert info == [({"version": view.version}, 1.0)], "one series: the current version"
    cache.resources(types.CLUSTER, proxy)
    after = value("isthmus_mesh_view_generation_seconds_count", type="cds")
    assert after > generated
    cache.resources(types.CLUSTER, proxy)  # memoized: nothing generated
    assert value("isthmus_mesh_view_generation_seconds_count", type="cds") == after


def test_event_since_gives_the_earliest_event_of_the_views_in_between() -> None:
    cache = ConfigCache()
    aggregator = Aggregator(cache.set_view)
    start = cache.generation
    aggregator.set_shard("kube", shard("ev-a", "127.0.3.1"))
    aggregator.flush()
    first = cache.event_since(start, cache.generation)
    assert first is not None
    middle = cache.generation
    cache.set_view(MeshView.build((), ()))  # no event
    aggregator.set_shard("kube", shard("ev-a", "127.0.3.2"))
    aggregator.flush()
    later = cache.event_since(middle, cache.generation)
    assert later is not None
    assert later >= first
    assert cache.event_since(start, cache.generation) == first
    assert cache.event_since(cache.generation, cache.generation) is None


# ---- the send budget -------------------------------------------------------------------------


async def test_send_budget_gauges_follow_the_budget() -> None:
    # The gauges sum over live servers: no server of an earlier test may be collected meanwhile.
    gc.collect()
    gc.disable()
    try:
        limit = value("isthmus_xds_send_budget_limit_bytes")
        used = value("isthmus_xds_send_budget_used_bytes")
        server = AdsServer(ConfigCache(), "127.0.0.1:0")
        assert value("isthmus_xds_send_budget_limit_bytes") == limit + server.limits.send_budget
        held = await server._budget.acquire(1000)
        assert value("isthmus_xds_send_budget_used_bytes") == used + 1000
        waiter = asyncio.create_task(server._budget.acquire(server.limits.send_budget))
        await asyncio.sleep(0)
        assert value("isthmus_xds_send_budget_waiting_responses") >= 1
        server._budget.release(held)
        server._budget.release(await waiter)
        assert value("isthmus_xds_send_budget_used_bytes") == used
    finally:
        gc.enable()


# ---- GET /metrics ----------------------------------------------------------------------------


@pytest.fixture
def admin_tokens(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "admin-tokens.csv"
    path.write_text("prom-token,prometheus,read\n")
    return path


async def get(url: str, token: str | None = None) -> tuple[int, str, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


@pytest.mark.parametrize("with_auth", [False, True], ids=["open", "token"])
async def test_metrics_endpoint_serves_the_text_format(admin_tokens: Path, with_auth: bool) -> None:
    check = AdminTokens(admin_tokens).check if with_auth else None
    app = make_admin_app(lambda: Readiness(True, "serving"), dict, check=check)
    runner = await start_admin(app, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        if with_auth:
            status, _, body = await get(base + "/metrics")
            assert status == 401, body
            assert (await get(base + "/metrics", "wrong"))[0] == 401
            assert (await get(base + "/healthz"))[0] == 200  # the probes stay open
        status, content_type, body = await get(base + "/metrics", "prom-token" if with_auth else None)
        assert status == 200, body
        assert content_type == CONTENT_TYPE_PLAIN_0_0_4, content_type
        names = {f.name for f in text_string_to_metric_families(body)}
        assert {"isthmus_xds_connected_proxies", "isthmus_member_cluster_state"} <= names
        assert "process_cpu_seconds" in names
        # Prometheus asks for OpenMetrics first, and gets it.
        headers = {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"}
        if with_auth:
            headers["Authorization"] = "Bearer prom-token"
        async with (
            aiohttp.ClientSession() as session,
            session.get(base + "/metrics", headers=headers) as resp,
        ):
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
            names = {f.name for f in openmetrics_families(await resp.text())}
        assert {"isthmus_xds_responses", "isthmus_proxy_convergence_seconds"} <= names
    finally:
        await runner.cleanup()
