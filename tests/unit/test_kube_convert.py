"""Kubernetes objects -> Shard: ports and protocols, slice conditions, locality, identity, mesh and
export policies; per-service recomputation (update_shard) and the slice index. The incremental path
is checked against shard_of on random event sequences in test_kube_incremental.py."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from isthmus.discovery.kube.convert import (
    ClusterObjects,
    ExportPolicy,
    SliceIndex,
    endpoint_health,
    port_protocol,
    shard_of,
    update_shard,
)
from isthmus.discovery.model import Health, MemberCluster, Protocol, ServiceKey

WEB = ServiceKey("shop", "web")


def service(name: str = "web", ns: str = "shop", **spec: Any) -> dict[str, Any]:
    ports = spec.pop("ports", [{"name": "http", "port": 80, "targetPort": 8080}])
    return {"metadata": {"name": name, "namespace": ns}, "spec": {"ports": ports, **spec}}


def eps_slice(
    name: str, endpoints: list[dict[str, Any]], svc: str = "web", ns: str = "shop"
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": endpoints,
    }


def ep(address: str, node: str = "n1", pod: str = "web-1", **conditions: bool) -> dict[str, Any]:
    return {
        "addresses": [address],
        "conditions": conditions or {"ready": True},
        "nodeName": node,
        "targetRef": {"kind": "Pod", "namespace": "shop", "name": pod},
    }


NODES = {
    "n1": {
        "metadata": {
            "name": "n1",
            "labels": {"topology.kubernetes.io/region": "eu", "topology.kubernetes.io/zone": "eu-1"},
        }
    },
}
PODS = {
    "shop/web-1": {
        "metadata": {"name": "web-1", "namespace": "shop"},
        "spec": {"serviceAccountName": "web-sa"},
    }
}


def objects(**kw: Any) -> ClusterObjects:
    base: dict[str, Any] = {
        "services": {"shop/web": service()},
        "endpoint_slices": {"shop/web-abc": eps_slice("web-abc", [ep("127.0.1.1")])},
        "nodes": NODES,
        "pods": PODS,
        "namespaces": {"shop": {"metadata": {"name": "shop"}}},
        "service_exports": {},
    }
    base.update(kw)
    return ClusterObjects(**base)


CLUSTER = MemberCluster("a", region="fallback-region", zone="fallback-zone")


def test_service_and_endpoint_conversion() -> None:
    shard = shard_of(CLUSTER, objects())
    (port,) = shard.services[WEB]
    assert (port.name, port.port, port.target_port, port.protocol) == ("http", 80, 8080, Protocol.HTTP)
    (endpoint,) = shard.endpoints[WEB]
    assert endpoint.address == "127.0.1.1"
    assert (endpoint.locality.region, endpoint.locality.zone, endpoint.locality.cluster) == (
        "eu",
        "eu-1",
        "a",
    )
    assert endpoint.service_account == "web-sa"
    assert endpoint.port_for(port) == 8080


@pytest.mark.parametrize(
    ("conditions", "health"),
    [
        ({"ready": True}, Health.HEALTHY),
        ({}, Health.HEALTHY),
        ({"ready": False, "serving": True, "terminating": True}, Health.DRAINING),
        ({"ready": False, "serving": False, "terminating": True}, Health.UNHEALTHY),
        ({"ready": False}, Health.UNHEALTHY),
    ],
)
def test_endpoint_health(conditions: dict[str, bool], health: Health) -> None:
    assert endpoint_health(conditions) is health


@pytest.mark.parametrize(
    ("port", "protocol"),
    [
        ({"name": "http-web"}, Protocol.HTTP),
        ({"name": "grpc"}, Protocol.GRPC),
        ({"name": "web", "appProtocol": "kubernetes.io/h2c"}, Protocol.HTTP2),
        ({"name": "db"}, Protocol.TCP),
        ({"appProtocol": "http", "name": "tcp-ish"}, Protocol.HTTP),
    ],
)
def test_port_protocol(port: dict[str, str], protocol: Protocol) -> None:
    assert port_protocol(port) is protocol


def test_address_in_two_slices_counts_once_healthiest_wins() -> None:
    slices = {
        "shop/s1": eps_slice("s1", [ep("127.0.1.1", ready=False)]),
        "shop/s2": eps_slice("s2", [ep("127.0.1.1", ready=True)]),
    }
    (endpoint,) = shard_of(CLUSTER, objects(endpoint_slices=slices)).endpoints[WEB]
    assert endpoint.health is Health.HEALTHY


def test_locality_falls_back_to_cluster_defaults_and_endpoint_zone() -> None:
    slices = {"shop/s": eps_slice("s", [{**ep("127.0.1.2", node="unknown"), "zone": "z-own"}])}
    (endpoint,) = shard_of(CLUSTER, objects(endpoint_slices=slices)).endpoints[WEB]
    assert (endpoint.locality.region, endpoint.locality.zone) == ("fallback-region", "z-own")


def test_namespace_opt_out_and_opt_in() -> None:
    disabled = {"shop": {"metadata": {"name": "shop", "labels": {"isthmus.io/mesh": "disabled"}}}}
    assert WEB not in shard_of(CLUSTER, objects(namespaces=disabled)).services
    assert WEB not in shard_of(CLUSTER, objects(), require_namespace_label=True).services
    enabled = {"shop": {"metadata": {"name": "shop", "labels": {"isthmus.io/mesh": "enabled"}}}}
    assert WEB in shard_of(CLUSTER, objects(namespaces=enabled), require_namespace_label=True).services


def test_export_policy_serviceexport() -> None:
    assert WEB not in shard_of(CLUSTER, objects(), ExportPolicy.SERVICE_EXPORT).services
    exports = {"shop/web": {"metadata": {"name": "web", "namespace": "shop"}}}
    shard = shard_of(CLUSTER, objects(service_exports=exports), ExportPolicy.SERVICE_EXPORT)
    assert WEB in shard.services


def test_external_name_and_udp_only_services_are_skipped() -> None:
    svcs = {
        "shop/web": service(type="ExternalName", externalName="example.org"),
        "shop/dns": service("dns", ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]),
    }
    assert shard_of(CLUSTER, objects(services=svcs)).services == {}


def test_update_shard_recomputes_dirty_services_and_reuses_the_others() -> None:
    api = ServiceKey("shop", "api")
    objs = objects(
        services={"shop/web": service(), "shop/api": service("api")},
        endpoint_slices={
            "shop/web-abc": eps_slice("web-abc", [ep("127.0.1.1")]),
            "shop/api-abc": eps_slice("api-abc", [ep("127.0.2.1")], svc="api"),
        },
    )
    index = SliceIndex.of(objs.endpoint_slices)
    before = shard_of(CLUSTER, objs, index=index)
    slices = {**objs.endpoint_slices, "shop/web-abc": eps_slice("web-abc", [ep("127.0.1.1", ready=False)])}
    changed = replace(objs, endpoint_slices=slices)
    dirty = index.update("shop/web-abc", slices["shop/web-abc"])
    assert dirty == {WEB}
    after = update_shard(before, changed, index, dirty)
    assert after.endpoints[WEB][0].health is Health.UNHEALTHY
    assert after.endpoints[api] is before.endpoints[api]
    full = shard_of(CLUSTER, changed)
    assert (after.services, after.endpoints) == (full.services, full.endpoints)


def test_slice_index_follows_relabels_and_deletions() -> None:
    api = ServiceKey("shop", "api")
    index = SliceIndex.of({"shop/s": eps_slice("s", [ep("127.0.1.1", pod="web-1")])})
    assert index.slices(WEB) == ["shop/s"]
    assert index.services_of_pod("shop/web-1") == {WEB}
    assert index.update("shop/s", eps_slice("s", [ep("127.0.1.1", pod="api-1")], svc="api")) == {WEB, api}
    assert (index.slices(WEB), index.slices(api)) == ([], ["shop/s"])
    assert (index.services_of_pod("shop/web-1"), index.services_of_pod("shop/api-1")) == (set(), {api})
    unlabelled = {**eps_slice("s", []), "metadata": {"name": "s", "namespace": "shop"}}
    assert index.update("shop/s", unlabelled) == {api}
    assert index.update("shop/s", None) == set()
    assert index.slices(api) == []


def test_a_service_is_exported_since_its_service_export_else_its_service() -> None:
    svc = service()
    svc["metadata"]["creationTimestamp"] = "2026-11-01T00:00:00Z"
    shard = shard_of(CLUSTER, objects(services={"shop/web": svc}))
    assert shard.exported_at[WEB] == "2026-11-01T00:00:00Z"
    export = {"metadata": {"name": "web", "namespace": "shop", "creationTimestamp": "2026-11-20T00:00:00Z"}}
    exported = objects(services={"shop/web": svc}, service_exports={"shop/web": export})
    assert shard_of(CLUSTER, exported, ExportPolicy.SERVICE_EXPORT).exported_at[WEB] == "2026-11-20T00:00:00Z"
