"""Service addresses and what captured sidecars get from them: ClusterIPs read from Kubernetes,
clusterset IPs chosen deterministically, the outbound listener's chains by original destination,
the DNS table, and the route domains. (The whole captured sidecar's output is pinned by
tests/golden/eastwest-mtls-captured-sidecar-a.json; the kernel and Envoy side by
tests/datapath/test_capture.py.)"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import replace
from typing import Any

import pytest

from isthmus.discovery import clusterset
from isthmus.discovery.aggregate import Aggregator, Shard, merge
from isthmus.discovery.file import MeshFileError, parse_mesh
from isthmus.discovery.kube.convert import ClusterObjects, cluster_ips, shard_of
from isthmus.discovery.model import (
    Endpoint,
    Locality,
    MemberCluster,
    MeshView,
    Protocol,
    Service,
    ServiceKey,
    ServicePort,
)
from isthmus.xds import naming, types
from isthmus.xds.generate import listeners, routes
from isthmus.xds.proxy import OutboundTraffic, Proxy, Role, proxy_from_node

HTTP = (ServicePort("http", 80, 8080),)
TCP = (ServicePort("tcp", 5432, 5432, Protocol.TCP),)


def key(name: str, namespace: str = "shop") -> ServiceKey:
    return ServiceKey(namespace, name)


# ---- clusterset IPs ----------------------------------------------------------------------------


def test_clusterset_ips_are_unique_in_range_and_independent_of_order() -> None:
    keys = [key(f"svc{i}", f"ns{i % 7}") for i in range(3000)]
    net = clusterset.DEFAULT_NETWORK
    first = clusterset.allocate(keys, net)
    shuffled = list(keys)
    random.Random(1).shuffle(shuffled)
    assert clusterset.allocate(shuffled, net) == first  # every replica picks the same
    assert len(set(first.values())) == len(keys)
    addresses = [ipaddress.ip_address(a) for a in first.values()]
    assert all(a in net and a not in (net.network_address, net.broadcast_address) for a in addresses)


def test_a_new_service_rarely_moves_the_others() -> None:
    keys = [key(f"svc{i}") for i in range(1000)]
    before = clusterset.allocate(keys, clusterset.DEFAULT_NETWORK)
    after = clusterset.allocate([*keys, key("newcomer")], clusterset.DEFAULT_NETWORK)
    moved = [k for k in keys if before[k] != after[k]]
    assert len(moved) <= 1, moved


def test_a_full_range_gives_addresses_to_as_many_services_as_it_holds() -> None:
    net = clusterset.network("10.0.0.0/29")  # 6 usable addresses
    got = clusterset.allocate([key(f"s{i}") for i in range(9)], net)
    assert len(got) == 6
    assert len(set(got.values())) == 6


@pytest.mark.parametrize(
    ("bad", "why"),
    [("10.0.0.1/16", "has host bits set"), ("10.0.0.0/31", "too small"), ("nonsense", "does not appear")],
)
def test_a_bad_range_is_refused(bad: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        clusterset.network(bad)


# ---- ClusterIPs from Kubernetes, from the mesh file, through the aggregate -------------------------


@pytest.mark.parametrize(
    ("spec", "ips"),
    [
        ({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"]}, ("10.96.0.10", "fd00::10")),
        ({"clusterIP": "10.96.0.10"}, ("10.96.0.10",)),
        ({"clusterIP": "None", "clusterIPs": ["None"]}, ()),  # headless
        ({}, ()),
    ],
)
def test_cluster_ips_of_a_service(spec: dict[str, Any], ips: tuple[str, ...]) -> None:
    assert cluster_ips({"metadata": {"name": "web"}, "spec": spec}) == ips


def test_a_headless_service_is_defined_in_its_cluster_without_addresses() -> None:
    services = {
        "shop/web": {
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]},
        }
    }
    objs = ClusterObjects(services, {}, {}, {}, {}, {})
    shard = shard_of(MemberCluster("a"), objs)
    view = merge([shard])
    web = view.services[key("web")]
    assert web.defined_in("a")
    assert web.addresses_in("a") == ()
    assert web.reachable_at("a") == (web.vip,)  # still reachable at its clusterset IP


def test_the_aggregate_keeps_each_clusters_addresses_and_gives_one_clusterset_ip() -> None:
    seen: list[MeshView] = []
    agg = Aggregator(seen.append)
    for cluster, ip in (("a", "10.96.0.10"), ("b", "10.96.5.5")):
        agg.set_shard(
            "kube", Shard(MemberCluster(cluster), {key("web"): HTTP}, addresses={key("web"): (ip,)})
        )
    agg.set_shard("kube", Shard(MemberCluster("c"), {key("web"): HTTP}))  # c has endpoints only
    web = agg.flush().services[key("web")]
    assert web.addresses == (("a", ("10.96.0.10",)), ("b", ("10.96.5.5",)))
    assert web.vip == clusterset.allocate([key("web")], clusterset.DEFAULT_NETWORK)[key("web")]
    assert web.reachable_at("a") == ("10.96.0.10", web.vip)
    assert not web.defined_in("c")


def test_the_mesh_file_declares_cluster_ips_and_refuses_bad_ones() -> None:
    text = """
clusters: [{name: a}]
services:
  - name: web
    namespace: shop
    ports: [{name: http, port: 80}]
    cluster_ips: {a: [10.96.0.10]}
"""
    assert parse_mesh(text).services[key("web")].addresses == (("a", ("10.96.0.10",)),)
    with pytest.raises(MeshFileError, match=r"cluster_ips.a: 'ten' is not an IP address"):
        parse_mesh(text.replace("10.96.0.10", "ten"))
    with pytest.raises(MeshFileError, match="unknown cluster 'b'"):
        parse_mesh(text.replace("{a: [", "{b: ["))


# ---- what a captured sidecar gets --------------------------------------------------------------


def captured(cluster: str = "a", traffic: OutboundTraffic = OutboundTraffic.ALLOW_ANY) -> Proxy:
    return Proxy(
        "client-1", Role.SIDECAR, "shop", "client", "client", Locality("r", "z", cluster),
        capture=True, outbound_traffic=traffic,
    )  # fmt: skip


def mesh() -> MeshView:
    """web (HTTP) in a and b with the same ClusterIP (overlapping ranges), db (TCP) only in b."""
    services = [
        Service(
            key("web"), HTTP, addresses=(("a", ("10.96.0.10",)), ("b", ("10.96.0.10",))), vip="240.240.0.1"
        ),
        Service(key("db"), TCP, addresses=(("b", ("10.96.0.20",)),), vip="240.240.0.2"),
        Service(key("old"), HTTP),  # no clusterset IP (the range was full): no address at all
    ]
    return MeshView.build(services, [MemberCluster("a"), MemberCluster("b")])


def chains(listener: Any) -> dict[str, tuple[int, list[str]]]:
    return {
        c.name: (
            c.filter_chain_match.destination_port.value,
            [r.address_prefix for r in c.filter_chain_match.prefix_ranges],
        )
        for c in listener.filter_chains
    }


def test_the_outbound_listener_matches_each_service_by_its_addresses_in_the_proxys_cluster() -> None:
    out = listeners.generate(mesh(), captured("a"))
    listener = out[naming.outbound_listener(15001)]
    assert listener.address.socket_address.address == "127.0.0.1"  # never on the pod's address
    assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.original_dst"]
    assert chains(listener) == {
        "outbound_http_15001": (15001, ["127.0.0.1"]),  # the explicit proxy (an app told so): Host routing
        "outbound_http_80": (80, ["10.96.0.10", "240.240.0.1"]),
        "outbound|5432||db.shop.svc.cluster.local": (5432, ["240.240.0.2"]),  # a: clusterset IP only
    }
    assert listener.default_filter_chain.filters[0].name == listeners.TCP_PROXY  # passthrough
    assert set(out) == {naming.outbound_listener(15001), naming.dns_listener(15053)}  # no per-port listeners
    in_b = chains(listeners.generate(mesh(), captured("b"))[naming.outbound_listener(15001)])
    assert in_b["outbound|5432||db.shop.svc.cluster.local"] == (5432, ["10.96.0.20", "240.240.0.2"])


def test_registry_only_has_no_passthrough() -> None:
    listener = listeners.generate(mesh(), captured(traffic=OutboundTraffic.REGISTRY_ONLY))[
        naming.outbound_listener(15001)
    ]
    assert not listener.HasField("default_filter_chain")


def test_an_address_two_services_claim_goes_to_the_first_by_name() -> None:
    view = MeshView.build(
        [
            Service(key("aaa"), HTTP, addresses=(("a", ("10.96.0.10",)),)),
            Service(key("zzz"), HTTP, addresses=(("a", ("10.96.0.10",)),)),
        ],
        [MemberCluster("a")],
    )
    listener = listeners.generate(view, captured())[naming.outbound_listener(15001)]
    assert chains(listener)["outbound_http_80"] == (80, ["10.96.0.10"])  # once: Envoy refuses duplicates
    domains = [
        vh.domains for vh in routes.generate(view, captured())[naming.OUTBOUND_HTTP_ROUTE].virtual_hosts
    ]
    assert sum("10.96.0.10" in d for d in domains) == 1


def test_the_dns_table_has_clusterset_names_and_cluster_local_names_of_remote_only_services() -> None:
    assert listeners.dns_table(mesh(), "a") == [
        ("db.shop.svc.clusterset.local", "240.240.0.2"),
        ("db.shop.svc.cluster.local", "240.240.0.2"),  # a has no Service db: its DNS would say NXDOMAIN
        ("web.shop.svc.clusterset.local", "240.240.0.1"),
    ]
    assert ("db.shop.svc.cluster.local", "240.240.0.2") not in listeners.dns_table(mesh(), "b")


def test_route_domains_hold_the_addresses_of_the_proxys_cluster_only() -> None:
    view = replace(mesh())
    hosts_a = routes.generate(view, captured("a"))[naming.OUTBOUND_HTTP_ROUTE].virtual_hosts[-1].domains
    assert {"10.96.0.10", "10.96.0.10:80", "240.240.0.1", "240.240.0.1:80"} <= set(hosts_a)
    hosts_c = routes.generate(view, captured("c"))[naming.OUTBOUND_HTTP_ROUTE].virtual_hosts[-1].domains
    assert "10.96.0.10" not in hosts_c  # c's 10.96.0.10 (if any) is not web
    assert "240.240.0.1" in hosts_c
    # Uncaptured proxies route by name only: one route table for every member cluster.
    plain = [replace(captured(cluster), capture=False) for cluster in ("a", "c")]
    hosts = [routes.generate(view, p)[naming.OUTBOUND_HTTP_ROUTE].virtual_hosts[-1].domains for p in plain]
    assert "240.240.0.1" not in hosts[0]
    assert plain[0].for_type(types.ROUTE) == plain[1].for_type(types.ROUTE)
    assert captured("a").for_type(types.ROUTE) != captured("c").for_type(types.ROUTE)


def test_uncaptured_sidecars_keep_their_listeners() -> None:
    plain = replace(captured(), capture=False)
    out = listeners.generate(mesh(), plain)
    assert naming.outbound_http_listener(15001) in out
    assert naming.dns_listener(15053) not in out


def test_the_node_says_whether_it_is_captured_and_a_bad_policy_is_refused() -> None:
    from envoy.config.core.v3 import base_pb2
    from google.protobuf import struct_pb2

    def node(**meta: Any) -> Any:
        metadata = struct_pb2.Struct()
        metadata.update({"isthmus": meta})
        return base_pb2.Node(id="n", metadata=metadata)

    got = proxy_from_node(node(capture=True, outbound_traffic="registry-only"))
    assert (got.capture, got.outbound_traffic) == (True, OutboundTraffic.REGISTRY_ONLY)
    assert proxy_from_node(node()).capture is False
    with pytest.raises(ValueError, match="outbound_traffic='everything'"):
        proxy_from_node(node(capture=True, outbound_traffic="everything"))


# ---- MCS objects ---------------------------------------------------------------------------------


def test_a_service_import_and_the_conditions_of_its_exports() -> None:
    from isthmus.discovery.kube.mcs import export_conditions, service_import

    web = Service(
        key("web"),
        HTTP,
        addresses=(("a", ("10.96.0.10",)), ("b", ("10.96.0.11",))),
        vip="240.240.0.1",
    )
    imported = service_import(web)
    assert imported["spec"] == {
        "type": "ClusterSetIP",
        "ips": ["240.240.0.1"],
        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "appProtocol": "http"}],
    }
    assert imported["status"] == {"clusters": [{"cluster": "a"}, {"cluster": "b"}]}
    first = export_conditions(HTTP, imported, [], "T1")
    assert [(c["type"], c["status"], c["reason"], c["lastTransitionTime"]) for c in first] == [
        ("Valid", "True", "Exported", "T1"),
        ("Conflict", "False", "NoConflict", "T1"),
    ]
    # Same statuses later: the transition times stay; a conflict changes only Conflict's.
    assert export_conditions(HTTP, imported, first, "T2") == first
    other = export_conditions(TCP, imported, first, "T3")
    assert [(c["type"], c["status"], c["lastTransitionTime"]) for c in other] == [
        ("Valid", "True", "T1"),
        ("Conflict", "True", "T3"),
    ]
    assert "tcp 5432" in other[1]["message"]
    assert "http 80 (http)" in other[1]["message"]
    gone = export_conditions(None, imported, other, "T4")
    assert [(c["type"], c["status"], c["reason"]) for c in gone] == [("Valid", "False", "NoService")]


def test_the_packaged_member_rbac_is_deploys() -> None:
    """`isthmus cluster add` applies the packaged copy; deploy/member-cluster/rbac.yaml is what
    operators apply by hand: one content (a symlink would vanish from wheels built without deploy/)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    packaged = root / "src/isthmus/manifests/member-rbac.yaml"
    assert not packaged.is_symlink()
    assert packaged.read_text() == (root / "deploy/member-cluster/rbac.yaml").read_text()


def test_desired_imports_are_the_same_mapping_while_no_import_changes() -> None:
    from isthmus.discovery.kube.mcs import Desired

    desired = Desired()
    first = desired(mesh())
    assert set(first) == {"shop/web", "shop/db"}  # "old" has no clusterset IP
    pod = Endpoint("10.1.0.7", Locality("r", "z", "a"))
    moved = MeshView.build(
        [replace(s, endpoints=(pod,)) if s.name == "web" else s for s in mesh().services.values()],
        mesh().clusters.values(),
    )
    assert desired(moved) is first  # an endpoint in a cluster that exports web already: nothing new
    renumbered = MeshView.build(
        [replace(s, vip="240.240.0.9") if s.name == "db" else s for s in mesh().services.values()],
        mesh().clusters.values(),
    )
    again = desired(renumbered)
    assert again is not first
    assert again["shop/db"]["spec"]["ips"] == ["240.240.0.9"]
    assert again["shop/web"] is first["shop/web"]


def test_an_ipv6_clusterset_range_gives_ipv6_addresses() -> None:
    got = clusterset.allocate([key("web"), key("db")], clusterset.network("fd00:240::/120"))
    assert all(ipaddress.ip_address(a).version == 6 for a in got.values()), got
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network("fd00:240::/120") for a in got.values())
    low = clusterset.allocate([key("web")], clusterset.network("::/120"))  # ints below 2**32
    assert ipaddress.ip_address(low[key("web")]).version == 6, low
