"""The floor of issue 6: what one real Envoy takes to apply the load tool's configuration (read from its
admin stats), and what generating, serializing and parsing that configuration costs.

Workload: bench.load's (C member clusters x S services x E endpoints; W1 = 3 x 1000 x 10), served by
bench.load's IsthmusTarget: `isthmus serve --mesh FILE` (``--source file``, the default; through
bench.load's serve-shim, so the file is polled every ``--poll-interval`` s, default 0.02, not 1 s) or
fed by fake Kubernetes API servers (``--source kube``). ONE real Envoy (``--concurrency 1``, admin and
listeners on 127.0.0.1, xDS on loopback) runs as the sidecar of svc-0 in member cluster m0, with a
bootstrap written by `isthmus bootstrap`. Nothing sends it traffic.

Measured:
* serialization, in this process, before anything starts: the file source's parse and merge of the
  mesh file, generating + serializing every type for that Envoy's node (a fresh ConfigCache, best of
  ``--repeat``), the bytes of the SotW responses, and protobuf (upb) parsing the same bytes, as a lower
  bound for any consumer;
* Envoy's cold start (K fresh Envoys in turn, medians; the first one also waits for isthmus to
  generate its configuration, later ones get it memoized), from its stats:
  ``server.initialization_time_ms``, the ``update_duration`` histogram of every xDS subscription (CDS,
  the EDS of each cluster, LDS, RDS, SDS: the time its onConfigUpdate took, integer ms, truncated) and
  the ``update_time`` gauges (epoch ms when each was applied), which put them on one timeline with the
  spawn and with the receipt of each response (its ``config`` debug log, in epoch ms); its CPU, peak
  RSS and xDS bytes received;
* M endpoint changes, each in m0 (the only member whose pod addresses this Envoy sees; remote members
  appear as their gateway): write -> response received, -> the cluster's ``update_time`` (applied),
  -> the new address visible in config_dump (polled), and the EDS ``update_duration`` of that update.

Usage: python -m bench.floor [--quick] [--source file|kube] [--clusters C] [--services S] [--endpoints E]
       [--changes M] [--cold-runs K] [--mtls/--no-mtls] [--delta] [--poll-interval SEC] [--repeat N]
       [--csv FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.internal import api_implementation
from google.protobuf.message import Message

from bench.discovery import namespace
from bench.load import (
    CLK_TCK,
    ROOT,
    VENV_BIN,
    IsthmusTarget,
    Shape,
    Workload,
    free_port,
    member,
    pct,
    proc_usage,
    region,
    service_account,
    service_name,
    zone,
)
from isthmus.discovery.aggregate import merge, shards_of_view
from isthmus.discovery.file import parse_mesh
from isthmus.discovery.model import MeshView, ServiceKey
from isthmus.xds import types
from isthmus.xds.ca import MeshCA
from isthmus.xds.cache import ConfigCache
from isthmus.xds.naming import outbound_cluster
from isthmus.xds.proxy import Proxy, proxy_from_node
from isthmus.xds.resources import sotw_response

MESSAGES: dict[str, type[Message]] = {
    types.CLUSTER: cluster_pb2.Cluster,
    types.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    types.LISTENER: listener_pb2.Listener,
    types.ROUTE: route_pb2.RouteConfiguration,
    types.SECRET: secret_pb2.Secret,
}
Row = dict[str, Any]


# ---- the Envoy ------------------------------------------------------------------------------


def envoy_binary() -> str:
    candidate = VENV_BIN / "envoy"
    found = str(candidate) if candidate.exists() else shutil.which("envoy")
    if found is None:
        raise SystemExit("no envoy binary (install isthmus[envoy])")
    return found


def envoy_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=False)
    match = re.search(r"version: \S+?/(\d+\.\d+\.\d+\S*?)/", out.stdout + out.stderr)
    return match.group(1) if match else (out.stdout + out.stderr).strip()


def cluster_name(view: MeshView, s: int) -> str:
    """The sidecar's EDS cluster of service s (its one port in bench.load's mesh file)."""
    service = view.services[ServiceKey(namespace(s), service_name(s))]
    return outbound_cluster(service, service.ports[0])


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket of an Envoy histogram: values in [lower, lower + width), ``count`` of them."""

    lower: float
    width: float
    count: int

    @property
    def low(self) -> float:
        return self.lower

    @property
    def high(self) -> float:
        # Durations are recorded in whole milliseconds (truncated): a value v means [v, v + 1) ms.
        return self.lower + max(self.width, 1.0)


@dataclass(slots=True)
class Stats:
    """Counters, gauges and histograms (detailed buckets) of one /stats answer."""

    values: dict[str, Any]
    histograms: dict[str, list[Bucket]]

    def num(self, name: str, default: float = float("nan")) -> float:
        value = self.values.get(name)
        return float(value) if isinstance(value, int | float) else default

    def matching(self, pattern: str) -> dict[str, float]:
        rx = re.compile(pattern)
        return {k: float(v) for k, v in self.values.items() if rx.search(k) and isinstance(v, int | float)}

    def hist(self, pattern: str) -> dict[str, list[Bucket]]:
        rx = re.compile(pattern)
        return {k: v for k, v in self.histograms.items() if rx.search(k)}


def hist_summary(hists: list[list[Bucket]]) -> tuple[int, float, float, float]:
    """(samples, sum low, sum high, max low) over histograms of whole-ms durations."""
    n, low, high, top = 0, 0.0, 0.0, float("nan")
    for buckets in hists:
        for b in buckets:
            n += b.count
            low += b.low * b.count
            high += b.high * b.count
            if b.count and not (b.low <= top):
                top = b.low
    return n, low, high, top


def new_samples(before: list[Bucket], after: list[Bucket]) -> list[float]:
    """The values recorded between two reads of one histogram (bucket lower bounds)."""
    seen = {(b.lower, b.width): b.count for b in before}
    out: list[float] = []
    for b in after:
        out += [b.low] * (b.count - seen.get((b.lower, b.width), 0))
    return out


class Admin:
    """Envoy's admin API on loopback (plain urllib: one short connection per call)."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as r:
                return int(r.status), r.read()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read()

    def stats(self, pattern: str) -> Stats:
        query = urllib.parse.urlencode({"format": "json", "histogram_buckets": "detailed", "filter": pattern})
        status, body = self.get(f"/stats?{query}")
        if status != 200:
            raise RuntimeError(f"/stats: HTTP {status}: {body[:300]!r}")
        values: dict[str, Any] = {}
        histograms: dict[str, list[Bucket]] = {}
        for entry in json.loads(body).get("stats", []):
            if "name" in entry:
                values[entry["name"]] = entry.get("value", 0)
            elif "histograms" in entry:
                for h in entry["histograms"].get("details", []):
                    histograms[h["name"]] = [
                        Bucket(float(b["lower_bound"]), float(b["width"]), int(b["count"]))
                        for b in h.get("totals", [])
                    ]
        return Stats(values, histograms)

    def live(self) -> bool:
        try:
            status, _ = self.get("/ready", timeout=2)
        except OSError:
            return False
        return status == 200

    def endpoint_addresses(self, cluster: str) -> set[str]:
        """The addresses in the ClusterLoadAssignment Envoy holds for one cluster (config_dump)."""
        query = urllib.parse.urlencode(
            {"resource": "dynamic_endpoint_configs", "name_regex": "^" + re.escape(cluster) + "$"}
        )
        status, body = self.get(f"/config_dump?include_eds&{query}")
        if status != 200:
            return set()
        found = set()
        for config in json.loads(body).get("configs", []):
            for group in config.get("endpoint_config", {}).get("endpoints", []):
                for lb in group.get("lb_endpoints", []):
                    sock = lb.get("endpoint", {}).get("address", {}).get("socket_address", {})
                    if "address" in sock:
                        found.add(sock["address"])
        return found


def unflushed(st: Stats) -> dict[str, int]:
    """Updates counted (``update_success``) whose ``update_duration`` sample is not in the histograms
    yet, by subscription: Envoy merges histogram samples into what /stats shows only at its stats
    flush (every 5 s)."""
    missing = {}
    for name, value in st.values.items():
        if name.endswith(".update_success"):
            stem = name.removesuffix(".update_success")
            buckets = st.histograms.get(stem + ".update_duration")
            if buckets is None:  # not an xDS subscription (the static xDS cluster counts updates too)
                continue
            if int(value) > sum(b.count for b in buckets):
                missing[stem] = int(value) - sum(b.count for b in buckets)
    return missing


def flushed(admin: Admin, pattern: str, timeout: float = 15.0) -> Stats:
    """/stats once every update's duration and the initialization time are in the histograms (the next
    stats flush), or after ``timeout`` s; ``pattern`` must select update_success and update_duration."""
    deadline = time.monotonic() + timeout
    while True:
        st = admin.stats(pattern)
        init = st.histograms.get("server.initialization_time_ms")
        if (not unflushed(st) and (init is None or init)) or time.monotonic() > deadline:
            return st
        time.sleep(0.2)


class Child:
    """A subprocess with its output in a log file, stopped (by its pid only) in ``stop``."""

    def __init__(self, name: str, argv: list[str], log: Path, stop_signal: int = signal.SIGTERM) -> None:
        self.name = name
        self.log_path = log
        self.stop_signal = stop_signal
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"<cannot read {self.log_path}: {exc}>"

    def check(self) -> bool:
        """True while it runs; raises, with the tail of its log, once it has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
        return True

    def stop(self, grace: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextmanager
def children() -> Iterator[list[Child]]:
    """Every child started goes in the list; all are stopped on the way out, last started first."""
    started: list[Child] = []
    try:
        yield started
    except BaseException:
        for child in started:
            print(f"---- {child.name} log tail ({child.log_path}):\n{child.tail()}", file=sys.stderr)
        raise
    finally:
        for child in reversed(started):
            try:
                child.stop()
            except Exception as exc:  # keep stopping the others
                print(f"could not stop {child.name}: {exc!r}", file=sys.stderr)


def wait_until(check: Callable[[], bool], what: str, timeout: float, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s")
        time.sleep(interval)


def settle(pid: int, timeout: float, window: float = 0.5, busy: float = 0.1) -> float:
    """Wait until the process uses less than ``busy`` of a CPU over ``window`` s; returns how long it
    was busy (the wait without that last quiet window)."""
    t0 = time.monotonic()
    last, _ = proc_usage(pid)
    while time.monotonic() - t0 < timeout:
        time.sleep(window)
        cpu, _ = proc_usage(pid)
        if cpu - last < busy * window:
            break
        last = cpu
    return time.monotonic() - t0 - window


# Envoy logs with the epoch time (%E seconds, %e milliseconds): the same clock as update_time gauges.
ENVOY_LOG_FORMAT = "[%E.%e][%n] %v"
RECEIVED = re.compile(
    r"^\[(\d+\.\d+)\]\[config\] Received (?:gRPC message|DeltaDiscoveryResponse) for (\S+?)[ ,]"
)


def received(log: Path) -> list[tuple[float, str]]:
    """(epoch s, short type) of every xDS response the Envoy logged receiving (config:debug)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        match = RECEIVED.match(line)
        if match:
            out.append((float(match.group(1)), types.short(match.group(2))))
    return out


# ---- serialization --------------------------------------------------------------------------


def best_of(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def node_of(bootstrap: Path) -> base_pb2.Node:
    """The Node of a bootstrap written by `isthmus bootstrap` (what the Envoy sends)."""
    doc = yaml.safe_load(bootstrap.read_text())
    return json_format.ParseDict(doc["node"], base_pb2.Node())


def generate_all(view: MeshView, proxy: Proxy, ca: MeshCA | None) -> dict[str, bytes]:
    """Every type for ``proxy`` from a fresh cache, as the SotW DiscoveryResponse bytes."""
    cache = ConfigCache(view, ca=ca)
    return {
        t: sotw_response(t, "v1", "n1", cache.resources(t, proxy).values())
        for t in types.PUSH_ORDER
        if t != types.SECRET or ca is not None
    }


def parse_all(responses: dict[str, bytes]) -> list[Message]:
    """Parse every response and every resource in it (top level: nested Anys stay bytes)."""
    out: list[Message] = []
    for t, raw in responses.items():
        cls = MESSAGES[t]
        for any_ in discovery_pb2.DiscoveryResponse.FromString(raw).resources:
            out.append(cls.FromString(any_.value))
    return out


def unpack_nested(message: Message) -> int:
    """Parse every nested Any (typed_config, transport sockets ...) as Envoy does; returns how many."""
    n = 0
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if not field.is_repeated:
            items = [value]
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            items = list(value.values())
        else:
            items = list(value)
        for item in items:
            if not isinstance(item, Message):  # a map of scalars
                continue
            if isinstance(item, any_pb2.Any):
                name = item.type_url.rsplit("/", 1)[-1]
                try:
                    descriptor = descriptor_pool.Default().FindMessageTypeByName(name)
                except KeyError:
                    continue
                inner = message_factory.GetMessageClass(descriptor).FromString(item.value)
                n += 1 + unpack_nested(inner)
            else:
                n += unpack_nested(item)
    return n


def measure_serialization(text: str, node: base_pb2.Node, mtls: bool, repeat: int) -> tuple[Row, MeshView]:
    row: Row = {}
    row["ser_file_parse_ms"] = best_of(lambda: parse_mesh(text, "mesh.yaml"), repeat) * 1e3
    parsed = parse_mesh(text, "mesh.yaml")
    row["ser_merge_ms"] = best_of(lambda: merge(shards_of_view(parsed)), repeat) * 1e3
    view = merge(shards_of_view(parsed))
    proxy = proxy_from_node(node)
    ca = MeshCA.development(None) if mtls else None
    t0 = time.perf_counter()
    responses = generate_all(view, proxy, ca)  # the first one also issues the workload certificate
    row["ser_generate_first_ms"] = (time.perf_counter() - t0) * 1e3
    row["ser_generate_ms"] = best_of(lambda: generate_all(view, proxy, ca), repeat) * 1e3
    for t, raw in responses.items():
        short = types.short(t)
        row[f"ser_{short}_resources"] = len(discovery_pb2.DiscoveryResponse.FromString(raw).resources)
        row[f"ser_{short}_kb"] = len(raw) / 1e3
    row["ser_mb"] = sum(len(raw) for raw in responses.values()) / 1e6
    row["pb_parse_ms"] = best_of(lambda: parse_all(responses), repeat) * 1e3
    messages = parse_all(responses)
    row["pb_nested_any"] = sum(unpack_nested(m) for m in messages)
    row["pb_parse_nested_ms"] = (
        best_of(lambda: [unpack_nested(m) for m in parse_all(responses)], repeat) * 1e3
    )
    row["pb_serialize_ms"] = best_of(lambda: [m.SerializeToString() for m in messages], repeat) * 1e3

    # One endpoint change: the regeneration of EDS after the file source publishes a new view.
    cache = ConfigCache(view, ca=ca)
    for t in responses:
        cache.resources(t, proxy)
    moved = text.replace("address: 10.0.0.0,", "address: 10.250.250.250,", 1)
    changed = merge(shards_of_view(parse_mesh(moved, "mesh.yaml")))

    def one_change() -> None:
        cache.set_view(changed if cache.view is view else view)
        cache.resources(types.ENDPOINT, proxy)

    row["ser_eds_change_ms"] = best_of(one_change, max(3, repeat)) * 1e3
    return row, view


# ---- the run --------------------------------------------------------------------------------


def bootstrap(work: Path, xds: str, delta: bool) -> tuple[Path, int]:
    """Write the sidecar's bootstrap with `isthmus bootstrap`; returns it and its admin port."""
    admin, outbound, inbound = free_port(), free_port(), free_port()
    path = work / "bootstrap.yaml"
    argv = [
        str(VENV_BIN / "isthmus"), "bootstrap",
        "--role", "sidecar",
        "--cluster", member(0),
        "--namespace", namespace(0),
        "--service", service_name(0),
        "--service-account", service_account(0),
        "--region", region(0),
        "--zone", zone(0),
        "--xds-address", xds,
        "--admin-port", str(admin),
        "--listen-address", "127.0.0.1",
        "--outbound-port", str(outbound),
        "--inbound-port", str(inbound),
        "-o", str(path),
        *(["--delta"] if delta else []),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"isthmus bootstrap failed: {done.stderr}")
    return path, admin


class Others:
    """CPU used on this machine by processes other than this tool, the server (and its fake API
    servers) and the Envoy, over a phase: a noisy neighbour shows here, not in the figures' names."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.start = self._split()

    def _split(self) -> tuple[float, float]:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        busy = (user + nice + system + irq + softirq + steal) / CLK_TCK
        me = resource.getrusage(resource.RUSAGE_SELF)
        ours = me.ru_utime + me.ru_stime + sum(proc_usage(pid)[0] for pid in self.pids)
        return busy, ours

    def cpus(self) -> float:
        """Other processes' CPU since the start, in CPUs (1.0 = one core busy all the time)."""
        busy, ours = self._split()
        return max(0.0, (busy - self.start[0]) - (ours - self.start[1])) / (time.monotonic() - self.t0)


def server_pid(target: IsthmusTarget) -> int:
    """The pid of the running `isthmus serve`; raises if it is not running."""
    if target.proc is None or target.proc.poll() is not None:
        raise RuntimeError(f"isthmus serve is not running; see {target.workdir}/isthmus.log")
    return target.proc.pid


def our_pids(target: IsthmusTarget, envoy: Child) -> list[int]:
    apis = [target.apis.pid] if target.apis is not None and target.apis.pid else []
    return [server_pid(target), envoy.proc.pid, *apis]


def at(gauge_ms: float, t0: float) -> float:
    """An update_time gauge (epoch ms) relative to the spawn (epoch s), in ms."""
    return gauge_ms - t0 * 1e3 if gauge_ms == gauge_ms and gauge_ms > 0 else float("nan")


COLD_STATS = (
    r"update_(duration|time|success)$|^server\.initialization_time_ms$|"
    r"^cluster_manager\.(active|warming)_clusters$|^cluster\.isthmus_xds\.upstream_cx_rx_bytes_total$"
)


def cold_start(args: argparse.Namespace, shape: Shape, envoy: Child, admin: Admin, t0: float) -> Row:
    """Wait until the Envoy is LIVE; read the cold start off its stats."""
    row: Row = {}
    wait_until(lambda: envoy.check() and admin.live(), "Envoy LIVE", args.timeout, interval=0.01)
    row["envoy_live_wall_ms"] = (time.time() - t0) * 1e3
    cpu, rss = proc_usage(envoy.proc.pid)
    row["envoy_cold_cpu_s"] = cpu
    row["envoy_cold_rss_mib"] = rss / 2**20
    st = flushed(admin, COLD_STATS)
    if missing := unflushed(st):
        row.setdefault("error_list", []).append(f"cold start: update_duration samples missing: {missing}")
    row["envoy_init_ms"] = hist_summary([st.histograms.get("server.initialization_time_ms", [])])[1]
    row["envoy_clusters"] = int(st.num("cluster_manager.active_clusters"))
    row["envoy_warming_clusters"] = int(st.num("cluster_manager.warming_clusters"))
    row["envoy_xds_rx_mb"] = st.num("cluster.isthmus_xds.upstream_cx_rx_bytes_total") / 1e6

    eds = r"^cluster\.outbound\|.*\.update_"
    eds_success = st.matching(eds + "success$")
    row["envoy_outbound_clusters"] = len(eds_success)
    row["envoy_eds_clusters_updated"] = sum(1 for v in eds_success.values() if v >= 1)
    row["envoy_eds_updates"] = int(sum(eds_success.values()))
    times = [at(v, t0) for v in st.matching(eds + "time$").values() if v > 0]
    row["eds_first_at_ms"] = min(times, default=float("nan"))
    row["eds_last_at_ms"] = max(times, default=float("nan"))
    _, low, high, top = hist_summary(list(st.hist(eds + "duration$").values()))
    row["eds_update_sum_ms"], row["eds_update_sum_high_ms"], row["eds_update_max_ms"] = low, high, top

    first_received: dict[str, float] = {}
    responses: dict[str, int] = {}
    for when, kind in received(envoy.log_path):
        first_received.setdefault(kind, when)
        responses[kind] = responses.get(kind, 0) + 1
    row["envoy_responses"] = " ".join(f"{k}:{responses.get(k, 0)}" for k in types.SHORT_NAMES.values())
    row["eds_recv_at_ms"] = (first_received.get("eds", float("nan")) - t0) * 1e3
    for key, prefix in (
        ("cds", r"^cluster_manager\.cds\."),
        ("lds", r"^listener_manager\.lds\."),
        ("rds", r"^http\..*\.rds\..*\."),
        ("sds", r"^sds\..*\."),
    ):
        _, low, high, top = hist_summary(list(st.hist(prefix + "update_duration$").values()))
        row[f"{key}_update_ms"] = low
        row[f"{key}_update_max_ms"] = top
        row[f"{key}_updates"] = int(sum(st.matching(prefix + "update_success$").values()))
        applied = [at(v, t0) for v in st.matching(prefix + "update_time$").values() if v > 0]
        row[f"{key}_at_ms"] = max(applied, default=float("nan"))
        row[f"{key}_recv_at_ms"] = (first_received.get(key, float("nan")) - t0) * 1e3
    if shape.services and row["envoy_eds_clusters_updated"] != shape.services:
        row.setdefault("error_list", []).append(
            f"cold start: {row['envoy_eds_clusters_updated']} of {shape.services} EDS clusters updated"
        )
    return row


def changes(
    args: argparse.Namespace,
    shape: Shape,
    view: MeshView,
    target: IsthmusTarget,
    admin: Admin,
    envoy: Child,
) -> Row:
    """M endpoint changes in m0, one at a time: make it (file write or API write), watch the Envoy
    apply it."""
    row: Row = {}
    errors: list[str] = []
    applied: list[float] = []
    seen: list[float] = []
    to_envoy: list[float] = []  # file written -> the Envoy received the EDS response
    in_envoy: list[float] = []  # received -> applied
    updated: set[str] = set()
    pattern = (
        r"^cluster\.outbound\|.*\.update_(success|duration)$|"
        r"^(cluster_manager\.cds|listener_manager\.lds|http\..*\.rds\..*)\.update_(success|duration)$"
    )
    before = flushed(admin, pattern)
    cpu0, _ = target.usage()
    for k in range(args.changes):
        change, _ = asyncio.run(target.apply_change(k * shape.clusters))  # i % C == 0: a pod of m0
        written = time.time()  # the new file is in place (os.replace), or the API server has it
        s = next(s for (_, s), moved in target.workload.moved.items() if change.address in moved.values())
        name = cluster_name(view, s)
        deadline = time.monotonic() + args.change_timeout
        while change.address not in admin.endpoint_addresses(name):
            if time.monotonic() > deadline:
                errors.append(f"change {k}: {change.address} never reached {name}")
                break
            time.sleep(0.005)
        else:
            seen.append((time.time() - written) * 1e3)
            gauge = admin.stats("^" + re.escape(f"cluster.{name}.update_time") + "$")
            done = gauge.num(f"cluster.{name}.update_time")
            applied.append(done - written * 1e3)
            updated.add(name)
            eds = [w for w, kind in received(envoy.log_path) if kind == "eds" and w >= written - 0.001]
            if eds:
                to_envoy.append((eds[0] - written) * 1e3)
                in_envoy.append(done - eds[0] * 1e3)
        time.sleep(args.gap + random.uniform(0, args.poll_interval))
    cpu1, _ = target.usage()
    after = flushed(admin, pattern)
    if missing := unflushed(after):
        errors.append(f"changes: update_duration samples missing: {missing}")
    durations: list[float] = []
    for name in updated:
        h = f"cluster.{name}.update_duration"
        durations += new_samples(before.histograms.get(h, []), after.histograms.get(h, []))

    def delta(prefix: str) -> float:
        a, b = (
            before.matching(prefix + r".*\.update_success$"),
            after.matching(prefix + r".*\.update_success$"),
        )
        return sum(b.values()) - sum(a.values())

    m = max(1, args.changes)
    row["change_n"] = len(applied)
    row["change_applied_p50_ms"] = pct(applied, 50)
    row["change_applied_p90_ms"] = pct(applied, 90)
    row["change_applied_max_ms"] = max(applied, default=float("nan"))
    row["change_seen_p50_ms"] = pct(seen, 50)
    row["change_received_p50_ms"] = pct(to_envoy, 50)
    row["change_in_envoy_p50_ms"] = pct(in_envoy, 50)
    row["change_in_envoy_max_ms"] = max(in_envoy, default=float("nan"))
    row["change_eds_update_p50_ms"] = pct(durations, 50)
    row["change_eds_update_max_ms"] = max(durations, default=float("nan"))
    row["change_eds_updates_per_change"] = delta(r"^cluster\.outbound") / m
    row["change_cds_lds_rds_updates"] = int(delta(r"^(cluster_manager|listener_manager|http)\."))
    row["change_isthmus_cpu_ms"] = (cpu1 - cpu0) / m * 1e3
    row["error_list"] = errors
    return row


def run(args: argparse.Namespace, shape: Shape, work: Path) -> Row:
    binary = envoy_binary()
    row: Row = {"envoy_version": envoy_version(binary)}
    settings = argparse.Namespace(
        source=args.source,
        poll_interval=args.poll_interval,
        mtls=args.mtls,
        debounce=args.debounce,
        debounce_max=None,
        reconnect_storm=False,
        xds_workers=1,
        profile_server=None,
        auth=None,  # the floor measures Envoy, not authentication
    )
    target = IsthmusTarget(Workload(shape), work, settings)  # bench.load's: the same server, same mesh
    boot, admin_port = bootstrap(work, target.xds_address, args.delta)
    ser, view = measure_serialization(target.mesh.text(), node_of(boot), args.mtls, args.repeat)
    row.update(ser)
    try:
        with children() as started:
            asyncio.run(target.start())
            row["isthmus_startup_s"] = target.startup_s
            # The file source's first poll re-reads the file it has just loaded: let it finish first.
            row["isthmus_busy_after_ready_s"] = settle(server_pid(target), args.timeout)
            argv = [binary, "-c", str(boot), "--concurrency", "1", "--disable-hot-restart"]
            argv += ["--log-level", "warn", "--component-log-level", "config:debug"]
            argv += ["--log-format", ENVOY_LOG_FORMAT]
            admin = Admin(admin_port)
            colds: list[Row] = []
            for run_index in range(args.cold_runs):  # a fresh Envoy each time; the last one stays
                if colds:
                    started[-1].stop()
                cpu0, _ = target.usage()
                t0 = time.time()
                envoy = Child("envoy", argv, work / f"envoy-{run_index}.log")
                started.append(envoy)
                others = Others(our_pids(target, envoy))
                cold = cold_start(args, shape, envoy, admin, t0)
                cold["others_cold_cpus"] = others.cpus()
                cpu1, _ = target.usage()
                cold["isthmus_cold_cpu_s"] = cpu1 - cpu0
                colds.append(cold)
            cold = combine(colds)
            time.sleep(0.5)  # let late pushes settle
            others = Others(our_pids(target, envoy))
            conv = changes(args, shape, view, target, admin, envoy)
            conv["others_changes_cpus"] = others.cpus()
            _, rss = target.usage()
            row["isthmus_peak_rss_mib"] = rss / 2**20
            envoy.check()
            server_pid(target)  # still running
    except BaseException:
        log = work / "isthmus.log"
        if log.exists():
            print(f"---- isthmus log tail:\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
        raise
    finally:
        asyncio.run(target.stop())
    errors = cold.pop("error_list", []) + conv.pop("error_list", [])
    row.update(cold)
    row.update(conv)
    row["errors"] = len(errors)
    for e in errors[:10]:
        print("error:", e, file=sys.stderr)
    return row


def combine(rows: list[Row]) -> Row:
    """The median of each figure over the cold starts (the last row's value when not a number);
    the spread of spawn -> LIVE; every run's errors."""
    out: Row = {}
    for key, last in rows[-1].items():
        values = [r[key] for r in rows if key in r]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            out[key] = (
                statistics.median(values) if isinstance(last, float) else int(statistics.median(values))
            )
        else:
            out[key] = last
    live = [r["envoy_live_wall_ms"] for r in rows]
    out["cold_runs"] = len(rows)
    out["envoy_live_min_ms"], out["envoy_live_max_ms"] = min(live), max(live)
    # The first Envoy waits for isthmus to generate its configuration; later ones get it memoized.
    out["first_live_ms"] = live[0]
    out["first_cds_recv_at_ms"] = rows[0]["cds_recv_at_ms"]
    out["first_isthmus_cpu_s"] = rows[0]["isthmus_cold_cpu_s"]
    out["error_list"] = [e for r in rows for e in r.get("error_list", [])]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 x 20 x 3, 5 changes")
    p.add_argument("--clusters", type=int, default=3)
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--changes", type=int, default=20)
    p.add_argument(
        "--cold-runs", type=int, default=None, help="Envoy cold starts, medians reported (default 5; quick 1)"
    )
    p.add_argument(
        "--source",
        choices=("file", "kube"),
        default="file",
        help="isthmus's discovery: the mesh file (default) or fake Kubernetes API servers (bench.load's)",
    )
    p.add_argument("--mtls", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--delta", action="store_true", help="the Envoy uses incremental xDS")
    p.add_argument(
        "--poll-interval", type=float, default=0.02, help="the file source's poll (1.0 = as shipped)"
    )
    p.add_argument("--debounce", type=float, default=None, help="isthmus --debounce (default as shipped)")
    p.add_argument("--gap", type=float, default=0.3, help="pause between changes (s)")
    p.add_argument("--repeat", type=int, default=5, help="serialization timings: best of N")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0, help="startup limits (s)")
    p.add_argument("--change-timeout", type=float, default=30.0)
    p.add_argument("--csv", type=Path, help="append one row per run to this CSV file")
    args = p.parse_args(argv)
    random.seed(args.seed)
    if args.quick:
        args.clusters, args.services, args.endpoints, args.changes, args.repeat = 3, 20, 3, 5, 3
        args.cold_runs = 1 if args.cold_runs is None else args.cold_runs
    args.cold_runs = max(1, 5 if args.cold_runs is None else args.cold_runs)
    return args


def report(args: argparse.Namespace, row: Row) -> None:
    def f(key: str, digits: int = 1) -> str:
        v = row.get(key, float("nan"))
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = [
        ("machine", f"{row['host']}, {row['cpus']} CPUs, {row['machine']}, Python {row['python']}"),
        ("Envoy", f"{row['envoy_version']}, --concurrency 1, {'delta' if args.delta else 'sotw'} ADS"),
        (
            "workload",
            f"{row['clusters']} x {row['services']} x {row['endpoints']} "
            f"({row['clusters'] * row['services'] * row['endpoints']} endpoints), "
            f"mTLS {'on' if args.mtls else 'off'}, {args.source} source; "
            f"sidecar of {service_name(0)} in {member(0)}",
        ),
        ("-- serialization (this process)", ""),
        ("file source: parse / merge the mesh file", f"{f('ser_file_parse_ms')} / {f('ser_merge_ms')} ms"),
        (
            "generate + serialize all types, one proxy",
            f"{f('ser_generate_ms')} ms (first {f('ser_generate_first_ms')} ms)",
        ),
        (
            "bytes: CDS / EDS / LDS / RDS / SDS",
            " / ".join(
                f"{f(f'ser_{t}_kb')} kB ({row.get(f'ser_{t}_resources', 0)})"
                for t in types.SHORT_NAMES.values()
            ),
        ),
        ("bytes: total", f"{f('ser_mb', 2)} MB"),
        (
            "protobuf parse (upb), top level / nested Any",
            f"{f('pb_parse_ms')} / {f('pb_parse_nested_ms')} ms ({row['pb_nested_any']} Anys)",
        ),
        ("protobuf serialize the parsed messages", f"{f('pb_serialize_ms')} ms"),
        ("regenerate EDS after one endpoint change", f"{f('ser_eds_change_ms', 2)} ms"),
        (f"-- Envoy cold start (ms after spawn; median of {row['cold_runs']})", ""),
        (
            "isthmus serve startup (spawn -> /readyz; busy after)",
            f"{f('isthmus_startup_s', 2)} s; {f('isthmus_busy_after_ready_s', 1)} s",
        ),
        (
            "spawn -> LIVE (/ready polled): median (min..max)",
            f"{f('envoy_live_wall_ms')} ms ({f('envoy_live_min_ms')}..{f('envoy_live_max_ms')})",
        ),
        (
            "first Envoy (isthmus generates): LIVE / CDS received",
            f"{f('first_live_ms')} / {f('first_cds_recv_at_ms')} ms; "
            f"isthmus CPU {f('first_isthmus_cpu_s', 2)} s",
        ),
        ("server.initialization_time_ms", f"{f('envoy_init_ms')} ms"),
        (
            "CDS received / applied at; update_duration",
            f"{f('cds_recv_at_ms')} / {f('cds_at_ms')}; {f('cds_update_ms', 0)} ms "
            f"({row['cds_updates']} update(s))",
        ),
        (
            "EDS received / applied first..last at",
            f"{f('eds_recv_at_ms')} / {f('eds_first_at_ms')}..{f('eds_last_at_ms')} ms "
            f"({row['envoy_eds_updates']} updates, "
            f"{row['envoy_eds_clusters_updated']}/{row['envoy_outbound_clusters']} clusters)",
        ),
        (
            "EDS update_duration: sum / max",
            f"{f('eds_update_sum_ms', 0)}..{f('eds_update_sum_high_ms', 0)} / {f('eds_update_max_ms', 0)} ms",
        ),
        *(
            (
                f"{key.upper()} received / applied at; update_duration",
                f"{f(f'{key}_recv_at_ms')} / {f(f'{key}_at_ms')}; {f(f'{key}_update_ms', 0)} ms",
            )
            for key in ("sds", "lds", "rds")
        ),
        ("Envoy clusters (active / warming)", f"{row['envoy_clusters']} / {row['envoy_warming_clusters']}"),
        (
            "Envoy CPU / peak RSS / xDS bytes received",
            f"{f('envoy_cold_cpu_s', 2)} s / {f('envoy_cold_rss_mib', 0)} MiB / {f('envoy_xds_rx_mb', 2)} MB",
        ),
        ("xDS responses received, by type", str(row["envoy_responses"])),
        ("isthmus CPU during the cold start", f"{f('isthmus_cold_cpu_s', 2)} s"),
        (
            f"-- endpoint changes (n={row['change_n']}, "
            + (f"file poll {args.poll_interval * 1e3:.0f} ms)" if args.source == "file" else "API writes)"),
            "",
        ),
        (
            "write -> applied (update_time): p50 / p90 / max",
            f"{f('change_applied_p50_ms', 0)} / {f('change_applied_p90_ms', 0)} / "
            f"{f('change_applied_max_ms', 0)} ms",
        ),
        ("write -> address in config_dump (polled) p50", f"{f('change_seen_p50_ms', 0)} ms"),
        ("write -> Envoy received the EDS response p50", f"{f('change_received_p50_ms', 0)} ms"),
        (
            "received -> applied (in Envoy): p50 / max",
            f"{f('change_in_envoy_p50_ms', 0)} / {f('change_in_envoy_max_ms', 0)} ms (whole ms)",
        ),
        (
            "EDS update_duration of the change: p50 / max",
            f"{f('change_eds_update_p50_ms', 0)} / {f('change_eds_update_max_ms', 0)} ms "
            "(whole ms, truncated)",
        ),
        (
            "EDS updates per change / CDS+LDS+RDS updates",
            f"{f('change_eds_updates_per_change', 1)} / {row['change_cds_lds_rds_updates']}",
        ),
        ("isthmus CPU per change", f"{f('change_isthmus_cpu_ms', 0)} ms"),
        (
            "other processes' CPU: cold start / changes",
            f"{f('others_cold_cpus', 2)} / {f('others_changes_cpus', 2)} CPUs (a quiet machine: ~0)",
        ),
        ("errors", str(row["errors"])),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}" if v else k)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("isthmus").setLevel(logging.ERROR)  # the development CA's warning
    shape = Shape(1, args.clusters, args.services, args.endpoints)
    with tempfile.TemporaryDirectory(prefix="isthmus-floor-") as tmp:
        row = run(args, shape, Path(tmp))
    row = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "protobuf": api_implementation.Type(),
        "clusters": shape.clusters,
        "services": shape.services,
        "endpoints": shape.endpoints,
        "mtls": args.mtls,
        "source": args.source,
        "mode": "delta" if args.delta else "sotw",
        "changes": args.changes,
        "poll_interval_s": args.poll_interval,
        **row,
    }
    report(args, row)
    if args.csv is not None:
        header: list[str] = []
        if args.csv.exists():
            with args.csv.open(newline="") as fh:
                header = next(csv.reader(fh), [])
        with args.csv.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if header != list(row):  # a new file, or one written by another version of this tool
                writer.writeheader()
            writer.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()})
    return 1 if row["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
