"""Multi-cluster locality against a real Envoy: endpoints in the proxy's own member cluster are
priority 0, the rest of its region priority 1, other regions priority 2; traffic stays local and fails
over in that order when endpoints turn unhealthy, and comes back (SotW and Delta)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.envoy


async def test_traffic_prefers_own_cluster_then_region(delta, procs, mesh, upstreams, eventually) -> None:
    local = await upstreams.start("web-east", "127.0.0.1")
    same_region = await upstreams.start("web-north", "127.0.0.2")
    remote = await upstreams.start("web-west", "127.0.0.3")
    mesh.add_member("north", "r1", "r1-b")  # the proxy's region (r1), another member cluster
    mesh.add_member("west", "r2", "r2-a")
    web = mesh.cluster("web")

    def write(east: str = "healthy", north: str = "healthy") -> None:
        mesh.write(
            mesh.service(
                "web",
                mesh.endpoint(local, member="east", health=east),
                mesh.endpoint(same_region, member="north", health=north),
                mesh.endpoint(remote, member="west"),
            )
        )

    write()
    cp = await procs.control_plane(mesh.path)
    envoy = await procs.envoy(procs.bootstrap(xds_port=cp.xds_port, delta=delta))

    async def priorities() -> dict[str, int]:
        hosts = await envoy.admin.cluster_hosts()
        got = {addr: int(h.get("priority", 0)) for addr, h in hosts.get(web, {}).items()}
        assert got == {local.address: 0, same_region.address: 1, remote.address: 2}, hosts.get(web)
        return got

    await eventually(priorities, what="web's endpoints have priorities by locality")

    async def all_answered_by(upstream: str, requests: int = 8) -> None:
        answers = [(await envoy.request("web.shop:80")).upstream for _ in range(requests)]
        assert set(answers) == {upstream}, answers

    await eventually(lambda: all_answered_by("web-east"), what="traffic stays in the own member cluster")

    write(east="unhealthy")
    await eventually(lambda: all_answered_by("web-north"), what="traffic fails over within the region")

    write(east="unhealthy", north="draining")
    await eventually(lambda: all_answered_by("web-west"), what="traffic fails over to the other region")

    write()
    await eventually(lambda: all_answered_by("web-east"), what="traffic returns to the own member cluster")
