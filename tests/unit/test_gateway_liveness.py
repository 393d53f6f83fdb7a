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
