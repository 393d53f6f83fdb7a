"""Prometheus metrics against real Envoys (issue 15), scraped from GET /metrics and parsed with
prometheus-client's parser:

* ``isthmus serve`` with a token-protected admin API and two Envoys (SotW and Delta): /metrics needs
  the token (Prometheus sends one); the connected proxies gauge is one per Envoy by mode and two in
  all; responses and ACK latencies of every type the Envoys subscribe to; the mesh file's cluster
  static; the view info's version is /readyz's. An endpoint added to the mesh file: a new view,
  EDS responses to both Envoys, and the convergence histogram's count up by at least one per Envoy.
  An Envoy stopped: the gauge follows.
* A NACK: an in-process ADS server whose CDS generator injects an invalid Cluster (as in
  test_envoy_nack.py), its metrics served by the admin app: NACKs of type cds up by one, no ACK
  latency observed for it, and the corrected version ACKed.

No timings are asserted (figures belong in the benchmarks)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_envoy_nack import EXTRA, Injection

from isthmus.admin.app import Readiness, make_admin_app, start_admin
from isthmus.discovery.file import parse_mesh
from isthmus.xds import types
from isthmus.xds.cache import ConfigCache
from isthmus.xds.generate import GENERATORS
from isthmus.xds.server import AdsServer

pytestmark = pytest.mark.envoy

TOKEN = "prometheus-scrape-token"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int, token: str | None = None) -> Samples:
    """GET /metrics, parsed as Prometheus parses it: {(sample name, labels): value}."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        body = await resp.text()
        assert resp.status == 200, f"/metrics: HTTP {resp.status}: {body[:300]}"
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4"), resp.headers
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


XDS_TYPES = ("cds", "eds", "lds", "rds", "sds")


async def test_metrics_of_a_real_run(procs, mesh, upstreams, eventually, tmp_path) -> None:
    tokens = tmp_path / "admin-tokens.csv"
    tokens.write_text(f"{TOKEN},prometheus,read\n")
    web1 = await upstreams.start("web-1", "127.0.0.1")
    web2 = await upstreams.start("web-2", "127.0.0.2")
    web = mesh.cluster("web")
    mesh.write(mesh.service("web", web1))
    cp = await procs.control_plane(mesh.path, ["--admin-token-file", str(tokens)])

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{cp.admin_port}/metrics") as resp,
    ):
        assert resp.status == 401, "without a token /metrics is refused like the rest of the admin API"

    sotw = await procs.envoy(procs.bootstrap(xds_port=cp.xds_port, delta=False))
    delta = await procs.envoy(procs.bootstrap(xds_port=cp.xds_port, delta=True))
    envoys = [sotw, delta]

    async def hosts(expected: set[str]) -> None:
        for envoy in envoys:
            found = await envoy.admin.cluster_hosts()
            assert set(found.get(web, {})) == expected, found
            reply = await envoy.request("web.shop:80")
            assert reply.status == 200, reply

    await eventually(lambda: hosts({web1.address}), what="both Envoys serve web-1")

    async def settled() -> Samples:
        samples = await scrape(cp.admin_port, TOKEN)
        for mode in ("sotw", "delta"):
            labels = {"cluster": "east", "role": "sidecar", "mode": mode}
            assert get(samples, "isthmus_xds_connected_proxies", **labels) == 1, (mode, samples)
        assert total(samples, "isthmus_xds_connected_proxies") == 2
        for kind in XDS_TYPES:  # every type both Envoys subscribe to was sent and ACKed
            assert get(samples, "isthmus_xds_responses_total", type=kind) >= 2, kind
            assert get(samples, "isthmus_xds_ack_latency_seconds_count", type=kind) >= 2, kind
        return samples

    before = await eventually(settled, what="/metrics shows both Envoys configured")
    assert get(before, "isthmus_xds_nacks_total", type="cds") == 0
    assert get(before, "isthmus_member_cluster_state", cluster="east", state="static") == 1
    assert total(before, "isthmus_member_cluster_state", cluster="east") == 1
    assert get(before, "isthmus_member_cluster_weight_ratio", cluster="east") == 1
    assert get(before, "isthmus_xds_streams_total", mode="sotw") >= 1
    assert get(before, "isthmus_ca_certificates_issued_total", kind="workload") >= 1  # mTLS: SDS
    version = (await cp.readyz())["mesh_version"]
    assert get(before, "isthmus_mesh_view_info", version=version) == 1
    assert total(before, "isthmus_mesh_view_info") == 1
    assert get(before, "isthmus_mesh_view_generation_seconds_count", type="eds") >= 1

    # An endpoint is added: a new view, pushed to both Envoys, each converging once at least.
    mesh.write(mesh.service("web", web1, web2))
    await eventually(lambda: hosts({web1.address, web2.address}), what="web-2 reaches both Envoys")

    async def converged() -> Samples:
        samples = await scrape(cp.admin_port, TOKEN)
        count = "isthmus_proxy_convergence_seconds_count"
        assert get(samples, count) >= get(before, count) + 2, (get(before, count), get(samples, count))
        return samples

    after = await eventually(converged, what="the convergence of both Envoys observed")
    convergence = "isthmus_proxy_convergence_seconds"
    assert get(after, f"{convergence}_sum") > get(before, f"{convergence}_sum")
    buckets = sorted(
        (float(dict(ls)["le"]), v) for (n, ls), v in after.items() if n == f"{convergence}_bucket"
    )
    assert buckets[-1] == (float("inf"), get(after, f"{convergence}_count")), buckets
    assert [v for _, v in buckets] == sorted(v for _, v in buckets), "cumulative buckets"
    eds = "isthmus_xds_responses_total"
    assert get(after, eds, type="eds") >= get(before, eds, type="eds") + 2
    assert get(after, "isthmus_mesh_views_total") >= get(before, "isthmus_mesh_views_total") + 1
    new_version = (await cp.readyz())["mesh_version"]
    assert new_version != version
    assert get(after, "isthmus_mesh_view_info", version=new_version) == 1
    assert total(after, "isthmus_mesh_view_info") == 1
    assert total(after, "isthmus_xds_nacks_total") == 0

    # An Envoy goes away: the gauge follows.
    delta.stop()

    async def one_left() -> None:
        samples = await scrape(cp.admin_port, TOKEN)
        assert total(samples, "isthmus_xds_connected_proxies") == 1, samples
        assert get(samples, "isthmus_xds_connected_proxies", cluster="east", role="sidecar", mode="sotw") == 1

    await eventually(one_left, what="the connected proxies gauge at 1")


# ---- a NACK ----------------------------------------------------------------------------------

# The invalid cluster comes from the NACK test's injection (test_envoy_nack.py).


@dataclass
class InProcess:
    server: AdsServer
    cache: ConfigCache
    injection: Injection
    admin_port: int


@pytest.fixture
async def in_process() -> AsyncIterator[InProcess]:
    injection = Injection()
    cache = ConfigCache(generators={**GENERATORS, types.CLUSTER: injection.clusters})
    server = AdsServer(cache, "127.0.0.1:0")
    await server.start()
    runner = await start_admin(make_admin_app(lambda: Readiness(True, "test"), dict), "127.0.0.1", 0)
    try:
        yield InProcess(server, cache, injection, int(runner.addresses[0][1]))
    finally:
        await runner.cleanup()
        await server.stop(0.5)


async def test_metrics_of_a_nack(delta, in_process, procs, mesh, upstreams, eventually) -> None:
    plane = in_process
    web1 = await upstreams.start("web-1")
    plane.injection.port = web1.port
    plane.cache.set_view(parse_mesh(mesh.text(mesh.service("web", web1)), "test mesh"))
    assert plane.server.port is not None
    mode = "delta" if delta else "sotw"
    envoy = await procs.envoy(procs.bootstrap(xds_port=plane.server.port, delta=delta))

    async def configured() -> Samples:
        reply = await envoy.request("web.shop:80")
        assert (reply.status, reply.upstream) == (200, "web-1"), reply
        samples = await scrape(plane.admin_port)
        labels = {"cluster": "east", "role": "sidecar", "mode": mode}
        assert get(samples, "isthmus_xds_connected_proxies", **labels) == 1, samples
        statuses = plane.server.proxy_status(envoy.bootstrap.node_id)
        cds = statuses[0].types[types.CLUSTER] if statuses else None
        assert cds is not None, statuses
        assert cds.last_acked_nonce == cds.last_sent_nonce, cds
        return samples

    before = await eventually(configured, what="Envoy configured and counted")
    nacks, acks = "isthmus_xds_nacks_total", "isthmus_xds_ack_latency_seconds_count"
    responses = "isthmus_xds_responses_total"

    # An invalid cluster: Envoy rejects the CDS response.
    plane.injection.enabled = True
    plane.cache.invalidate()

    async def nacked() -> Samples:
        stats = await envoy.admin.rejections()
        assert stats.get("cluster_manager.cds.update_rejected") == 1, stats
        samples = await scrape(plane.admin_port)
        assert get(samples, nacks, type="cds") == get(before, nacks, type="cds") + 1, samples
        return samples

    at_nack = await eventually(nacked, what="the NACK counted with its type")
    assert get(at_nack, responses, type="cds") == get(before, responses, type="cds") + 1
    assert get(at_nack, acks, type="cds") == get(before, acks, type="cds"), "a NACK is no ACK"
    for kind in ("eds", "lds", "rds"):
        assert get(at_nack, nacks, type=kind) == get(before, nacks, type=kind), kind

    # Corrected: accepted, one more ACK, no more NACKs.
    plane.injection.valid = True
    plane.cache.invalidate()

    async def recovered() -> None:
        active = await envoy.admin.active_clusters()
        assert EXTRA in active, sorted(active)
        samples = await scrape(plane.admin_port)
        assert get(samples, acks, type="cds") >= get(at_nack, acks, type="cds") + 1, samples
        assert get(samples, nacks, type="cds") == get(at_nack, nacks, type="cds")

    await eventually(recovered, what="the corrected cluster ACKed")
