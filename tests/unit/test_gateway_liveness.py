"""Gateway liveness: a gateway seen and then gone past the grace period is dead; one never seen is
unknown and not dead; a dead gateway's endpoints are pushed unhealthy, nothing is removed."""

from __future__ import annotations

from isthmus.app import GatewayLiveness
from isthmus.discovery.aggregate import Aggregator, shards_of_view
from isthmus.discovery.file import parse_mesh
from isthmus.discovery.model import Locality, MeshView
from isthmus.xds import types
from isthmus.xds.generate import GENERATORS
from isthmus.xds.generate.identity import MeshIdentity
from isthmus.xds.proxy import Proxy, Role

MESH = """
clusters:
  - {name: a, region: r1, zone: z1}
  - {name: b, region: r1, zone: z2, gateway: {address: 10.250.0.2}}
services:
  - name: web
    namespace: shop
    ports: [{name: http, port: 80}]
    endpoints:
      - {cluster: a, address: 10.1.0.1, sidecar_port: 15006}
      - {cluster: b, address: 10.2.0.1, sidecar_port: 15006}
"""


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_seen_then_gone_past_grace_is_dead_and_unknown_is_not() -> None:
    clock = Clock()
    liveness = GatewayLiveness(grace=3.0, clock=clock)
    assert liveness.observe([], ["b", "c"]) == set(), "never seen: unknown, not dead"
    clock.now = 100.0
    assert liveness.observe([], ["b", "c"]) == set(), "still unknown, however long"
    assert liveness.observe(["b"], ["b", "c"]) == set()
    clock.now = 102.0
    assert liveness.observe([], ["b", "c"]) == set(), "within the grace period"
    clock.now = 104.0
    assert liveness.observe([], ["b", "c"]) == {"b"}
    assert liveness.observe(["b"], ["b", "c"]) == set(), "reconnected"


def test_a_dead_gateway_is_pushed_unhealthy_not_removed() -> None:
    views: list[MeshView] = []
    aggregator = Aggregator(views.append)
    aggregator.set_source("file", shards_of_view(parse_mesh(MESH)))
    alive = aggregator.flush()
    aggregator.set_gateways_down({"b"})
    dead = aggregator.flush()
    assert dead.version != alive.version
    assert dead.clusters["b"].gateway_down
    assert not dead.clusters["a"].gateway_down
    proxy = Proxy("p", Role.SIDECAR, "shop", "client", "client", Locality("r1", "z1", "a"))
    identity = MeshIdentity("cluster.local", "ROOT")

    def gateway_health(view: MeshView) -> list[int]:
        cla = GENERATORS[types.ENDPOINT](view, proxy, identity)["outbound|80||web.shop.svc.cluster.local"]
        return [
            lb.health_status
            for group in cla.endpoints
            if group.locality.sub_zone == "b"
            for lb in group.lb_endpoints
        ]

    assert gateway_health(alive) == [1]  # HEALTHY
    assert gateway_health(dead) == [2]  # UNHEALTHY, still there
    aggregator.set_gateways_down(set())
    assert aggregator.flush().version == alive.version


def test_a_gateways_readiness_from_its_api_server_decides_for_every_replica() -> None:
    """Two replicas (two aggregators): the gateway's stream moved from A to B, so A's own streams
    say gone and B's say alive; the gateway pods' readiness, which both read from b's API server,
    is what both push."""
    from dataclasses import replace

    from isthmus.discovery.kube.gateway import gateway_ready

    view = parse_mesh(MESH)
    replicas = [Aggregator(lambda v: None), Aggregator(lambda v: None)]
    replicas[0].set_gateways_down({"b"})  # A: the stream left
    replicas[1].set_gateways_down(set())  # B: the stream is here

    def pushed(ready: bool | None) -> list[bool]:
        for agg in replicas:
            shards = shards_of_view(view)
            agg.set_source(
                "kube", [replace(s, cluster=replace(s.cluster, gateway_ready=ready)) for s in shards]
            )
        return [agg.flush().clusters["b"].gateway_down for agg in replicas]

    assert pushed(None) == [True, False]  # no readiness known: each replica's streams (the divergence)
    assert pushed(True) == [False, False]  # pods ready: alive for both
    assert pushed(False) == [True, True]  # no pod ready: dead for both, even where the stream is
    # What discovery reads: any ready endpoint in the gateway Service's slices; no slices: unknown.
    slice_of = lambda *ready: {"endpoints": [{"conditions": {"ready": r}} for r in ready]}  # noqa: E731
    assert gateway_ready([slice_of(False), slice_of(False, True)]) is True
    assert gateway_ready([slice_of(False)]) is False
    assert gateway_ready([slice_of()]) is False
    assert gateway_ready([]) is None
