"""Prometheus metrics: every metric isthmus exports, defined here once (name, help, labels, buckets).

The bottom layer: any module may import it, it imports nothing of isthmus. docs/metrics.md
describes each metric; the admin server's ``GET /metrics`` serves ``REGISTRY`` (``exposition``).

* One registry for the process, not prometheus_client's global default: what isthmus exports
  is exactly what is defined here (plus the process collector), and libraries that register on the
  default registry do not show up on it. Several control planes in one process (tests) share it:
  counters and histograms only go up (tests compare before and after), gauges that are sampled
  (``SampledGauge``) sum over every live owner, and the member cluster gauges describe the clusters
  of the aggregator that set them last.
* Bounded cardinality: no label names a proxy, a resource or a service. ``type`` is an xDS type's
  short name (cds, eds, lds, rds, sds), ``cluster`` a member cluster's name (bounded by the
  configuration; a proxy claiming a cluster the mesh does not have counts as ``unknown``),
  ``kind`` a watched Kubernetes kind, ``reason`` one of the fixed refusal reasons of
  ``xds.server.auth.AuthFailure``.
* Cheap on the push path: a stream binds its per-type children once (``xds_type``); nothing is
  done per resource; gauges that the code can compute from its own state (connected proxies, the
  send budget) are computed when scraped, not kept up to date on every change.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

# No *_created series: they would double the series of every counter and histogram for a
# timestamp Prometheus does not need (process_start_time_seconds says when counting began).
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, ...

# States of isthmus_member_cluster_state: discovery.model.ClusterState's values, and "withdrawn"
# (unreachable past --withdraw-after: its endpoints are withdrawn). tests/unit/test_metrics.py
# checks that this lists every ClusterState.
CLUSTER_STATES = ("syncing", "synced", "unreachable", "stale", "withdrawn", "static")
UNKNOWN_CLUSTER = "unknown"  # a proxy's claimed cluster that the mesh does not have

Sample = tuple[tuple[str, ...], float]  # label values, value


class SampledGauge:
    """A gauge computed at scrape time from the state its owners keep anyway.

    ``track(owner, sample)``: at each scrape ``sample(owner)`` yields (label values, value) pairs;
    values of equal labels add up over owners. Owners are held weakly; ``sample`` must not hold
    the owner (pass a function of the owner, e.g. ``Class.method``, not a bound method). Scraped
    on the event loop (the admin server's handler), so owners' state is read between two steps.
    """

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._owners: weakref.WeakKeyDictionary[Any, Callable[[Any], Iterable[Sample]]] = (
            weakref.WeakKeyDictionary()
        )
        REGISTRY.register(self)

    def track(self, owner: Any, sample: Callable[[Any], Iterable[Sample]]) -> None:
        self._owners[owner] = sample

    def values(self) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for owner, sample in list(self._owners.items()):
            for labels, value in sample(owner):
                out[labels] = out.get(labels, 0.0) + value
        if not out and not self.labelnames:
            out[()] = 0.0
        return out

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in sorted(self.values().items()):
            family.add_metric(list(labels), value)
        yield family


# ---- xDS server ------------------------------------------------------------------------------

CONNECTED_PROXIES = SampledGauge(
    "isthmus_xds_connected_proxies",
    "Proxies with an open ADS stream whose Node has been read, by member cluster (the one the Node "
    "claims; 'unknown' if the mesh has no such cluster), role (sidecar, gateway) and xDS mode "
    "(sotw, delta).",
    ["cluster", "role", "mode"],
)
RESPONSES = Counter(
    "isthmus_xds_responses_total",
    "xDS responses written to proxies, by type (cds, eds, lds, rds, sds).",
    ["type"],
    registry=REGISTRY,
)
NACKS = Counter(
    "isthmus_xds_nacks_total",
    "Responses a proxy rejected (a request with error_detail for the latest nonce), by type.",
    ["type"],
    registry=REGISTRY,
)
ACK_LATENCY = Histogram(
    "isthmus_xds_ack_latency_seconds",
    "From writing a response to reading the proxy's ACK of it, by type (NACKs are not counted).",
    ["type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
CONVERGENCE = Histogram(
    "isthmus_proxy_convergence_seconds",
    "From the discovery event that led to a mesh view (the first change of its debounced batch "
    "reaching the aggregate: the debounce is included) to the last ACK by which a proxy holds "
    "everything of that view it subscribes to. Observed once per proxy and view it was sent "
    "something for; views that reach a proxy together count from the earliest event.",
    buckets=(0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
STREAMS = Counter(
    "isthmus_xds_streams_total",
    "ADS streams opened, by xDS mode (sotw, delta).",
    ["mode"],
    registry=REGISTRY,
)
AUTHENTICATIONS = Counter(
    "isthmus_xds_authentications_total",
    "Stream authentication results when proxies are authenticated: 'ok' for a stream whose "
    "credentials and Node were accepted, else the refusal reason (bad-token, node-mismatch, ...); "
    "a revocation of an open stream (pod-deleted) counts as its reason too.",
    ["result"],
    registry=REGISTRY,
)
SEND_BUDGET_USED = SampledGauge(
    "isthmus_xds_send_budget_used_bytes",
    "Bytes of responses written and not yet ACKed or NACKed, over all streams (--send-budget-mib).",
)
SEND_BUDGET_LIMIT = SampledGauge(
    "isthmus_xds_send_budget_limit_bytes", "The send budget (--send-budget-mib), in bytes."
)
SEND_BUDGET_WAITING = SampledGauge(
    "isthmus_xds_send_budget_waiting_responses",
    "Responses waiting for room in the send budget before they are written.",
)

# ---- cache -----------------------------------------------------------------------------------

MESH_VIEWS = Counter(
    "isthmus_mesh_views_total",
    "Mesh views installed in the resource cache (each one a new content version of the mesh).",
    registry=REGISTRY,
)
MESH_VIEW_INFO = Gauge(
    "isthmus_mesh_view_info",
    "1, with the content version of the current mesh view as its label (replicas with the same "
    "inputs have the same version).",
    ["version"],
    registry=REGISTRY,
)
GENERATION = Histogram(
    "isthmus_mesh_view_generation_seconds",
    "Time to generate and serialize one type's resources for one proxy group, once per group "
    "and view that changed what the type reads (a type left as it was is not counted), by type.",
    ["type"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
    registry=REGISTRY,
)

# ---- discovery -------------------------------------------------------------------------------

MEMBER_CLUSTER_STATE = Gauge(
    "isthmus_member_cluster_state",
    "A member cluster's state: 1 for its current state, 0 for the others (syncing, synced, "
    "unreachable, stale, withdrawn; static for clusters of the mesh file).",
    ["cluster", "state"],
    registry=REGISTRY,
)
MEMBER_CLUSTER_WEIGHT = Gauge(
    "isthmus_member_cluster_weight_ratio",
    "A member cluster's share of its normal traffic: 1 normally, lowered step by step by a drain, "
    "0 when drained.",
    ["cluster"],
    registry=REGISTRY,
)
WATCH_EVENTS = Counter(
    "isthmus_member_cluster_watch_events_total",
    "Watch events (added, modified, deleted; not bookmarks) received from a member cluster's API "
    "server, by cluster and kind.",
    ["cluster", "kind"],
    registry=REGISTRY,
)
RELISTS = Counter(
    "isthmus_member_cluster_relists_total",
    "Lists after the first one (the watch's history expired: 410 Gone, or a failure of unknown "
    "kind), by cluster and kind.",
    ["cluster", "kind"],
    registry=REGISTRY,
)
WATCH_ERRORS = Counter(
    "isthmus_member_cluster_watch_errors_total",
    "Failed lists and watches of a member cluster's API server (unreachable, hung, refused, 5xx; "
    "not 410 nor 429), by cluster and kind.",
    ["cluster", "kind"],
    registry=REGISTRY,
)

# ---- mesh CA ---------------------------------------------------------------------------------

CERTIFICATES_ISSUED = Counter(
    "isthmus_ca_certificates_issued_total",
    "Certificates issued by the mesh CA, by kind (workload: SPIFFE, over SDS; serving: the "
    "control plane's own TLS), renewals included.",
    ["kind"],
    registry=REGISTRY,
)
CERTIFICATES_ROTATED = Counter(
    "isthmus_ca_certificates_rotated_total",
    "Certificates issued again because the one before was past its rotation point, by kind.",
    ["kind"],
    registry=REGISTRY,
)


@dataclass(frozen=True, slots=True)
class XdsType:
    """The children of the per-type xDS metrics for one type, bound once per type."""

    responses: Counter
    nacks: Counter
    ack_latency: Histogram
    generation: Histogram


@functools.cache
def xds_type(short: str) -> XdsType:
    """The metrics of xDS type ``short`` (cds, eds, ...): looked up once, then shared."""
    return XdsType(
        RESPONSES.labels(short), NACKS.labels(short), ACK_LATENCY.labels(short), GENERATION.labels(short)
    )


def exposition(accept: str = "") -> tuple[bytes, str]:
    """The registry in the format an HTTP Accept header asks for, and its content type: the
    Prometheus text format (version 0.0.4) unless OpenMetrics (which Prometheus prefers) or text
    1.0.0 is asked for, as prometheus_client's own exporters negotiate."""
    encode, content_type = choose_encoder(accept)
    return encode(REGISTRY), content_type
