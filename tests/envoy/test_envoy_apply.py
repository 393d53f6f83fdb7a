"""A real Envoy applies what `isthmus serve` pushes: clusters, endpoints, the outbound listener, its
routes, and traffic through the listener reaches the right upstream (SotW and Delta)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.envoy

DB = ("127.0.0.3", 5432)  # a TCP service: a cluster but no route; nothing is sent to it


async def test_envoy_applies_pushed_config(delta, procs, mesh, upstreams, eventually) -> None:
    web1 = await upstreams.start("web-1", "127.0.0.1")
    reviews1 = await upstreams.start("reviews-1", "127.0.0.2")
    mesh.write(
        mesh.service("web", web1, port=80),
        mesh.service("reviews", reviews1, port=9080),
        mesh.service("db", DB, port=5432, protocol="tcp"),
    )
    web, reviews, db = mesh.cluster("web", 80), mesh.cluster("reviews", 9080), mesh.cluster("db", 5432)
    cp = await procs.control_plane(mesh.path)
    boot = procs.bootstrap(xds_port=cp.xds_port, delta=delta)
    envoy = await procs.envoy(boot)

    # Clusters and their endpoints, as Envoy's cluster manager has them.
    expected_hosts = {web: {web1.address}, reviews: {reviews1.address}, db: {"127.0.0.3:5432"}}

    async def clusters_applied() -> dict:
        hosts = await envoy.admin.cluster_hosts()
        assert {name: set(h) for name, h in hosts.items()} == expected_hosts
        return hosts

    hosts = await eventually(clusters_applied, what="/clusters shows every service port and its endpoint")
    web_host = hosts[web][web1.address]
    assert web_host["locality"] == {"region": "r1", "zone": "r1-a", "sub_zone": "east"}, web_host
    assert web_host["health_status"]["eds_health_status"] == "HEALTHY", web_host

    active = await envoy.admin.active_clusters()
    assert set(active) == set(expected_hosts)
    for name in expected_hosts:
        cluster = active[name]["cluster"]
        assert cluster["type"] == "EDS", cluster
        assert cluster["eds_cluster_config"]["service_name"] == name, cluster
        assert active[name]["version_info"], active[name]
    assert await envoy.admin.warming_clusters() == []

    # The outbound listener, bound where the bootstrap said, routing through RDS.
    listener_name = f"outbound_http_{boot.outbound_port}"

    async def listener_active() -> dict:
        listeners = await envoy.admin.listeners()
        # The TCP service gets its own listener on its port (no Host header to route by).
        assert set(listeners) == {listener_name, "outbound_tcp|5432||db.shop.svc.cluster.local"}, listeners
        assert all("active_state" in entry for entry in listeners.values()), listeners
        return listeners[listener_name]["active_state"]["listener"]

    listener = await eventually(listener_active, what=f"listener {listener_name} is active")
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": boot.outbound_port}
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    assert hcm["name"] == "envoy.filters.network.http_connection_manager"
    assert hcm["typed_config"]["rds"]["route_config_name"] == "outbound_http"

    async def routes_applied() -> dict:
        routes = await envoy.admin.route_configs()
        assert set(routes) == {"outbound_http"}, routes
        return routes["outbound_http"]

    route_config = await eventually(routes_applied, what="route config outbound_http is applied")
    by_domain = {
        domain: vhost["routes"][0]["route"]["cluster"]
        for vhost in route_config["virtual_hosts"]
        for domain in vhost["domains"]
    }
    for host, cluster in [
        ("web.shop.svc.cluster.local:80", web),
        ("web.shop:80", web),
        ("web", web),  # short name: the proxy's own namespace
        ("web.shop", web),  # portless: port 80
        ("reviews.shop.svc.cluster.local:9080", reviews),
        ("reviews.shop", reviews),  # portless: the first HTTP port
    ]:
        assert by_domain.get(host) == cluster, f"{host}: {by_domain}"
    assert not any(c == db for c in by_domain.values()), "a TCP service has no HTTP route"

    # Real requests through the listener reach the upstream of the service named by Host.
    async def answered(host: str, upstream: str) -> None:
        reply = await envoy.request(host, "/hello")
        assert (reply.status, reply.upstream) == (200, upstream), reply

    await eventually(lambda: answered("web.shop:80", "web-1"), what="Host web.shop:80 reaches web-1")
    for host, upstream in [
        ("web.shop.svc.cluster.local:80", "web-1"),
        ("web", "web-1"),
        ("reviews.shop:9080", "reviews-1"),
        ("reviews.shop.svc.cluster.local", "reviews-1"),
    ]:
        await answered(host, upstream)
    assert web1.hosts_seen
    assert reviews1.hosts_seen
    unknown = await envoy.request("nosuch.shop:80")
    assert unknown.status == 404, unknown

    # Initialization completed (no resource left waiting), and the control plane counts the proxy.
    assert (await envoy.admin.json("/server_info"))["state"] == "LIVE"
    info = await cp.readyz()
    assert info["ready"] is True, info
    assert info["proxies"] == 1, info


async def test_gateway_gets_sni_passthrough_for_its_own_sidecars(delta, procs, mesh, eventually) -> None:
    """A gateway receives one SNI-named cluster per service port with sidecars in its own cluster
    (their inbound mTLS port), the east-west listener, no routes and no secrets; a service without
    sidecars is not exported through it."""
    web = {**mesh.endpoint(("127.0.0.2", 8080)), "sidecar_port": 15006}
    mesh.write(mesh.service("web", web), mesh.service("db", DB, port=5432, protocol="tcp"))
    cp = await procs.control_plane(mesh.path)
    gateway = await procs.envoy(
        procs.bootstrap(xds_port=cp.xds_port, delta=delta, role="gateway", service="gw")
    )
    sni = "outbound_.80_._.web.shop.svc.cluster.local"

    async def applied() -> None:
        hosts = await gateway.admin.cluster_hosts()
        assert {name: set(h) for name, h in hosts.items()} == {sni: {"127.0.0.2:15006"}}
        info = await gateway.admin.json("/server_info")
        assert info["state"] == "LIVE", info["state"]

    await eventually(applied, what="the gateway has its passthrough cluster and is LIVE")
    listeners = await gateway.admin.listeners()
    assert set(listeners) == {"eastwest_15443"}
    chains = listeners["eastwest_15443"]["active_state"]["listener"]["filter_chains"]
    assert [c["filter_chain_match"]["server_names"] for c in chains] == [[sni]]
    assert "transport_socket" not in chains[0], "the gateway never terminates TLS"
    assert await gateway.admin.route_configs() == {}
    assert await gateway.admin.config_dump("dynamic_active_secrets") == [], "a gateway holds no secrets"


async def test_outbound_listener_is_marked_outbound(procs, mesh, upstreams, eventually) -> None:
    web1 = await upstreams.start("web-1")
    mesh.write(mesh.service("web", web1))
    cp = await procs.control_plane(mesh.path)
    boot = procs.bootstrap(xds_port=cp.xds_port, delta=False)
    envoy = await procs.envoy(boot)

    async def listener() -> dict:
        listeners = await envoy.admin.listeners()
        name = f"outbound_http_{boot.outbound_port}"
        assert "active_state" in listeners.get(name, {}), listeners
        return listeners[name]["active_state"]["listener"]

    applied = await eventually(listener, what="the outbound listener is active")
    assert applied.get("traffic_direction") == "OUTBOUND", applied.get("traffic_direction")
