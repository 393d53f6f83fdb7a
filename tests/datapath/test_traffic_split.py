"""SMI TrafficSplit with real Envoys: a root service split 75/25 across two backends, one of them
only in the other member cluster (reached through its gateway), observed over 400 requests."""

from __future__ import annotations

import pytest

from datapath.harness import DataPath, eventually
from datapath.scenario import answered_by, meshed, pods, start_sidecars

pytestmark = [pytest.mark.envoy, pytest.mark.datapath]

REQUESTS = 400
TOLERANCE = 0.07  # observed share within 7 points of the weight (binomial sd at n=400 is ~2.2 points)


async def test_traffic_split_across_clusters_within_tolerance(dp: DataPath) -> None:
    p = await pods(dp, ("east", "web-v1"), ("west", "web-v2"))
    dp.mesh.split("web", ("web-v1", 75), ("web-v2", 25))
    await dp.control_plane(
        dp.mesh.service("web"),  # the root: no endpoints of its own
        dp.mesh.service("web-v1", meshed(dp, p["web-v1"], "web-v1")),
        dp.mesh.service("web-v2", meshed(dp, p["web-v2"], "web-v2")),
    )
    await start_sidecars(dp, {"web-v1": "web-v1", "web-v2": "web-v2"}, p)
    await dp.gateway("west")
    client = await dp.sidecar("east", "client")

    async def both_reachable() -> None:
        assert await answered_by(client, "web-v2.shop", count=2) == {"web-v2": 2}
        got = await answered_by(client, "web.shop", count=20)
        assert set(got) == {"web-v1", "web-v2"}, got

    await eventually(both_reachable, what="the split reaches both backends", within=20)
    got = await client.request("web.shop", "/", count=REQUESTS, concurrency=4)
    assert got.all_ok, got.summary()
    share = got.by_app.get("web-v2", 0) / REQUESTS
    print(f"\ntraffic split 75/25: observed {got.by_app} over {REQUESTS} requests (web-v2 {share:.1%})")
    assert abs(share - 0.25) <= TOLERANCE, got.by_app
