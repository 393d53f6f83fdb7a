"""Kubernetes discovery cost: initial sync of a large multi-cluster mesh, and one endpoint event.

W1 of docs/benchmarks.md: 3 clusters x 1,000 services x 10 endpoints, each cluster a FakeKubeApi
(tests/kubeapi) in a child process, so CPU and RSS are isthmus's own; seeding is not measured.
Production defaults (reflector Timing, the watcher's 10 ms coalescing, aggregator quiet 0.1 s / max
delay 1 s). Measured: sync (start -> complete view, and -> last shard handed over; CPU; max-RSS);
events (one endpoint's ready flipped in one EndpointSlice: API write -> view published, split where
the shard reaches the aggregator; CPU per event; gen-2 GC pauses); the CPU of one event without the
debounce sleeps (watch event -> incremental shard -> flush) and of the full paths taken on relists
and by the file source (shard_of of a cluster, merge() of all shards, MeshView.build).
Usage: python -m bench.discovery [--quick] [--profile] [--clusters N] [--services N] [--endpoints N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import itertools
import multiprocessing
import platform
import pstats
import resource
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from isthmus.discovery.aggregate import Aggregator, Shard, merge
from isthmus.discovery.kube.convert import REGION_LABEL, SERVICE_NAME_LABEL, ZONE_LABEL
from isthmus.discovery.kube.gateway import INBOUND_PORT_ANNOTATION
from isthmus.discovery.kube.members import Members
from isthmus.discovery.model import ClusterState, Health, MeshView, ServiceKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from kubeapi.kubeconfig import write_kubeconfig
from kubeapi.server import FakeKubeApi

Obj = dict[str, Any]
Rows = list[tuple[str, str]]
OneEvent = Callable[[], MeshView]
NAMESPACES = 10


@dataclass(frozen=True, slots=True)
class Shape:
    clusters: int
    services: int
    endpoints: int

    @property
    def total(self) -> int:
        return self.clusters * self.services * self.endpoints

    @property
    def nodes(self) -> int:
        return max(3, self.services * self.endpoints // 100)

    def address(self, c: int, s: int, e: int) -> str:
        x = s * self.endpoints + e
        return f"10.{c}.{x // 256 % 256}.{x % 256}"

    def node(self, s: int, e: int) -> str:
        return f"node-{(s * self.endpoints + e) % self.nodes}"


def namespace(s: int) -> str:
    return f"bench-{s % NAMESPACES}"


def endpoint_slice(
    shape: Shape, c: int, s: int, unready: int | None = None, moved: dict[int, str] | None = None
) -> Obj:
    """Service s's slice in cluster c; ``moved`` gives endpoints a new address (endpoint -> address)."""
    ns = namespace(s)
    moved = moved or {}
    endpoints = [
        {
            "addresses": [moved.get(e) or shape.address(c, s, e)],
            "conditions": {"ready": e != unready, "serving": True, "terminating": False},
            "nodeName": shape.node(s, e),
            "targetRef": {"kind": "Pod", "namespace": ns, "name": f"svc-{s}-{e}"},
        }
        for e in range(shape.endpoints)
    ]
    meta = {"name": f"svc-{s}-x7k2p", "namespace": ns, "labels": {SERVICE_NAME_LABEL: f"svc-{s}"}}
    ports = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    head = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta}
    return head | {"addressType": "IPv4", "ports": ports, "endpoints": endpoints}


def seed(api: FakeKubeApi, shape: Shape, c: int, sidecar_port: int | None = None) -> None:
    """Cluster c's objects; with ``sidecar_port``, every pod has a sidecar (mTLS endpoints)."""

    def create(kind: str, meta: Obj, **body: Any) -> None:
        api.create({"apiVersion": "v1", "kind": kind, "metadata": meta, **body})

    for i in range(NAMESPACES):
        create("Namespace", {"name": f"bench-{i}"})
    for n in range(shape.nodes):
        create("Node", {"name": f"node-{n}", "labels": {REGION_LABEL: f"r{c}", ZONE_LABEL: f"r{c}-z{n % 3}"}})
    port = {"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"}
    for s in range(shape.services):
        create("Service", {"name": f"svc-{s}", "namespace": namespace(s)}, spec={"ports": [port]})
        api.create(endpoint_slice(shape, c, s))
        for e in range(shape.endpoints):
            spec = {"serviceAccountName": f"sa-{s}", "nodeName": shape.node(s, e)}
            meta = {"name": f"svc-{s}-{e}", "namespace": namespace(s)}
            if sidecar_port is not None:
                meta["annotations"] = {INBOUND_PORT_ANNOTATION: str(sidecar_port)}
            create("Pod", meta, spec=spec)


def serve(
    conn: Connection,
    shape: Shape,
    sidecar_port: int | None = None,
    accounts: list[tuple[int, str, str]] | None = None,
) -> None:
    """Child process: the fake API servers; applies ``(cluster, object)`` updates sent by the parent.
    With ``accounts`` ((cluster, namespace, service account), one per simulated proxy) it also sends,
    after the servers' URLs, a service-account token for each (audience isthmus, an hour), and at
    the end the number of TokenReviews the servers answered."""

    async def run() -> None:
        apis = [FakeKubeApi() for _ in range(shape.clusters)]
        for c, api in enumerate(apis):
            seed(api, shape, c, sidecar_port)
            await api.start()
        conn.send([(api.url, api.token) for api in apis])
        if accounts is not None:
            conn.send([apis[c].issue_token(namespace, account) for c, namespace, account in accounts])
        stop = asyncio.Event()

        def command() -> None:
            with contextlib.suppress(EOFError):
                if (message := conn.recv()) is not None:
                    apis[message[0]].update(message[1])
                    return
            stop.set()

        asyncio.get_running_loop().add_reader(conn.fileno(), command)
        await stop.wait()
        if accounts is not None:
            conn.send(sum(api.token_reviews for api in apis))
        for api in apis:
            await api.stop()

    asyncio.run(run())


class Recorder(Aggregator):
    """The production Aggregator (quiet 0.1 s, max delay 1 s) noting when each shard arrives (after the
    watcher's conversion) and each view is published, and timing the gen-2 GC pauses."""

    def __init__(self) -> None:
        super().__init__(self.on_view)
        self.view, self.at, self.published = MeshView(), 0.0, asyncio.Event()
        self.shard_sets, self.last_set, self.gc_start, self.gc2_ms = 0, 0.0, 0.0, list[float]()
        self.tasks: list[asyncio.Task[None]] = []  # its own run() and Members.run(), cancelled at the end
        gc.callbacks.append(self.on_gc)

    def set_shard(self, source: str, shard: Shard) -> None:
        self.shard_sets, self.last_set = self.shard_sets + 1, time.perf_counter()
        super().set_shard(source, shard)

    def on_view(self, view: MeshView) -> None:
        self.view, self.at = view, time.perf_counter()
        self.published.set()

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.gc_start = time.perf_counter()
        elif info["generation"] == 2:
            self.gc2_ms.append((time.perf_counter() - self.gc_start) * 1000)

    async def until(self, check: Callable[[MeshView], bool], within: float = 600.0) -> MeshView:
        async with asyncio.timeout(within):
            while not check(self.view):
                self.published.clear()
                await self.published.wait()
        return self.view


def reflects(key: ServiceKey, address: str, unready: bool) -> Callable[[MeshView], bool]:
    health = Health.UNHEALTHY if unready else Health.HEALTHY
    return lambda v: any(e.address == address and e.health is health for e in v.services[key].endpoints)


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def median_ms(fn: Callable[[], object]) -> float:  # with the GC on, as in production
    return statistics.median(timeit.repeat(fn, setup="gc.enable()", number=1, repeat=10)) * 1000


async def sync(agg: Recorder, static: dict[str, Path], shape: Shape) -> tuple[Members, Rows]:
    """Start Members and wait for the complete view: every cluster SYNCED, every endpoint."""
    rss0, cpu0, t0 = maxrss_mib(), time.process_time(), time.perf_counter()
    members = Members(agg, static=static)
    agg.tasks.append(asyncio.create_task(members.run()))
    await agg.until(
        lambda v: (
            len(v.clusters) == shape.clusters
            and all(m.state is ClusterState.SYNCED for m in v.clusters.values())
            and sum(len(s.endpoints) for s in v.services.values()) == shape.total
        )
    )
    cpu, rss = time.process_time() - cpu0, maxrss_mib()
    return members, [
        ("sync: start -> complete view published", f"{agg.at - t0:.2f} s"),
        ("sync: start -> last shard handed over (no final quiet)", f"{agg.last_set - t0:.2f} s"),
        ("sync: process CPU", f"{cpu:.2f} s"),
        ("sync: max RSS growth (max RSS after)", f"{rss - rss0:.0f} MiB ({rss:.0f} MiB)"),
        ("sync: shards handed over / views published", f"{agg.shard_sets} / {agg.flushes}"),
    ]


async def live_events(agg: Recorder, conn: Connection, shape: Shape, events: int) -> Rows:
    """Flip one endpoint's ready condition through the API server, ``events`` times, one at a time."""
    unready: dict[tuple[int, int], bool] = {}
    walls, splits = list[float](), list[float]()
    cpu0 = time.process_time()
    agg.gc2_ms.clear()
    for i in range(events):
        c, s = i % shape.clusters, (i * 7) % shape.services
        flip = unready[(c, s)] = not unready.get((c, s), False)
        check = reflects(ServiceKey(namespace(s), f"svc-{s}"), shape.address(c, s, 0), flip)
        start = time.perf_counter()
        conn.send((c, endpoint_slice(shape, c, s, unready=0 if flip else None)))
        await agg.until(check, within=30.0)
        walls.append((agg.at - start) * 1000)
        splits.append((agg.last_set - start) * 1000)
        await asyncio.sleep(0.05)
    if not events:
        return []
    cpu = (time.process_time() - cpu0) / events * 1000
    quiet = [w - s for w, s in zip(walls, splits, strict=True)]
    gcs = agg.gc2_ms
    p50, p90 = statistics.median(walls), sorted(walls)[int(0.9 * (len(walls) - 1))]
    wall = f"{p50:.0f} / {p90:.0f} / {max(walls):.0f} ms"
    return [
        (f"event: write -> view published, p50 / p90 / max (n={events})", wall),
        ("event: write -> shard handed over, p50", f"{statistics.median(splits):.0f} ms"),
        ("event: shard handed over -> view published, p50", f"{statistics.median(quiet):.0f} ms"),
        ("event: process CPU per event (live path)", f"{cpu:.1f} ms"),
        ("event: gen-2 GCs (count, median)", f"{len(gcs)}, {statistics.median(gcs or [0]):.1f} ms"),
    ]


def cpu_costs(agg: Recorder, members: Members, shape: Shape) -> tuple[OneEvent, Rows]:
    """CPU of one event without the debounce sleeps, and of the full paths; returns the event."""
    watcher = members.members["c0"].watcher
    slices, flips = watcher._reflectors["endpointslices"], itertools.count()

    def one_event() -> MeshView:  # what the live path does: watch event, incremental shard, flush
        slices._apply({"type": "MODIFIED", "object": endpoint_slice(shape, 0, 0, unready=next(flips) % 2)})
        watcher._publish()
        return agg.flush()

    shards, view = list(agg.shards.values()), agg.view
    t_merge = median_ms(lambda: merge(shards))
    t_build = median_ms(lambda: MeshView.build(view.services.values(), view.clusters.values()))
    return one_event, [
        ("CPU: one event without debounce (event -> shard -> view)", f"{median_ms(one_event):.2f} ms"),
        ("CPU: full path: shard_of of one cluster (build_shard)", f"{median_ms(watcher.build_shard):.1f} ms"),
        (f"CPU: full path: merge() of {len(shards)} shards, MeshView.build included", f"{t_merge:.1f} ms"),
        ("CPU: full path: MeshView.build alone (sort + content hash)", f"{t_build:.1f} ms"),
    ]


async def bench(conn: Connection, urls: list[tuple[str, str]], shape: Shape, events: int) -> OneEvent:
    """Run the measurements, print the table; return one event's CPU path (for the profiler)."""
    agg = Recorder()
    agg.tasks.append(asyncio.create_task(agg.run()))
    with tempfile.TemporaryDirectory() as tmp:  # Members polls the kubeconfigs: keep them until the end
        static = {f"c{c}": write_kubeconfig(Path(tmp) / f"c{c}", *u, f"c{c}") for c, u in enumerate(urls)}
        try:
            members, rows = await sync(agg, static, shape)
            rows += await live_events(agg, conn, shape, events)
            one_event, cpu_rows = cpu_costs(agg, members, shape)
        finally:
            for task in agg.tasks:
                task.cancel()
            await asyncio.gather(*agg.tasks, return_exceptions=True)
    width = max(len(name) for name, _ in rows + cpu_rows)
    print(f"| {'measurement':<{width}} | figure |\n|{'-' * (width + 2)}|--------|")
    for name, figure in rows + cpu_rows:
        print(f"| {name:<{width}} | {figure} |")
    return one_event


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="3 x 50 x 3, 10 events (a sanity run)")
    for name, default in [("clusters", 3), ("services", 1000), ("endpoints", 10), ("events", 30)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--profile", action="store_true", help="cProfile one event's CPU path")
    args = parser.parse_args()
    if args.quick:
        args.clusters, args.services, args.endpoints, args.events = 3, 50, 3, 10
    shape = Shape(args.clusters, args.services, args.endpoints)
    print(f"# isthmus discovery bench on {platform.machine()} python {platform.python_version()}")
    mesh = f"{shape.clusters} clusters x {shape.services} services x {shape.endpoints} endpoints"
    print(f"mesh: {mesh} = {shape.total:,} endpoints; fake API servers in a child process")
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=serve, args=(child, shape), daemon=True)
    server.start()
    try:
        start = time.perf_counter()
        urls = parent.recv()
        print(f"seeded in {time.perf_counter() - start:.1f} s (not measured)\n")
        one_event = asyncio.run(bench(parent, urls, shape, args.events))
    finally:
        parent.send(None)
        server.join(10)
        if server.is_alive():
            server.terminate()
    if args.profile:
        profiler = cProfile.Profile()
        for _ in range(100):
            profiler.runcall(one_event)
        print("\ncProfile, 100 x one event without debounce (event -> shard -> view), top 10 by cumulative:")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(10)


if __name__ == "__main__":
    main()
