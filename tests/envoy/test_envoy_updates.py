"""Mesh file changes reach a running Envoy: an added endpoint, an added service and a removed service
show up in /clusters, config_dump and the routes, and requests follow (SotW and Delta)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.envoy


async def answered_by(envoy, host: str, expected: set[str], attempts: int = 40) -> set[str]:
    """Send requests until every upstream in ``expected`` has answered (round robin), or give up."""
    seen: set[str] = set()
    replies = []
    for _ in range(attempts):
        reply = await envoy.request(host)
        replies.append((reply.status, reply.upstream))
        assert reply.status == 200, reply
        seen.add(reply.upstream)
        if seen >= expected:
            break
    assert seen == expected, f"{host} answered by {seen}, expected {expected}: {replies}"
    return seen


async def test_mesh_changes_reach_envoy(delta, procs, mesh, upstreams, eventually) -> None:
    web1 = await upstreams.start("web-1", "127.0.0.1")
    web2 = await upstreams.start("web-2", "127.0.0.2")
    reviews1 = await upstreams.start("reviews-1", "127.0.0.3")
    api1 = await upstreams.start("api-1", "127.0.0.4")
    web, reviews, api = mesh.cluster("web"), mesh.cluster("reviews", 9080), mesh.cluster("api")

    mesh.write(mesh.service("web", web1), mesh.service("reviews", reviews1, port=9080))
    cp = await procs.control_plane(mesh.path)
    envoy = await procs.envoy(procs.bootstrap(xds_port=cp.xds_port, delta=delta))

    async def hosts_are(expected: dict[str, set[str]]) -> None:
        hosts = await envoy.admin.cluster_hosts()
        assert {name: set(h) for name, h in hosts.items()} == expected
        active = await envoy.admin.active_clusters()
        assert set(active) == set(expected), f"config_dump clusters: {sorted(active)}"

    async def vhosts_are(expected: set[str]) -> None:
        routes = await envoy.admin.route_configs()
        assert "outbound_http" in routes, routes
        clusters = {vh["routes"][0]["route"]["cluster"] for vh in routes["outbound_http"]["virtual_hosts"]}
        assert clusters == expected

    async def status_is(host: str, status: int) -> None:
        reply = await envoy.request(host)
        assert reply.status == status, reply

    await eventually(
        lambda: hosts_are({web: {web1.address}, reviews: {reviews1.address}}),
        what="the initial mesh is applied",
    )
    await eventually(lambda: answered_by(envoy, "web.shop:80", {"web-1"}), what="web-1 answers")
    await answered_by(envoy, "reviews.shop:9080", {"reviews-1"})
    assert (await envoy.request("api.shop:80")).status == 404

    # 1. An endpoint is added to web: both endpoints are in /clusters and both answer.
    mesh.write(mesh.service("web", web1, web2), mesh.service("reviews", reviews1, port=9080))
    await eventually(
        lambda: hosts_are({web: {web1.address, web2.address}, reviews: {reviews1.address}}),
        what="web's second endpoint is applied",
    )
    await answered_by(envoy, "web.shop:80", {"web-1", "web-2"})

    # 2. A service is added: a new cluster, a new virtual host, and requests for it reach it.
    mesh.write(
        mesh.service("web", web1, web2),
        mesh.service("reviews", reviews1, port=9080),
        mesh.service("api", api1),
    )
    await eventually(
        lambda: hosts_are(
            {web: {web1.address, web2.address}, reviews: {reviews1.address}, api: {api1.address}}
        ),
        what="service api is applied",
    )
    await eventually(lambda: vhosts_are({web, reviews, api}), what="api has a virtual host")
    await eventually(lambda: answered_by(envoy, "api.shop:80", {"api-1"}), what="api-1 answers")

    # 3. A service is removed: its cluster and virtual host go away and its Host gets 404.
    mesh.write(mesh.service("web", web1, web2), mesh.service("api", api1))
    await eventually(
        lambda: hosts_are({web: {web1.address, web2.address}, api: {api1.address}}),
        what="service reviews is removed from Envoy's clusters",
    )
    await eventually(lambda: vhosts_are({web, api}), what="reviews' virtual host is removed")
    await eventually(lambda: status_is("reviews.shop:9080", 404), what="reviews.shop:9080 gets 404")
    await answered_by(envoy, "web.shop:80", {"web-1", "web-2"})
    await answered_by(envoy, "api.shop.svc.cluster.local:80", {"api-1"})

    # 4. The removed service comes back: Envoy must get its cluster and endpoints again.
    mesh.write(
        mesh.service("web", web1, web2),
        mesh.service("api", api1),
        mesh.service("reviews", reviews1, port=9080),
    )
    await eventually(
        lambda: hosts_are(
            {web: {web1.address, web2.address}, api: {api1.address}, reviews: {reviews1.address}}
        ),
        what="service reviews is back with its endpoint",
    )
    await eventually(
        lambda: answered_by(envoy, "reviews.shop:9080", {"reviews-1"}), what="reviews-1 answers again"
    )
    assert await envoy.admin.warming_clusters() == []

    stats = await envoy.admin.rejections()
    assert set(stats.values()) == {0}, f"Envoy rejected an update: {stats}"


async def test_changed_and_emptied_clusters_apply(delta, procs, mesh, upstreams, eventually) -> None:
    """A Cluster whose definition changes (protocol http -> http2 -> http) must not stay warming: Envoy
    needs its ClusterLoadAssignment again. A service whose endpoints all go away keeps its cluster,
    with no hosts, and answers 503."""
    web1 = await upstreams.start("web-1", "127.0.0.1")
    api1 = await upstreams.start("api-1", "127.0.0.2")
    web, api = mesh.cluster("web"), mesh.cluster("api")
    mesh.write(mesh.service("web", web1), mesh.service("api", api1))
    cp = await procs.control_plane(mesh.path)
    envoy = await procs.envoy(procs.bootstrap(xds_port=cp.xds_port, delta=delta))

    async def web_cluster(http2: bool, previous_version: str | None) -> str:
        active = await envoy.admin.active_clusters()
        assert web in active, f"active: {sorted(active)}; warming: {await envoy.admin.warming_clusters()}"
        options = active[web]["cluster"].get("typed_extension_protocol_options", {})
        assert bool(options) == http2, active[web]
        assert active[web]["version_info"] != previous_version, active[web]
        assert await envoy.admin.warming_clusters() == []
        hosts = await envoy.admin.cluster_hosts()
        assert set(hosts.get(web, {})) == {web1.address}, hosts
        return str(active[web]["version_info"])

    v1 = await eventually(lambda: web_cluster(False, None), what="web is applied")
    await eventually(lambda: answered_by(envoy, "web.shop:80", {"web-1"}), what="web-1 answers")

    mesh.write(mesh.service("web", web1, protocol="http2"), mesh.service("api", api1))
    v2 = await eventually(lambda: web_cluster(True, v1), what="web, now http2, is active with its endpoint")

    mesh.write(mesh.service("web", web1, protocol="http"), mesh.service("api", api1))
    await eventually(lambda: web_cluster(False, v2), what="web, http again, is active with its endpoint")
    await eventually(lambda: answered_by(envoy, "web.shop:80", {"web-1"}), what="web-1 answers again")

    # api loses every endpoint: the cluster stays, empty, and requests get 503 (no healthy upstream).
    await answered_by(envoy, "api.shop:80", {"api-1"})
    mesh.write(mesh.service("web", web1), mesh.service("api"))

    async def api_empty() -> None:
        hosts = await envoy.admin.cluster_hosts()
        assert hosts.get(api) == {}, hosts
        reply = await envoy.request("api.shop:80")
        assert reply.status == 503, reply

    await eventually(api_empty, what="api has no endpoints left")
    mesh.write(mesh.service("web", web1), mesh.service("api", api1))
    await eventually(lambda: answered_by(envoy, "api.shop:80", {"api-1"}), what="api-1 answers again")
    stats = await envoy.admin.rejections()
    assert set(stats.values()) == {0}, f"Envoy rejected an update: {stats}"
