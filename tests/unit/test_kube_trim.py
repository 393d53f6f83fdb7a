"""trim.py: what discovery keeps of each Kubernetes object is all its consumers read, and little else.

Per kind, for whole objects as a real API server serves them (managedFields, status, the
last-applied annotation, labels and annotations nobody reads), every consumer's result on the
trimmed object equals its result on the whole one, and the trimmed object is much smaller. The
fixtures set every field a consumer reads, with values that decide the results (ports by name and
number, every endpoint condition, zones from the endpoint and from the node, a gateway by ingress
and by node port, ...). Independently of those values, the consumers also read the whole objects
through a recording wrapper: every field they look at must be in the trimmed object, with the same
value, so a trim that drops a field a converter reads fails here even where the result would not
show it. The Reflector stores objects through the trim and judges changes on trimmed objects.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
import yaml

from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.kube import trim
from isthmus.discovery.kube.cluster import ClusterPolicy, ClusterWatcher
from isthmus.discovery.kube.config_api import (
    KIND,
    MESH_KIND,
    Condition,
    ConfigApi,
    Report,
    drain_target,
    mesh_overrides,
)
from isthmus.discovery.kube.convert import (
    ClusterObjects,
    ExportPolicy,
    SliceIndex,
    mesh_label,
    node_locality,
    policy_reads,
    route_reads,
    shard_of,
    traffic_splits,
)
from isthmus.discovery.kube.gateway import gateway_of, gateway_ready, gateway_service, sidecar_port
from isthmus.discovery.kube.kubeconfig import Credentials
from isthmus.discovery.kube.mcs import ImportWriter, service_import
from isthmus.discovery.kube.reflector import Reflector, object_key
from isthmus.discovery.kube.secrets import credentials_of
from isthmus.discovery.model import Gateway, MemberCluster, Protocol, Service, ServiceKey, ServicePort

Obj = dict[str, Any]


# ---- whole objects, as a real API server serves them -------------------------------------------


def managed_fields(manager: str, *fields: str) -> list[Obj]:
    """A managedFields list like a real server's (server-side apply's record of who set what)."""
    tree: Obj = {f"f:{name}": {} for name in fields}
    return [
        {
            "manager": manager,
            "operation": "Update",
            "apiVersion": "v1",
            "time": "2025-11-02T09:14:03Z",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}}, "f:spec": tree},
        },
        {
            "manager": "kubectl-client-side-apply",
            "operation": "Update",
            "apiVersion": "v1",
            "time": "2025-11-02T09:14:03Z",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last": {}}}},
        },
    ]


def meta(name: str, namespace: str | None = "shop", **extra: Any) -> Obj:
    """Metadata with everything a real server adds: uid, resourceVersion, managedFields, ..."""
    out: Obj = {"name": name}
    if namespace is not None:
        out["namespace"] = namespace
    out |= {
        "uid": f"7c1e0a52-{zlib.crc32(f'{namespace}/{name}'.encode()):08x}-4a8e-9f3b-0242ac120002",
        "resourceVersion": "48213",
        "generation": 3,
        "creationTimestamp": "2025-11-02T09:14:03Z",
        "labels": {"app": name, "app.kubernetes.io/part-of": "shop", **extra.pop("labels", {})},
        "annotations": {
            "kubectl.kubernetes.io/last-applied-configuration": json.dumps({"metadata": {"name": name}}) * 8,
            **extra.pop("annotations", {}),
        },
        "managedFields": managed_fields("kube-controller-manager", "ports", "selector", "type"),
    }
    return out | extra


def service(name: str, namespace: str = "shop", labels: Obj | None = None, **spec: Any) -> Obj:
    created = spec.pop("created", "2025-11-02T09:14:03Z")
    status = spec.pop("status", {"loadBalancer": {}})
    return {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": meta(name, namespace, labels=labels or {}, creationTimestamp=created),
        "spec": {
            "selector": {"app": name},
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "type": "ClusterIP",
            **spec,
        },
        "status": status,
    }


GATEWAY = {"isthmus.io/gateway": "eastwest"}
WEB_PORTS = [
    {"name": "http", "protocol": "TCP", "appProtocol": "http", "port": 80, "targetPort": 8080},
    {"name": "grpc-api", "protocol": "TCP", "port": 9090, "targetPort": "grpc"},
    {"name": "web", "protocol": "TCP", "appProtocol": "kubernetes.io/h2c", "port": 8443, "targetPort": 8443},
    {"name": "metrics", "protocol": "TCP", "port": 9100, "targetPort": 9100},
    {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 53},
]
SERVICES = {
    "shop/web": service(
        "web",
        ports=WEB_PORTS,
        clusterIP="10.96.12.7",
        clusterIPs=["10.96.12.7", "fd00:10:96::c07"],
        ipFamilies=["IPv4", "IPv6"],
        ipFamilyPolicy="PreferDualStack",
    ),
    "shop/db": service(
        "db", ports=[{"protocol": "TCP", "port": 5432, "targetPort": 5432}], clusterIP="10.96.0.9"
    ),
    "shop/cache": service(
        "cache",
        ports=[{"name": "tcp-redis", "port": 6379, "targetPort": 6379}],
        clusterIP="None",
        clusterIPs=["None"],
    ),
    "shop/ext": service("ext", type="ExternalName", externalName="db.example.com", ports=WEB_PORTS[:1]),
    "shop/udp": service("udp", ports=WEB_PORTS[4:], clusterIP="10.96.0.10"),
    "legacy/old": service("old", "legacy", ports=WEB_PORTS[:1], clusterIP="10.96.0.11"),
    "other/api": service(
        "api", "other", ports=WEB_PORTS[:2], clusterIP="10.96.0.12", created="2025-10-01T00:00:00Z"
    ),
    "isthmus-system/eastwest": service(
        "eastwest",
        "isthmus-system",
        GATEWAY,
        type="LoadBalancer",
        ports=[
            {"name": "status", "protocol": "TCP", "port": 15021, "targetPort": 15021, "nodePort": 31021},
            {"name": "tls", "protocol": "TCP", "port": 15443, "targetPort": 15443, "nodePort": 31443},
        ],
        clusterIP="10.96.0.40",
        externalTrafficPolicy="Local",
        healthCheckNodePort=30111,
        status={
            "loadBalancer": {"ingress": [{"ip": "203.0.113.7", "ipMode": "VIP", "ports": [{"port": 15443}]}]}
        },
    ),
}
# Gateways found other ways: a pending LoadBalancer (its node port), a hostname, a NodePort one.
GATEWAYS_BY_NODE_PORT = {
    "gw/eastwest": service(
        "eastwest",
        "gw",
        GATEWAY,
        type="NodePort",
        ports=[{"name": "mtls", "protocol": "TCP", "port": 15443, "targetPort": 15443, "nodePort": 32443}],
    ),
}
GATEWAYS_BY_HOSTNAME = {
    "gw/eastwest": service(
        "eastwest",
        "gw",
        GATEWAY,
        type="LoadBalancer",
        ports=[{"protocol": "TCP", "port": 443, "targetPort": 15443, "nodePort": 30443}],
        status={"loadBalancer": {"ingress": [{"hostname": "gw.elb.example.com"}]}},
    ),
    "gw/pending": service(
        "pending",
        "gw",
        GATEWAY,
        type="LoadBalancer",
        ports=[{"name": "tls", "port": 15443, "nodePort": 31999}],
    ),
}


def endpoint(
    address: str | None,
    node: str | None,
    pod: str | None,
    zone: str | None = None,
    namespace: str | None = "shop",
    **conditions: bool,
) -> Obj:
    out: Obj = {"addresses": [address] if address else []}
    if conditions:
        out["conditions"] = conditions
    if node:
        out["nodeName"] = node
    if zone:
        out["zone"] = zone
        out["hints"] = {"forZones": [{"name": zone}]}
    if pod:
        ref = {"kind": "Pod", "name": pod, "uid": f"uid-{pod}", "resourceVersion": "481"}
        out["targetRef"] = ref | ({"namespace": namespace} if namespace else {})
    out["hostname"] = pod or "none"
    out["deprecatedTopology"] = {"kubernetes.io/hostname": node or ""}
    return out


def endpoint_slice(
    name: str,
    service_name: str,
    endpoints: list[Obj],
    ports: list[Obj],
    namespace: str = "shop",
    **extra: Any,
) -> Obj:
    labels = {
        "kubernetes.io/service-name": service_name,
        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
    }
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": meta(
            name,
            namespace,
            labels=labels,
            annotations={"endpoints.kubernetes.io/last-change-trigger-time": "2025-11-02T09:14:03Z"},
            generateName=f"{service_name}-",
            ownerReferences=[
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": service_name,
                    "uid": "7c1e0a52",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        ),
        "addressType": extra.pop("addressType", "IPv4"),
        "endpoints": endpoints,
        "ports": ports,
        **extra,
    }


SLICE_PORTS = [
    {"name": "http", "protocol": "TCP", "port": 8080, "appProtocol": "http"},
    {"name": "grpc-api", "protocol": "TCP", "port": 9091},
    {"name": "web", "protocol": "TCP", "port": 8443},
]
SLICES = {
    "shop/web-a1b2c": endpoint_slice(
        "web-a1b2c",
        "web",
        [
            endpoint("10.1.0.1", "node-a", "web-1", ready=True, serving=True, terminating=False),
            endpoint(
                "10.1.0.2", "node-a", "web-2", "eu-west-1c", ready=False, serving=True, terminating=True
            ),
            endpoint("10.1.0.3", "node-b", "web-3", ready=False, serving=False, terminating=True),
            endpoint("10.1.0.4", "node-b", "web-4", ready=False),
            endpoint("10.1.0.5", "node-unknown", "web-5"),  # no conditions: ready
            endpoint("10.1.0.6", None, "web-6", namespace=None, ready=True),  # targetRef without namespace
            endpoint("10.1.0.7", "node-a", None, ready=True),  # no targetRef: no pod, no identity
            endpoint(None, "node-a", "web-8", ready=True),  # no address: skipped
            endpoint("10.1.0.9", "node-a", "web-9", terminating=True),  # ready absent, terminating: unhealthy
        ],
        SLICE_PORTS,
    ),
    # The same addresses in a second slice: the healthiest of each counts, the first slice between equals.
    "shop/web-d3e4f": endpoint_slice(
        "web-d3e4f",
        "web",
        [
            endpoint("10.1.0.3", "node-a", "web-3", ready=True),
            endpoint("10.1.0.4", "node-b", "web-4", ready=False, serving=True, terminating=True),
            endpoint("10.1.0.1", "node-b", "web-1", "eu-west-1b", ready=True),
        ],
        SLICE_PORTS[:1],
    ),
    "shop/web-v6": endpoint_slice(
        "web-v6",
        "web",
        [endpoint("fd00:10:1::1", "node-a", "web-1", ready=True)],
        SLICE_PORTS,
        addressType="IPv6",
    ),
    "shop/web-fqdn": endpoint_slice(
        "web-fqdn",
        "web",
        [endpoint("web.example.com", "node-a", None, ready=True)],
        SLICE_PORTS,
        addressType="FQDN",
    ),
    "shop/db-x1": endpoint_slice(  # a single-port service's unnamed slice port
        "db-x1", "db", [endpoint("10.1.1.1", "node-b", "db-0", ready=True)], [{"name": "", "port": 5432}]
    ),
    "shop/cache-x1": endpoint_slice(
        "cache-x1", "cache", [endpoint("10.1.2.1", "node-a", "cache-0", ready=True)], [{"port": 6379}]
    ),
    "other/api-x1": endpoint_slice(
        "api-x1", "api", [endpoint("10.1.3.1", "node-a", "api-0", namespace="other")], SLICE_PORTS, "other"
    ),
    "shop/orphan": endpoint_slice("orphan", "", [endpoint("10.1.9.9", "node-a", "web-1")], SLICE_PORTS),
    "isthmus-system/eastwest-x1": endpoint_slice(
        "eastwest-x1",
        "eastwest",
        [
            endpoint("10.1.4.1", "node-a", "gw-0", ready=False, serving=True, terminating=True),
            endpoint("10.1.4.2", "node-b", "gw-1", ready=True),
        ],
        [{"name": "tls", "port": 15443}],
        "isthmus-system",
    ),
}


def node(name: str, labels: Obj, addresses: list[Obj]) -> Obj:
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": meta(
            name,
            None,
            labels={
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "node.kubernetes.io/instance-type": "m5.large",
                **labels,
            },
            annotations={
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
        ),
        "spec": {
            "podCIDR": "10.1.0.0/24",
            "podCIDRs": ["10.1.0.0/24"],
            "providerID": f"aws:///eu-west-1a/{name}",
        },
        "status": {
            "addresses": addresses,
            "capacity": {"cpu": "2", "memory": "8025124Ki", "pods": "110", "ephemeral-storage": "81106868Ki"},
            "allocatable": {"cpu": "1930m", "memory": "7284772Ki", "pods": "110"},
            "conditions": [
                {
                    "type": kind,
                    "status": "False" if kind != "Ready" else "True",
                    "lastHeartbeatTime": "2025-11-02T10:01:12Z",
                    "lastTransitionTime": "2025-11-02T09:00:00Z",
                    "reason": f"Kubelet{kind}",
                    "message": f"kubelet reports {kind}",
                }
                for kind in ("MemoryPressure", "DiskPressure", "PIDPressure", "Ready")
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "kubeletVersion": "v1.34.1",
                "containerRuntimeVersion": "containerd://2.1.4",
                "osImage": "Debian",
            },
            "images": [
                {"names": [f"registry.example/app-{i}@sha256:{i:064x}"], "sizeBytes": 10**7 + i}
                for i in range(30)
            ],
        },
    }


REGION, ZONE = "topology.kubernetes.io/region", "topology.kubernetes.io/zone"
NODES = {
    "node-a": node(
        "node-a",
        {REGION: "eu-west-1", ZONE: "eu-west-1a"},
        [
            {"type": "InternalIP", "address": "192.168.1.10"},
            {"type": "Hostname", "address": "node-a"},
            {"type": "ExternalIP", "address": "198.51.100.10"},
        ],
    ),
    "node-b": node("node-b", {REGION: "eu-west-1"}, [{"type": "InternalIP", "address": "192.168.1.11"}]),
}
NODES_INTERNAL_ONLY = {"node-b": NODES["node-b"]}


def pod(name: str, namespace: str = "shop", account: str | None = None, inbound: str | None = "15006") -> Obj:
    annotations = {"kubectl.kubernetes.io/restartedAt": "2025-11-02T09:00:00Z"}
    if inbound is not None:
        annotations["isthmus.io/inbound-port"] = inbound
    spec: Obj = {
        "containers": [
            {
                "name": "app",
                "image": f"registry.example/{name}:1.2.3",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": f"VAR_{i}", "value": "x" * 40} for i in range(10)],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                "volumeMounts": [
                    {"name": "kube-api-access", "mountPath": "/var/run/secrets", "readOnly": True}
                ],
            },
            {"name": "isthmus-proxy", "image": "envoyproxy/envoy:v1.40.0", "args": ["-c", "/etc/envoy.yaml"]},
        ],
        "nodeName": "node-a",
        "restartPolicy": "Always",
        "dnsPolicy": "ClusterFirst",
        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}],
        "volumes": [
            {
                "name": "kube-api-access",
                "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]},
            }
        ],
    }
    if account is not None:
        spec["serviceAccount"] = spec["serviceAccountName"] = account
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": meta(
            name,
            namespace,
            annotations=annotations,
            generateName=name.rsplit("-", 1)[0] + "-",
            ownerReferences=[{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d8f", "uid": "u"}],
        ),
        "spec": spec,
        "status": {
            "phase": "Running",
            "podIP": "10.1.0.1",
            "podIPs": [{"ip": "10.1.0.1"}],
            "hostIP": "192.168.1.10",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2025-11-02T09:14:33Z"}],
            "containerStatuses": [
                {
                    "name": "app",
                    "ready": True,
                    "restartCount": 0,
                    "image": "x",
                    "imageID": "y",
                    "started": True,
                }
            ],
        },
    }


PODS = {
    "shop/web-1": pod("web-1", account="web"),
    "shop/web-2": pod("web-2", account="web", inbound="not-a-port"),
    "shop/web-3": pod("web-3", account="web-canary", inbound=None),
    "shop/web-4": pod("web-4"),  # no service account: "default"
    "shop/web-6": pod("web-6", account="web", inbound="99999"),
    "shop/web-9": pod("web-9", account="web"),
    "shop/db-0": pod("db-0", account="db", inbound="15007"),
    "shop/cache-0": pod("cache-0", account="cache"),
    "other/api-0": pod("api-0", "other", account="api"),
    "isthmus-system/gw-1": pod("gw-1", "isthmus-system", account="isthmus-gateway", inbound=None),
}


def namespace(name: str, mesh: str | None) -> Obj:
    labels = {"kubernetes.io/metadata.name": name}
    if mesh is not None:
        labels["isthmus.io/mesh"] = mesh
    return {
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": meta(name, None, labels=labels),
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


NAMESPACES = {
    "shop": namespace("shop", "enabled"),
    "legacy": namespace("legacy", "disabled"),
    "other": namespace("other", None),
    "isthmus-system": namespace("isthmus-system", "enabled"),
}


def service_export(name: str, namespace: str = "shop", conditions: list[Obj] | None = None) -> Obj:
    out: Obj = {
        "apiVersion": "multicluster.x-k8s.io/v1alpha1",
        "kind": "ServiceExport",
        "metadata": meta(name, namespace, creationTimestamp="2025-09-01T12:00:00Z"),
        "spec": {},
    }
    if conditions is not None:
        out["status"] = {"conditions": conditions, "observedBy": "another-controller"}
    return out


EXPORTS = {
    "shop/web": service_export(
        "web",
        conditions=[
            {
                "type": "Valid",
                "status": "True",
                "reason": "Exported",
                "message": "",
                "lastTransitionTime": "T0",
            },
            {
                "type": "Conflict",
                "status": "False",
                "reason": "NoConflict",
                "message": "",
                "lastTransitionTime": "T0",
            },
        ],
    ),
    "shop/db": service_export("db"),
    "shop/gone": service_export(
        "gone", conditions=[{"type": "Valid", "status": "True", "lastTransitionTime": "T1"}]
    ),
}


def traffic_split(name: str, spec: Obj, namespace: str = "shop") -> Obj:
    return {
        "apiVersion": "split.smi-spec.io/v1alpha2",
        "kind": "TrafficSplit",
        "metadata": meta(name, namespace),
        "spec": spec,
    }


SPLITS = {
    "shop/web": traffic_split(
        "web",
        {
            "service": "web",
            "backends": [
                {"service": "web-v1", "weight": 90, "note": "stable"},
                {"service": "web-v2", "weight": 10},
                {"service": "web-v3", "weight": "10"},  # not an integer: skipped
                "not-a-backend",
            ],
            "matches": [{"kind": "HTTPRouteGroup", "name": "canary"}],
        },
    ),
    "shop/zero": traffic_split("zero", {"service": "db", "backends": [{"service": "db-v2", "weight": 0}]}),
    "legacy/old": traffic_split(
        "old", {"service": "old", "backends": [{"service": "x", "weight": 1}]}, "legacy"
    ),
    "other/api": traffic_split(
        "api", {"service": "api", "backends": [{"service": "api-v2", "weight": True}]}, "other"
    ),
}


def route(kind: str, name: str, spec: Obj, namespace: str = "shop", generation: int = 3) -> Obj:
    """An HTTPRoute or GRPCRoute as a real server serves it: with status written by controllers."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": kind,
        "metadata": meta(name, namespace, generation=generation),
        "spec": spec,
        "status": {
            "parents": [
                {
                    "parentRef": {"group": "", "kind": "Service", "name": "web"},
                    "controllerName": "example.com/another-mesh",
                    "conditions": [
                        {
                            "type": "Accepted",
                            "status": "True",
                            "reason": "Accepted",
                            "observedGeneration": generation,
                            "lastTransitionTime": "2025-11-02T09:14:03Z",
                            "message": "x" * 200,
                        }
                    ],
                }
            ]
        },
    }


WEB_PARENT = {"group": "", "kind": "Service", "name": "web", "port": 80}
HTTP_ROUTES = {
    # Every feature the reader knows: decides the rules read by every field.
    "shop/web-canary": route(
        "HTTPRoute",
        "web-canary",
        {
            "parentRefs": [
                WEB_PARENT,
                {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "ingress"},
                {"kind": "Service", "name": "api", "namespace": "other"},  # a consumer route's parent
            ],
            "hostnames": ["web.shop.svc.cluster.local"],
            "rules": [
                {
                    "name": "canary",
                    "matches": [
                        {
                            "path": {"type": "PathPrefix", "value": "/api"},
                            "headers": [
                                {"name": "X-Canary", "value": "yes"},
                                {"type": "RegularExpression", "name": "x-user", "value": "^[a-z]+$"},
                            ],
                            "queryParams": [{"name": "debug", "value": "1"}],
                            "method": "get",
                        }
                    ],
                    "backendRefs": [
                        {"name": "web-v2", "port": 80, "weight": 20},
                        {"name": "web-v1", "port": 80, "weight": 80, "kind": "Service", "group": ""},
                        {"name": "web-x", "port": 80, "namespace": "elsewhere"},  # RefNotPermitted
                    ],
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {
                                "set": [{"name": "x-route", "value": "canary"}],
                                "add": [{"name": "x-more", "value": "1"}],
                                "remove": ["x-drop"],
                            },
                        },
                        {
                            "type": "ResponseHeaderModifier",
                            "responseHeaderModifier": {"set": [{"name": "x-served", "value": "v2"}]},
                        },
                        {
                            "type": "RequestMirror",
                            "requestMirror": {
                                "backendRef": {"name": "web-shadow", "port": 80},
                                "fraction": {"numerator": 1, "denominator": 4},
                            },
                        },
                        {
                            "type": "URLRewrite",
                            "urlRewrite": {
                                "hostname": "web.internal",
                                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"},
                            },
                        },
                    ],
                    "timeouts": {"request": "10s", "backendRequest": "2s500ms"},
                    "retry": {"attempts": 3, "codes": [503], "backoff": "100ms"},
                    "sessionPersistence": {"sessionName": "s", "type": "Cookie"},
                },
                {
                    "matches": [{"path": {"type": "Exact", "value": "/old"}}],
                    "filters": [
                        {
                            "type": "RequestRedirect",
                            "requestRedirect": {
                                "scheme": "https",
                                "hostname": "new.example",
                                "port": 8443,
                                "statusCode": 301,
                                "path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"},
                            },
                        }
                    ],
                },
                {"backendRefs": [{"name": "web-v1", "port": 80}]},
            ],
        },
    ),
    # An RE2-rejected regular expression: refused (not Accepted), with the reason.
    "shop/bad-regex": route(
        "HTTPRoute",
        "bad-regex",
        {
            "parentRefs": [{"kind": "Service", "name": "web"}],
            "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/(?=lookahead)"}}]}],
        },
        generation=7,
    ),
    # A Gateway's route (north-south): not the mesh's.
    "shop/ingress": route(
        "HTTPRoute",
        "ingress",
        {
            "parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public"}],
            "rules": [{"backendRefs": [{"name": "web", "port": 80}]}],
        },
    ),
    # In a namespace out of the mesh (labelled disabled), and one not labelled.
    "legacy/old": route(
        "HTTPRoute", "old", {"parentRefs": [{"kind": "Service", "name": "old"}]}, namespace="legacy"
    ),
    "other/api": route(
        "HTTPRoute",
        "api",
        {"parentRefs": [{"kind": "Service", "name": "api", "port": 9090}], "rules": [{}]},
        namespace="other",
    ),
}
GRPC_ROUTES = {
    "shop/web-grpc": route(
        "GRPCRoute",
        "web-grpc",
        {
            "parentRefs": [{"kind": "Service", "name": "web", "port": 9090, "sectionName": ""}],
            "hostnames": ["web"],
            "rules": [
                {
                    "matches": [
                        {
                            "method": {"type": "Exact", "service": "shop.Web", "method": "Get"},
                            "headers": [{"name": "x-tenant", "value": "a"}],
                        },
                        {"method": {"type": "RegularExpression", "service": "shop\\..*"}},
                        {"method": {"method": "List"}},
                    ],
                    "backendRefs": [{"name": "web-v2", "port": 9090}],
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {"set": [{"name": "x-grpc", "value": "1"}]},
                        }
                    ],
                }
            ],
        },
    ),
    # A filter GRPCRoute does not have: refused.
    "shop/grpc-redirect": route(
        "GRPCRoute",
        "grpc-redirect",
        {
            "parentRefs": [{"kind": "Service", "name": "web"}],
            "rules": [{"filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 301}}]}],
        },
    ),
}
ROUTES = {"HTTPRoute": HTTP_ROUTES, "GRPCRoute": GRPC_ROUTES}
ROUTE_TRIMS: dict[str, trim.Trim] = {"HTTPRoute": trim.http_route, "GRPCRoute": trim.grpc_route}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def kubeconfig(server: str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "c", "cluster": {"server": server, "certificate-authority-data": b64("CA" * 300)}}
            ],
            "users": [{"name": "u", "user": {"token": "t0k3n"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        }
    )


SECRETS = {
    "isthmus-system/members": {
        "kind": "Secret",
        "apiVersion": "v1",
        "metadata": meta("members", "isthmus-system", labels={"isthmus.io/member-cluster": "true"}),
        "type": "Opaque",
        "data": {
            "east": b64(kubeconfig("https://east.example:6443")),
            "west": "not base64!",
            "Bad_Name": b64(kubeconfig("https://x.example")),
        },
    },
    "isthmus-system/more": {
        "kind": "Secret",
        "apiVersion": "v1",
        "metadata": meta("more", "isthmus-system", labels={"isthmus.io/member-cluster": "true"}),
        "type": "Opaque",
        "data": {"east": b64(kubeconfig("https://other.example")), "south": b64("clusters: []")},
    },
}


def member_cluster(name: str, spec: Obj, status: Obj | None = None) -> Obj:
    out: Obj = {
        "apiVersion": "isthmus.io/v1alpha1",
        "kind": "MemberCluster",
        "metadata": meta(name, "isthmus-system"),
        "spec": spec,
    }
    if status is not None:
        out["status"] = status
    return out


MEMBER_CLUSTERS = {
    "isthmus-system/east": member_cluster(
        "east",
        {"drain": {"weight": 40}},
        {
            "drain": {"weight": 70, "state": "Draining", "proxiesWaiting": 2, "updated": "T5"},
            "conditions": [
                {"type": "Accepted", "status": "True", "reason": "Accepted", "lastTransitionTime": "T1"},
                {"type": "Synced", "status": "False", "reason": "Unreachable", "lastTransitionTime": "T2"},
                {"type": "Audited", "status": "True", "reason": "ByOthers", "lastTransitionTime": "T3"},
            ],
            "note": "written by someone else",
        },
    ),
    "isthmus-system/west": member_cluster("west", {}),
    "isthmus-system/bad": member_cluster("bad", {"drain": {"weight": 400}}),
    "isthmus-system/worse": member_cluster("worse", {"drainage": True}),
}
MESH_CONFIGS = {
    "isthmus-system/default": {
        "apiVersion": "isthmus.io/v1alpha1",
        "kind": "MeshConfig",
        "metadata": meta("default", "isthmus-system"),
        "spec": {
            "trustDomain": "mesh.example",
            "exportPolicy": "serviceexport",
            "maxStaleness": "90s",
            "debounce": {"quiet": "0.2s"},
            "gateways": [{"cluster": "east", "address": "gw.east", "port": 15443}],
        },
        "status": {"inForce": [{"name": "trust_domain", "value": "x", "source": "flag"}], "conditions": []},
    },
    "isthmus-system/extra": {
        "apiVersion": "isthmus.io/v1alpha1",
        "kind": "MeshConfig",
        "metadata": meta("extra", "isthmus-system"),
        "spec": {"maxStaleness": "soon"},
    },
}


def trimmed(objs: Mapping[str, Obj], trim_fn: trim.Trim) -> dict[str, Obj]:
    return {key: trim_fn(obj) for key, obj in objs.items()}


# ---- what the consumers read: a recording view of the whole objects -----------------------------

Path = tuple[str | int, ...]
WHOLE = "*"  # the path's dict was iterated: all its keys are read


class Read(Mapping[str, Any]):
    """A read-only view of a JSON object that notes the path of every field looked at."""

    def __init__(
        self, data: Mapping[str, Any], path: Path, seen: set[Path], lists: type | None = None
    ) -> None:
        self._data, self._path, self._seen, self._lists = data, path, seen, lists

    def __getitem__(self, key: str) -> Any:
        value = self._data[key]  # a KeyError (a field absent) notes nothing: there is nothing to keep
        self._seen.add((*self._path, key))
        return _view(value, (*self._path, key), self._seen, self._lists)

    def __iter__(self) -> Iterator[str]:
        self._seen.add((*self._path, WHOLE))
        return iter(self._data)

    def __len__(self) -> int:
        self._seen.add((*self._path, WHOLE))
        return len(self._data)

    def __bool__(self) -> bool:  # ``x or {}``: a default for an absent or empty object, no field read
        return bool(self._data)


class ReadList(Sequence[Any]):
    def __init__(self, data: list[Any], path: Path, seen: set[Path]) -> None:
        self._data, self._path, self._seen = data, path, seen
        seen.add(path)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self._data))[index]]
        value = self._data[index]
        index = index % len(self._data)
        self._seen.add((*self._path, index))
        return _view(value, (*self._path, index), self._seen)

    def __len__(self) -> int:
        return len(self._data)


class ReadAsList(list[Any]):
    """A recording list that is a ``list`` (discovery.gamma checks ``isinstance(value, list)``, as a
    reader of JSON may): its items are there for ``len`` and truth, and read through ``[]`` and
    iteration only, which note their paths; its dicts and lists are recording views in turn."""

    def __init__(self, data: list[Any], path: Path, seen: set[Path]) -> None:
        super().__init__(data)
        self._path, self._seen = path, seen
        seen.add(path)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        value = super().__getitem__(index)
        index = index % len(self)
        self._seen.add((*self._path, index))
        return _view(value, (*self._path, index), self._seen, ReadAsList)

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))


def _view(value: Any, path: Path, seen: set[Path], lists: type | None = None) -> Any:
    if isinstance(value, dict):
        return Read(value, path, seen, lists)
    if isinstance(value, list):
        return (lists or ReadList)(value, path, seen)
    return value


def read_objects(
    objs: Mapping[str, Obj], seen: dict[str, set[Path]], lists: type | None = None
) -> dict[str, Any]:
    """The objects as recording views; ``seen[key]`` collects the paths read of each (``lists``:
    ReadAsList for readers that want JSON lists to be lists)."""
    return {key: _view(obj, (), seen.setdefault(key, set()), lists) for key, obj in objs.items()}


def _at(obj: Any, path: Path) -> Any:
    for step in path:
        obj = obj[step]
    return obj


def unkept(whole: Mapping[str, Obj], seen: Mapping[str, set[Path]], trim_fn: trim.Trim) -> list[str]:
    """The fields the consumers read of each whole object that its trimmed copy lacks or changes
    (and a note if they read nothing at all): empty when the trim keeps what is read."""
    problems = [] if any(seen.values()) else ["the consumers read nothing"]
    for key, paths in seen.items():
        small = trim_fn(whole[key])
        for path in sorted(paths, key=lambda p: (len(p), [str(s) for s in p])):
            where = f"{key}: {'.'.join(map(str, path))}"
            if path and path[-1] == WHOLE:
                if _at(small, path[:-1]) != _at(whole[key], path[:-1]):
                    problems.append(f"{where} differs")
                continue
            try:
                kept = _at(small, path)
            except (KeyError, IndexError, TypeError):
                problems.append(f"{where} is read but trimmed away")
                continue
            value = _at(whole[key], path)
            if not isinstance(value, dict | list) and kept != value:
                problems.append(f"{where} differs")
            elif isinstance(value, list) and len(kept) != len(value):
                problems.append(f"{where} lost items")  # its items keep their places
    return problems


def size(obj: Any) -> int:
    return len(json.dumps(obj))


def too_big(whole: Mapping[str, Obj], trim_fn: trim.Trim, most: float) -> list[str]:
    """Why the trimmed objects are not small: managedFields or the last-applied annotation kept,
    or more than ``most`` of the whole ones' size (as JSON) together. Empty when they are."""
    problems = []
    for key, obj in whole.items():
        small = trim_fn(obj)
        if "managedFields" in small["metadata"]:
            problems.append(f"{key}: managedFields kept")
        if "kubectl.kubernetes.io/last-applied-configuration" in small["metadata"].get("annotations", {}):
            problems.append(f"{key}: last-applied annotation kept")
    kept, total = sum(size(trim_fn(obj)) for obj in whole.values()), sum(size(obj) for obj in whole.values())
    if kept > most * total:
        problems.append(f"{kept} of {total} bytes kept")
    return problems


def changes_argument(whole: Mapping[str, Obj], trim_fn: trim.Trim) -> bool:
    before = copy.deepcopy(dict(whole))
    for obj in whole.values():
        trim_fn(obj)
    return dict(whole) != before


# ---- member cluster kinds: the shard, the slice index, gateways, localities ---------------------

CLUSTER = MemberCluster("east", region="fallback-region", zone="fallback-zone")
RULES = [(ExportPolicy.ALL, False), (ExportPolicy.ALL, True), (ExportPolicy.SERVICE_EXPORT, False)]
KINDS: dict[str, tuple[Mapping[str, Obj], trim.Trim]] = {
    "services": (SERVICES, trim.service),
    "endpoint_slices": (SLICES, trim.endpoint_slice),
    "nodes": (NODES, trim.node),
    "pods": (PODS, trim.pod),
    "namespaces": (NAMESPACES, trim.namespace),
    "service_exports": (EXPORTS, trim.service_export),
}


def cluster_objects(make: Callable[[str, Mapping[str, Obj], trim.Trim], Mapping[str, Any]]) -> ClusterObjects:
    return ClusterObjects(**{field: make(field, objs, fn) for field, (objs, fn) in KINDS.items()})


@pytest.mark.parametrize(("export", "require_label"), RULES)
def test_the_shard_of_trimmed_objects_is_the_shard_of_whole_ones(
    export: ExportPolicy, require_label: bool
) -> None:
    whole = shard_of(CLUSTER, cluster_objects(lambda _, objs, fn: objs), export, require_label)
    small = shard_of(CLUSTER, cluster_objects(lambda _, objs, fn: trimmed(objs, fn)), export, require_label)
    assert small == whole
    assert (small.services, small.endpoints, small.addresses, small.exported_at) == (
        whole.services,
        whole.endpoints,
        whole.addresses,
        whole.exported_at,
    )


def test_the_fixtures_decide_the_shard_by_every_field_read() -> None:
    """The equality above means something: the whole objects make a shard that uses every rule."""
    shard = shard_of(CLUSTER, cluster_objects(lambda _, objs, fn: objs))
    web, db, cache = ServiceKey("shop", "web"), ServiceKey("shop", "db"), ServiceKey("shop", "cache")
    assert set(shard.services) == {
        web,
        db,
        cache,
        ServiceKey("other", "api"),
    }  # not ext, udp, legacy, gateway
    assert [(p.name, p.port, p.target_port, p.protocol) for p in shard.services[web]] == [
        ("http", 80, 8080, Protocol.HTTP),
        ("grpc-api", 9090, 9090, Protocol.GRPC),
        ("web", 8443, 8443, Protocol.HTTP2),
        ("metrics", 9100, 9100, Protocol.TCP),
    ]
    assert shard.addresses[web] == ("10.96.12.7", "fd00:10:96::c07")
    assert shard.addresses[cache] == ()
    assert shard.exported_at[ServiceKey("other", "api")] == "2025-10-01T00:00:00Z"
    assert shard.exported_at[web] == "2025-09-01T12:00:00Z"  # its ServiceExport's
    by_address = {e.address: e for e in shard.endpoints[web]}
    assert "web.example.com" not in by_address
    assert "fd00:10:1::1" in by_address
    assert {a: e.health.name for a, e in by_address.items() if a.startswith("10.")} == {
        "10.1.0.1": "HEALTHY",
        "10.1.0.2": "DRAINING",
        "10.1.0.3": "HEALTHY",  # healthy in the second slice
        "10.1.0.4": "DRAINING",
        "10.1.0.5": "HEALTHY",
        "10.1.0.6": "HEALTHY",
        "10.1.0.7": "HEALTHY",
        "10.1.0.9": "UNHEALTHY",
    }
    first = by_address["10.1.0.1"]
    assert (first.locality.region, first.locality.zone) == ("eu-west-1", "eu-west-1a")  # the first slice's
    assert first.ports == (("http", 8080), ("grpc-api", 9091), ("web", 8443))
    assert (first.service_account, first.workload, first.sidecar_port) == ("web", "web-1", 15006)
    assert by_address["10.1.0.2"].locality.zone == "eu-west-1c"  # the endpoint's zone
    assert (by_address["10.1.0.3"].locality.zone, by_address["10.1.0.3"].service_account) == (
        "eu-west-1a",
        "web-canary",
    )
    assert by_address["10.1.0.4"].locality.zone == "fallback-zone"  # node-b has no zone label
    assert by_address["10.1.0.4"].service_account == "default"
    assert by_address["10.1.0.5"].locality.region == "fallback-region"  # unknown node
    assert by_address["10.1.0.6"].sidecar_port == 0  # 99999 is no port
    assert by_address["10.1.0.7"].workload == ""
    assert by_address["10.1.0.2"].sidecar_port == 0
    (db_endpoint,) = shard.endpoints[db]
    assert (db_endpoint.ports, db_endpoint.sidecar_port) == ((("port-5432", 5432),), 15007)
    assert shard_of(
        CLUSTER, cluster_objects(lambda _, objs, fn: objs), require_namespace_label=True
    ).services.keys() == {
        web,
        db,
        cache,
    }


@pytest.mark.parametrize(("export", "require_label"), RULES)
def test_the_shard_reads_only_fields_the_trims_keep(export: ExportPolicy, require_label: bool) -> None:
    seen: dict[str, dict[str, set[Path]]] = {field: {} for field in KINDS}
    objects = cluster_objects(lambda field, objs, fn: read_objects(objs, seen[field]))
    shard_of(CLUSTER, objects, export, require_label)
    for field, (objs, fn) in KINDS.items():
        assert not unkept(objs, seen[field], fn)


def test_the_slice_index_of_trimmed_slices_is_that_of_whole_ones() -> None:
    whole, small = SliceIndex.of(SLICES), SliceIndex.of(trimmed(SLICES, trim.endpoint_slice))
    services = {ServiceKey("shop", n) for n in ("web", "db", "cache", "orphan")} | {
        ServiceKey("other", "api")
    }
    for service_key in services:
        assert small.slices(service_key) == whole.slices(service_key)
    for pod_key in [*PODS, "shop/web-8", "shop/None", "shop/web-6"]:
        assert small.services_of_pod(pod_key) == whole.services_of_pod(pod_key)
    assert whole.services_of_pod("shop/web-1") == {ServiceKey("shop", "web")}
    seen: dict[str, set[Path]] = {}
    SliceIndex.of(read_objects(SLICES, seen))
    assert not unkept(SLICES, seen, trim.endpoint_slice)


@pytest.mark.parametrize(
    ("services", "nodes"),
    [
        (SERVICES, NODES),
        (GATEWAYS_BY_NODE_PORT, NODES),
        (GATEWAYS_BY_NODE_PORT, NODES_INTERNAL_ONLY),
        (GATEWAYS_BY_HOSTNAME, NODES),
    ],
    ids=["ingress-ip", "node-port-external-ip", "node-port-internal-ip", "hostname"],
)
def test_gateways_of_trimmed_objects_are_those_of_whole_ones(
    services: Mapping[str, Obj], nodes: Mapping[str, Obj]
) -> None:
    small_services, small_nodes = trimmed(services, trim.service), trimmed(nodes, trim.node)
    found = gateway_of(services, nodes)
    assert found is not None
    assert gateway_of(small_services, small_nodes) == found
    assert gateway_service(small_services) == gateway_service(services)
    seen_services: dict[str, set[Path]] = {}
    seen_nodes: dict[str, set[Path]] = {}
    gateway_of(read_objects(services, seen_services), read_objects(nodes, seen_nodes))
    gateway_service(read_objects(services, seen_services))
    assert not unkept(services, seen_services, trim.service)
    if found.address not in ("203.0.113.7", "gw.elb.example.com"):
        assert not unkept(nodes, seen_nodes, trim.node)


def test_gateway_addresses_the_fixtures_give() -> None:
    assert gateway_of(SERVICES, NODES) == Gateway("203.0.113.7", 15443)
    assert gateway_of(GATEWAYS_BY_NODE_PORT, NODES) == Gateway("198.51.100.10", 32443)
    assert gateway_of(GATEWAYS_BY_NODE_PORT, NODES_INTERNAL_ONLY) == Gateway("192.168.1.11", 32443)
    assert gateway_of(GATEWAYS_BY_HOSTNAME, NODES) == Gateway("gw.elb.example.com", 443)


def test_gateway_readiness_of_trimmed_slices_is_that_of_whole_ones() -> None:
    for keys in (["isthmus-system/eastwest-x1"], ["shop/web-a1b2c"], ["shop/web-fqdn"], []):
        whole = gateway_ready(SLICES[k] for k in keys)
        assert gateway_ready(trim.endpoint_slice(SLICES[k]) for k in keys) is whole
        seen: dict[str, set[Path]] = {}
        views = read_objects({k: SLICES[k] for k in keys}, seen)
        gateway_ready(views[k] for k in keys)
        if keys:
            assert not unkept({k: SLICES[k] for k in keys}, seen, trim.endpoint_slice)
    unready = copy.deepcopy(SLICES["isthmus-system/eastwest-x1"])
    unready["endpoints"][1]["conditions"]["ready"] = False
    assert gateway_ready([unready]) is False
    assert gateway_ready([trim.endpoint_slice(unready)]) is False


def test_node_localities_namespace_labels_and_sidecars_survive_the_trims() -> None:
    for key, obj in NODES.items():
        assert node_locality(trim.node(obj)) == node_locality(obj), key
    assert node_locality(NODES["node-a"]) == ("eu-west-1", "eu-west-1a")
    for key, obj in NAMESPACES.items():
        assert mesh_label(trim.namespace(obj)) == mesh_label(obj), key
    assert {mesh_label(obj) for obj in NAMESPACES.values()} == {"enabled", "disabled", ""}
    for key, obj in PODS.items():
        assert sidecar_port(trim.pod(obj)) == sidecar_port(obj), key
        assert trim.pod(obj)["metadata"]["uid"] == obj["metadata"]["uid"]  # pod-bound tokens' check
    seen: dict[str, set[Path]] = {}
    for view in read_objects(NODES, seen).values():
        node_locality(view)
    assert not unkept(NODES, seen, trim.node)


def test_a_watcher_with_trimmed_stores_answers_as_with_whole_ones() -> None:
    """ClusterWatcher's own readers (pod uids, node localities, its published shard and member
    record, the ServiceExports the ImportWriter gets) give the same answers."""

    def watcher(trims: bool) -> tuple[ClusterWatcher, Aggregator]:
        agg = Aggregator(lambda view: None)
        w = ClusterWatcher(Credentials("east", {}, ""), agg, ClusterPolicy(region="r", zone="z"))
        stores = {
            "services": SERVICES,
            "endpointslices": SLICES,
            "nodes": NODES,
            "pods": PODS,
            "namespaces": NAMESPACES,
            "serviceexports": EXPORTS,
            "trafficsplits": SPLITS,
            "httproutes": HTTP_ROUTES,
            "grpcroutes": GRPC_ROUTES,
            "authorizationpolicies": AUTHORIZATION_POLICIES,
            "traffictargets": TRAFFIC_TARGETS,
            "httproutegroups": ROUTE_GROUPS,
            "tcproutes": TCP_ROUTES,
        }
        fns = {
            "services": trim.service,
            "endpointslices": trim.endpoint_slice,
            "nodes": trim.node,
            "pods": trim.pod,
            "namespaces": trim.namespace,
            "serviceexports": trim.service_export,
            "trafficsplits": trim.traffic_split,
            "httproutes": trim.http_route,
            "grpcroutes": trim.grpc_route,
            "authorizationpolicies": trim.authorization_policy,
            "traffictargets": trim.traffic_target,
            "httproutegroups": trim.http_route_group,
            "tcproutes": trim.tcp_route,
        }
        for kind, objs in stores.items():
            r = w._reflector(kind, never, fns[kind] if trims else None)
            for obj in objs.values():  # as a watch delivers them
                r._apply({"type": "ADDED", "object": copy.deepcopy(obj)})
            r.synced.set()
        w._publish()
        w.synced.set()
        w._publish()
        return w, agg

    (whole, whole_agg), (small, small_agg) = watcher(False), watcher(True)
    assert small_agg.shards == whole_agg.shards
    (shard,) = whole_agg.shards.values()
    (small_shard,) = small_agg.shards.values()
    assert [r.rules for r in small_shard.routes] == [r.rules for r in shard.routes]
    assert {(r.kind, r.name) for r in shard.routes} == {
        ("HTTPRoute", "web-canary"),
        ("HTTPRoute", "api"),
        ("GRPCRoute", "web-grpc"),
    }  # the accepted ones in mesh namespaces ("other" has no label: in the mesh by default)
    assert small.routes_read == whole.routes_read
    assert [(p, p.rules, t) for p, t in small_shard.policies] == [(p, p.rules, t) for p, t in shard.policies]
    assert {(p.kind, p.name) for p, _ in shard.policies} == {
        ("AuthorizationPolicy", "web-callers"),
        ("AuthorizationPolicy", "deny-db"),
        ("AuthorizationPolicy", "api"),
        ("TrafficTarget", "web-from-client"),
        ("TrafficTarget", "db-from-web"),
        # The refused ones fail closed: their workloads may be called by nobody.
        ("AuthorizationPolicy", "bad-caller"),
        ("AuthorizationPolicy", "unknown-field"),
        ("TrafficTarget", "bad-regex"),
    }  # not those in a namespace out of the mesh
    assert all(
        p.rules == () for p, _ in shard.policies if p.name in ("bad-caller", "unknown-field", "bad-regex")
    )
    assert {r.name for r in whole.routes_read if r.reason} == {"bad-regex", "grpc-redirect"}
    assert shard.cluster.gateway is not None
    assert shard.cluster.gateway_ready is True
    assert shard.splits
    for pod_key in [*PODS, "shop/nope"]:
        namespace_name = pod_key.split("/")
        assert small.pod_uid(*namespace_name) == whole.pod_uid(*namespace_name)
    for name in [*NODES, "nope"]:
        assert small.node_locality(name) == whole.node_locality(name)
    small_exports, whole_exports = small.service_exports(), whole.service_exports()
    assert small_exports.keys() == whole_exports.keys()
    for key, (obj, ports) in whole_exports.items():
        assert small_exports[key][1] == ports
        assert small_exports[key][0] == trim.service_export(obj)


async def never(**kw: Any) -> Any:
    raise AssertionError("not listed in these tests")


# ---- ServiceExports: read for export times, their status written back ----------------------------


class StatusApi:
    """The one call ImportWriter._export_statuses makes; records each body."""

    def __init__(self) -> None:
        self.written: list[tuple[str, str, str, Obj]] = []

    async def replace_namespaced_custom_object_status(
        self, group: str, version: str, namespace: str, plural: str, name: str, body: Obj, **kw: Any
    ) -> Obj:
        self.written.append((namespace, plural, name, body))
        return body


def export_writes(exports: Mapping[str, Obj]) -> list[tuple[str, str, str, Obj]]:
    own = (ServicePort("http", 80, 8080, Protocol.HTTP),)
    ports = {"shop/web": own, "shop/db": own, "shop/gone": None}
    writer = ImportWriter("east", never, lambda: {key: (obj, ports[key]) for key, obj in exports.items()})
    web = Service(
        ServiceKey("shop", "web"), ports=(ServicePort("http", 80, 8080, Protocol.TCP),), vip="240.240.0.1"
    )
    api = StatusApi()
    asyncio.run(
        writer._export_statuses(api, {"shop/web": service_import(web), "shop/db": service_import(web)})
    )
    for *_, body in api.written:
        for c in body["status"]["conditions"]:
            if not c["lastTransitionTime"].startswith("T"):
                c["lastTransitionTime"] = "now"  # written now, to the second
    return api.written


def test_service_export_status_writes_of_trimmed_exports_are_those_of_whole_ones() -> None:
    whole, small = export_writes(EXPORTS), export_writes(trimmed(EXPORTS, trim.service_export))
    assert len(whole) == len(small) == 3  # web: a port conflict now; db: no conditions yet; gone
    for (namespace, plural, name, body), (namespace2, plural2, name2, body2) in zip(
        whole, small, strict=True
    ):
        assert (namespace, plural, name) == (namespace2, plural2, name2)
        assert body2["status"] == body["status"]  # the other fields of status kept
        assert (
            body2["status"]["conditions"][0]["lastTransitionTime"]
            == body["status"]["conditions"][0]["lastTransitionTime"]
        )
        for field in ("apiVersion", "kind"):
            assert body2[field] == body[field]
        for field in ("name", "namespace", "uid", "resourceVersion"):  # the replace's preconditions
            assert body2["metadata"][field] == body["metadata"][field]
        assert "managedFields" not in body2["metadata"]
        assert "spec" not in body2
    assert whole[0][3]["status"]["observedBy"] == "another-controller"
    assert not too_big(EXPORTS, trim.service_export, 0.35)


# ---- TrafficSplits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("require_label", [False, True])
def test_traffic_splits_of_trimmed_objects_are_those_of_whole_ones(require_label: bool) -> None:
    small_namespaces = trimmed(NAMESPACES, trim.namespace)
    whole = traffic_splits(SPLITS, NAMESPACES, require_label)
    assert traffic_splits(trimmed(SPLITS, trim.traffic_split), small_namespaces, require_label) == whole
    assert [(str(s.service), s.backends) for s in traffic_splits(SPLITS, NAMESPACES)] == [
        ("shop/web", (("web-v1", 90), ("web-v2", 10)))
    ]
    seen: dict[str, set[Path]] = {}
    seen_namespaces: dict[str, set[Path]] = {}
    traffic_splits(read_objects(SPLITS, seen), read_objects(NAMESPACES, seen_namespaces), require_label)
    assert not unkept(SPLITS, seen, trim.traffic_split)
    assert not unkept(NAMESPACES, seen_namespaces, trim.namespace)
    assert not too_big(SPLITS, trim.traffic_split, 0.2)


# ---- GAMMA routes: HTTPRoutes and GRPCRoutes ------------------------------------------------------


def routes_read(
    routes: Mapping[str, Mapping[str, Any]], namespaces: Mapping[str, Any], rule: bool
) -> list[Any]:
    """route_reads with everything compared (a ServiceRoute's rules do not take part in its ==)."""
    reads = route_reads(routes, namespaces, rule, "east")
    return [(read, [(r, r.rules) for r in read.routes]) for read in reads]


def trimmed_routes() -> dict[str, dict[str, Obj]]:
    return {kind: trimmed(objs, ROUTE_TRIMS[kind]) for kind, objs in ROUTES.items()}


@pytest.mark.parametrize("require_label", [False, True])
def test_routes_of_trimmed_objects_are_those_of_whole_ones(require_label: bool) -> None:
    small_namespaces = trimmed(NAMESPACES, trim.namespace)
    whole = routes_read(ROUTES, NAMESPACES, require_label)
    assert routes_read(trimmed_routes(), small_namespaces, require_label) == whole
    seen: dict[str, dict[str, set[Path]]] = {kind: {} for kind in ROUTES}
    seen_namespaces: dict[str, set[Path]] = {}
    views = {kind: read_objects(objs, seen[kind], ReadAsList) for kind, objs in ROUTES.items()}
    route_reads(views, read_objects(NAMESPACES, seen_namespaces), require_label, "east")
    for kind, objs in ROUTES.items():
        assert not unkept(objs, seen[kind], ROUTE_TRIMS[kind]), kind
        assert not too_big(objs, ROUTE_TRIMS[kind], 0.5), kind
        assert not changes_argument(objs, ROUTE_TRIMS[kind]), kind
    assert not unkept(NAMESPACES, seen_namespaces, trim.namespace)


def test_the_route_fixtures_decide_the_reading_by_every_field_read() -> None:
    """The equality above means something: the whole objects use every rule of the reader."""
    reads = {(r.kind, r.namespace, r.name): r for r in route_reads(ROUTES, NAMESPACES, False, "east")}
    assert set(reads) == {
        ("HTTPRoute", "shop", "web-canary"),
        ("HTTPRoute", "shop", "bad-regex"),
        ("HTTPRoute", "other", "api"),
        ("GRPCRoute", "shop", "web-grpc"),
        ("GRPCRoute", "shop", "grpc-redirect"),
    }  # not the Gateway's route, nor the one in a namespace out of the mesh
    canary = reads["HTTPRoute", "shop", "web-canary"]
    assert (canary.reason, canary.generation) == ("", 3)
    assert [(str(r.service), r.port, r.cluster, r.created) for r in canary.routes] == [
        ("shop/web", 80, "east", "2025-11-02T09:14:03Z"),
        ("other/api", 0, "east", "2025-11-02T09:14:03Z"),
    ]
    first, redirect, plain = canary.routes[0].rules
    (match,) = first.matches
    assert (match.path, match.path_type.value, match.method) == ("/api", "PathPrefix", "GET")
    assert [(h.name, h.regex) for h in match.headers] == [("x-canary", False), ("x-user", True)]
    assert [(q.name, q.value) for q in match.query] == [("debug", "1")]
    assert [(str(b.service), b.weight) for b in first.backends] == [
        ("shop/web-v2", 20),
        ("shop/web-v1", 80),
        ("elsewhere/web-x", 1),
    ]
    assert first.broken.startswith("RefNotPermitted")
    assert first.request_headers is not None
    assert first.request_headers.remove == ("x-drop",)
    assert first.response_headers is not None
    assert [(str(b.service), pct) for b, pct in first.mirrors] == [("shop/web-shadow", 25.0)]
    assert first.rewrite is not None
    assert (first.rewrite.hostname, first.rewrite.path, first.rewrite.prefix) == ("web.internal", "/v2", True)
    assert (first.timeout_ms, first.backend_timeout_ms) == (10000, 2500)
    assert first.retry is not None
    assert (first.retry.attempts, first.retry.codes, first.retry.backoff_ms) == (3, (503,), 100)
    assert redirect.redirect is not None
    assert (redirect.redirect.scheme, redirect.redirect.port, redirect.redirect.status) == (
        "https",
        8443,
        301,
    )
    assert [str(b.service) for b in plain.backends] == ["shop/web-v1"]
    bad = reads["HTTPRoute", "shop", "bad-regex"]
    assert (bad.reason, bad.generation, bad.routes) == ("UnsupportedValue", 7, ())
    assert "RE2" in bad.message
    assert [str(p.service) for p in bad.parents] == ["shop/web"]
    grpc = reads["GRPCRoute", "shop", "web-grpc"]
    assert [(m.path, m.path_type.value) for m in grpc.routes[0].rules[0].matches] == [
        ("/shop.Web/Get", "Exact"),
        ("/shop\\..*/[^/]+", "RegularExpression"),
        ("/[^/]+/List", "RegularExpression"),
    ]
    assert reads["GRPCRoute", "shop", "grpc-redirect"].reason == "UnsupportedValue"
    labelled = route_reads(ROUTES, NAMESPACES, True, "east")
    assert {r.namespace for r in labelled} == {"shop"}  # "other" is not labelled enabled


def test_a_route_without_kind_is_read_as_its_watch_kind_and_a_malformed_one_is_refused() -> None:
    grpc = copy.deepcopy(GRPC_ROUTES["shop/web-grpc"])
    del grpc["kind"]  # as the items of a list may come
    odd = route("HTTPRoute", "odd", {"parentRefs": [{"kind": "Service", "name": "web"}], "rules": 5})
    memo: dict[Any, Any] = {}
    routes = {"GRPCRoute": {"shop/web-grpc": grpc}, "HTTPRoute": {"shop/odd": odd}}
    reads = route_reads(routes, NAMESPACES, False, "east", memo)
    assert [(r.kind, r.name, r.reason) for r in reads] == [
        ("GRPCRoute", "web-grpc", ""),
        ("HTTPRoute", "odd", "UnsupportedValue"),
    ]
    assert reads[0].routes[0].kind == "GRPCRoute"
    # The same objects again: the same readings (remembered); an object gone is forgotten.
    again = route_reads(routes, NAMESPACES, False, "east", memo)
    assert all(a is b for a, b in zip(again, reads, strict=True))
    route_reads({"GRPCRoute": {}, "HTTPRoute": {"shop/odd": odd}}, NAMESPACES, False, "east", memo)
    assert list(memo) == [("HTTPRoute", "shop/odd")]


# ---- the home cluster: Secrets, MemberClusters, MeshConfigs ---------------------------------------


def test_member_credentials_of_trimmed_secrets_are_those_of_whole_ones() -> None:
    whole = credentials_of(SECRETS)
    assert credentials_of(trimmed(SECRETS, trim.secret)) == whole
    assert set(whole.credentials) == {"east"}
    assert set(whole.errors) == {"west", "Bad_Name", "south"}
    seen: dict[str, set[Path]] = {}
    credentials_of(read_objects(SECRETS, seen))
    assert not unkept(SECRETS, seen, trim.secret)
    assert not too_big(SECRETS, trim.secret, 0.7)  # their data is most of them


def config_api(trims: bool) -> ConfigApi:
    api = ConfigApi("isthmus-system", "me", on_change=lambda: None)
    fn = trim.config_object if trims else None
    api.reflector = Reflector(KIND, never, lambda keys: None, trim=fn)
    api.meshes = Reflector(MESH_KIND, never, lambda keys: None, trim=fn)
    for reflector, objs in ((api.reflector, MEMBER_CLUSTERS), (api.meshes, MESH_CONFIGS)):
        for obj in objs.values():
            reflector._apply({"type": "ADDED", "object": copy.deepcopy(obj)})
    return api


def test_the_configuration_api_reads_and_writes_trimmed_objects_as_whole_ones() -> None:
    whole, small = config_api(False), config_api(True)
    assert small.desired() == whole.desired() == {"east": 40, "west": 100}
    assert small.errors == whole.errors
    assert set(whole.errors) == {"bad", "worse"}
    assert small.applied() == whole.applied() == {"east": 70}
    whole_mesh, small_mesh = whole.mesh_config(), small.mesh_config()
    assert whole_mesh is not None
    assert small_mesh is not None
    assert mesh_overrides(small_mesh) == mesh_overrides(whole_mesh)
    report = Report(
        drains={"east": {"weight": 40, "state": "Draining", "waiting_for": ["p1"]}},
        synced={
            "east": Condition("Synced", True, "Synced"),
            "west": Condition("Synced", False, "Unreachable"),
        },
        in_force=[("trust_domain", "mesh.example", "MeshConfig")],
        mesh=[Condition("Applied", True, "Applied")],
    )
    assert whole.reflector is not None
    assert small.reflector is not None
    assert whole.meshes is not None
    assert small.meshes is not None
    pairs = [
        (whole._member_status, whole.reflector, small.reflector),
        (whole._mesh_status, whole.meshes, small.meshes),
    ]
    for status_of, whole_store, small_store in pairs:
        assert whole_store.store.keys() == small_store.store.keys()
        for key, obj in whole_store.store.items():
            kept = small_store.store[key]
            status = status_of(obj, report)
            again = status_of(kept, report)
            for c in (*status["conditions"], *again["conditions"]):  # written now, to the second
                if c["lastTransitionTime"] not in ("T1", "T2", "T3"):
                    c["lastTransitionTime"] = "now"
            for s in (status, again):
                if "drain" in s:
                    s["drain"]["updated"] = "now"
            assert again == status, key
            body, body2 = {**obj, "status": status}, {**kept, "status": again}  # what _write sends
            for field in ("apiVersion", "kind", "status"):
                assert body2[field] == body[field]
            for field in ("name", "namespace", "uid", "resourceVersion", "generation"):
                assert body2["metadata"][field] == body["metadata"][field]
    east = whole.reflector.store["isthmus-system/east"]
    assert drain_target(small.reflector.store["isthmus-system/east"]) == drain_target(east) == 40
    assert not too_big(MEMBER_CLUSTERS, trim.config_object, 0.3)
    assert not too_big(MESH_CONFIGS, trim.config_object, 0.3)


# ---- smaller: what goes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "most"),
    [("services", 0.25), ("endpoint_slices", 0.25), ("nodes", 0.05), ("pods", 0.07), ("namespaces", 0.07)],
)
def test_trimmed_objects_are_much_smaller(kind: str, most: float) -> None:
    objs, fn = KINDS[kind]
    assert not too_big(objs, fn, most)
    assert not changes_argument(objs, fn), "the trim changes no argument"


def test_what_each_trim_drops() -> None:
    svc = trim.service(SERVICES["isthmus-system/eastwest"])
    assert svc["metadata"] == {
        "name": "eastwest",
        "namespace": "isthmus-system",
        "creationTimestamp": "2025-11-02T09:14:03Z",
        "labels": GATEWAY,
    }
    assert set(svc["spec"]) == {"type", "clusterIP", "ports"}  # not selector, externalTrafficPolicy, ...
    assert svc["status"] == {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}
    eps = trim.endpoint_slice(SLICES["shop/web-a1b2c"])
    assert set(eps) == {"metadata", "addressType", "ports", "endpoints"}
    assert set(eps["metadata"]) == {"name", "namespace", "labels"}
    assert eps["metadata"]["labels"] == {"kubernetes.io/service-name": "web"}
    assert eps["ports"][0] == {"name": "http", "port": 8080}
    assert eps["endpoints"][1] == {
        "addresses": ["10.1.0.2"],
        "conditions": {"ready": False, "serving": True, "terminating": True},
        "nodeName": "node-a",
        "zone": "eu-west-1c",
        "targetRef": {"name": "web-2", "namespace": "shop"},
    }  # not hints, hostname, deprecatedTopology, the targetRef's kind, uid and resourceVersion
    assert trim.node(NODES["node-b"]) == {
        "metadata": {"name": "node-b", "labels": {REGION: "eu-west-1"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.11"}]},
    }
    p = PODS["shop/web-1"]
    assert trim.pod(p) == {
        "metadata": {
            "name": "web-1",
            "namespace": "shop",
            "uid": p["metadata"]["uid"],
            "annotations": {"isthmus.io/inbound-port": "15006"},
        },
        "spec": {"serviceAccountName": "web"},
    }
    assert trim.namespace(NAMESPACES["shop"]) == {
        "metadata": {"name": "shop", "labels": {"isthmus.io/mesh": "enabled"}}
    }
    split = trim.traffic_split(SPLITS["shop/web"])
    assert split["spec"]["backends"][0] == {"service": "web-v1", "weight": 90}
    assert "matches" not in split["spec"]
    assert set(trim.secret(SECRETS["isthmus-system/members"])) == {"metadata", "data"}
    canary = trim.http_route(HTTP_ROUTES["shop/web-canary"])
    assert set(canary) == {"kind", "metadata", "spec"}  # not apiVersion, status
    assert canary["metadata"] == {
        "name": "web-canary",
        "namespace": "shop",
        "creationTimestamp": "2025-11-02T09:14:03Z",
        "generation": 3,
    }
    assert set(canary["spec"]) == {"parentRefs", "rules"}  # not hostnames
    assert canary["spec"]["parentRefs"][0] == WEB_PARENT
    assert set(canary["spec"]["rules"][0]) == {"matches", "backendRefs", "filters", "timeouts", "retry"}
    grpc = trim.grpc_route(GRPC_ROUTES["shop/web-grpc"])
    assert grpc["spec"]["rules"] == GRPC_ROUTES["shop/web-grpc"]["spec"]["rules"]


def test_values_of_unexpected_types_are_kept_as_they_are() -> None:
    odd = {"metadata": "x", "spec": "y", "status": ["z"], "endpoints": "e", "ports": 3, "data": None}
    fns = (trim.service, trim.endpoint_slice, trim.node, trim.pod, trim.namespace, trim.traffic_split)
    for fn in (*fns, trim.http_route, trim.grpc_route):
        small = fn(odd)
        assert small["metadata"] == "x"
        for key, value in small.items():
            assert value == odd[key]
    assert trim.service({"spec": {"ports": "p"}, "status": {"loadBalancer": {"ingress": 1}}}) == {
        "spec": {"ports": "p"},
        "status": {"loadBalancer": {"ingress": 1}},
    }
    assert trim.endpoint_slice({"endpoints": ["a", {"conditions": 1, "targetRef": None}]})["endpoints"] == [
        "a",
        {"conditions": 1, "targetRef": None},
    ]
    assert trim.service({}) == {}
    assert trim.http_route({"spec": {"parentRefs": "p", "rules": ["r", {"matches": 1, "x": 2}]}}) == {
        "spec": {"parentRefs": "p", "rules": ["r", {"matches": 1}]}
    }
    assert trim.grpc_route({"spec": {"rules": 3}}) == {"spec": {"rules": 3}}


# ---- the Reflector stores trimmed objects and judges changes on them ------------------------------


class ListResponse:
    status = 200

    def __init__(self, body: Obj) -> None:
        self._body = body

    async def json(self) -> Obj:
        return copy.deepcopy(self._body)

    def release(self) -> None:
        pass


def test_the_reflector_stores_what_the_trim_makes_and_judges_changes_on_it() -> None:
    changes: list[Any] = []
    items = [copy.deepcopy(PODS["shop/web-1"]), copy.deepcopy(PODS["shop/db-0"])]
    body: Obj = {"metadata": {"resourceVersion": "100"}, "items": items}

    async def list_fn(**kw: Any) -> ListResponse:
        return ListResponse(body)

    reflector = Reflector("pods", list_fn, changes.append, trim=trim.pod)

    async def relist() -> None:
        await reflector._list()

    asyncio.run(relist())
    assert reflector.store == {object_key(o): trim.pod(o) for o in items}
    assert changes == [None]
    assert reflector.resource_version == "100"
    # A relist whose objects differ only in fields nobody reads reports no change.
    items[0]["status"]["phase"] = "Succeeded"
    items[0]["metadata"]["resourceVersion"] = "101"
    items[1]["metadata"]["managedFields"] = []
    body["metadata"]["resourceVersion"] = "102"
    asyncio.run(relist())
    assert changes == [None]
    assert reflector.resource_version == "102"
    # One that changes a field read does.
    items[1]["spec"]["serviceAccountName"] = "db-admin"
    asyncio.run(relist())
    assert changes == [None, None]
    assert reflector.store["shop/db-0"]["spec"] == {"serviceAccountName": "db-admin"}
    # Events: stored trimmed; one that changes nothing read is not passed on (its version is kept).
    modified = copy.deepcopy(items[0])
    modified["status"]["podIP"] = "10.9.9.9"
    modified["metadata"]["resourceVersion"] = "103"
    reflector._apply({"type": "MODIFIED", "object": modified})
    assert changes == [None, None]
    assert reflector.resource_version == "103"
    modified = copy.deepcopy(modified)
    modified["metadata"]["annotations"]["isthmus.io/inbound-port"] = "15010"
    modified["metadata"]["resourceVersion"] = "104"
    reflector._apply({"type": "MODIFIED", "object": modified})
    assert changes == [None, None, ("shop/web-1",)]
    assert reflector.store["shop/web-1"] == trim.pod(modified)
    added = pod("web-7", account="web")
    reflector._apply({"type": "ADDED", "object": added})
    assert reflector.store["shop/web-7"] == trim.pod(added)
    assert changes[-1] == ("shop/web-7",)
    reflector._apply({"type": "DELETED", "object": added})
    assert "shop/web-7" not in reflector.store
    assert changes[-1] == ("shop/web-7",)
    assert reflector.events == 4


def test_a_reflector_without_a_trim_stores_whole_objects() -> None:
    reflector = Reflector("pods", never, lambda keys: None)
    obj = copy.deepcopy(PODS["shop/web-1"])
    reflector._apply({"type": "ADDED", "object": obj})
    assert reflector.store["shop/web-1"] is obj


def test_the_strings_kept_are_shared_between_objects() -> None:
    """As parsed, every value is a string object of its own; the trimmed objects share equal ones."""

    def parsed(obj: Obj) -> Obj:
        return dict(json.loads(json.dumps(obj)))

    one, two = trim.pod(parsed(PODS["shop/web-1"])), trim.pod(parsed(PODS["shop/web-2"]))
    assert one["metadata"]["namespace"] is two["metadata"]["namespace"]
    assert one["spec"]["serviceAccountName"] is two["spec"]["serviceAccountName"]
    eps = trim.endpoint_slice(parsed(SLICES["shop/web-a1b2c"]))
    first, second = eps["endpoints"][0], eps["endpoints"][1]
    assert first["targetRef"]["name"] is one["metadata"]["name"]
    assert first["targetRef"]["namespace"] is one["metadata"]["namespace"]
    assert first["nodeName"] is second["nodeName"]


# ---- authorization policies: AuthorizationPolicy, TrafficTarget, HTTPRouteGroup, TCPRoute -------


def crd_object(
    api_version: str, kind: str, name: str, spec: Any, namespace: str = "shop", **extra: Any
) -> Obj:
    """A custom object as a real server serves it (metadata of every kind, a status nobody reads)."""
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": meta(name, namespace, **extra),
        "spec": spec,
        "status": {
            "observedBy": "another-controller",
            "conditions": [{"type": "Ready", "message": "x" * 300}],
        },
    }


def isthmus_policy(name: str, spec: Any, namespace: str = "shop", **extra: Any) -> Obj:
    return crd_object("isthmus.io/v1alpha1", "AuthorizationPolicy", name, spec, namespace, **extra)


AUTHORIZATION_POLICIES = {
    # Every field the reader knows.
    "shop/web-callers": isthmus_policy(
        "web-callers",
        {
            "selector": {"serviceAccount": "web"},
            "rules": [
                {
                    "callers": [{"namespace": "shop", "serviceAccount": "client"}, {"namespace": "blog"}],
                    "to": {"ports": [80], "paths": ["/api/*", "/health"], "methods": ["get", "POST"]},
                },
                {"callers": [{"serviceAccount": "*"}]},
                {},
            ],
        },
        creationTimestamp="2025-10-01T08:00:00Z",
    ),
    "shop/deny-db": isthmus_policy("deny-db", {"selector": {"serviceAccount": "db"}}, generation=5),
    "shop/bad-caller": isthmus_policy(
        "bad-caller",
        {"selector": {"serviceAccount": "web"}, "rules": [{"callers": [{"namespace": "Not_A_Name"}]}]},
        generation=9,
    ),
    "shop/unknown-field": isthmus_policy(
        "unknown-field", {"selector": {"serviceAccount": "web"}, "rules": [{"from": []}]}
    ),
    "legacy/old": isthmus_policy("old", {"selector": {"serviceAccount": "old"}}, "legacy"),
    "other/api": isthmus_policy("api", {"selector": {"serviceAccount": "api"}}, "other"),
}


def smi(kind: str, name: str, spec: Any, namespace: str = "shop", **extra: Any) -> Obj:
    version = "access.smi-spec.io/v1alpha3" if kind == "TrafficTarget" else "specs.smi-spec.io/v1alpha4"
    return crd_object(version, kind, name, spec, namespace, **extra)


TRAFFIC_TARGETS = {
    "shop/web-from-client": smi(
        "TrafficTarget",
        "web-from-client",
        {
            "destination": {"kind": "ServiceAccount", "name": "web", "namespace": "shop", "port": 80},
            "sources": [
                {"kind": "ServiceAccount", "name": "client", "namespace": "shop"},
                {"kind": "ServiceAccount", "name": "bot", "namespace": "blog"},
            ],
            "rules": [
                {"kind": "HTTPRouteGroup", "name": "web-api", "matches": ["reads"]},
                {"kind": "HTTPRouteGroup", "name": "web-all"},
                {"kind": "HTTPRouteGroup", "name": "not-yet"},  # allows nothing until it exists
            ],
        },
        creationTimestamp="2025-10-02T08:00:00Z",
    ),
    "shop/db-from-web": smi(
        "TrafficTarget",
        "db-from-web",
        {
            "destination": {"kind": "ServiceAccount", "name": "db", "namespace": "shop"},
            "sources": [{"kind": "ServiceAccount", "name": "web", "namespace": "shop"}],
            "rules": [{"kind": "TCPRoute", "name": "db-port"}],
        },
    ),
    "shop/bad-regex": smi(
        "TrafficTarget",
        "bad-regex",
        {
            "destination": {"kind": "ServiceAccount", "name": "web"},
            "sources": [{"kind": "ServiceAccount", "name": "client"}],
            "rules": [{"kind": "HTTPRouteGroup", "name": "lookahead"}],
        },
        generation=4,
    ),
    "legacy/old": smi(
        "TrafficTarget",
        "old",
        {
            "destination": {"kind": "ServiceAccount", "name": "old"},
            "sources": [{"kind": "ServiceAccount", "name": "x"}],
        },
        "legacy",
    ),
}
ROUTE_GROUPS = {
    "shop/web-api": smi(
        "HTTPRouteGroup",
        "web-api",
        {
            "matches": [
                {
                    "name": "reads",
                    "methods": ["GET", "HEAD"],
                    "pathRegex": "/api/.*",
                    "headers": [{"x": "y"}],
                },
                {"name": "writes", "methods": ["POST"], "pathRegex": "/api/.*"},
            ]
        },
    ),
    "shop/web-all": smi("HTTPRouteGroup", "web-all", {"matches": [{"name": "any", "methods": ["*"]}]}),
    "shop/lookahead": smi(
        "HTTPRouteGroup", "lookahead", {"matches": [{"name": "x", "pathRegex": "/(?=v2)"}]}
    ),
}
TCP_ROUTES = {
    "shop/db-port": smi("TCPRoute", "db-port", {"matches": {"ports": [5432, 5433]}}),
}
POLICY_STORES = {
    "policies": (AUTHORIZATION_POLICIES, trim.authorization_policy),
    "traffic_targets": (TRAFFIC_TARGETS, trim.traffic_target),
    "route_groups": (ROUTE_GROUPS, trim.http_route_group),
    "tcp_routes": (TCP_ROUTES, trim.tcp_route),
}


def policies_read(
    stores: Mapping[str, Mapping[str, Any]], namespaces: Mapping[str, Any], rule: bool
) -> list[Any]:
    """policy_reads with everything compared (an AuthorizationPolicy's rules do not take part in its ==)."""
    reads = policy_reads(**stores, namespaces=namespaces, require_namespace_label=rule)
    return [(read, read.policy.rules if read.policy else None) for read in reads]


@pytest.mark.parametrize("require_label", [False, True])
def test_policies_of_trimmed_objects_are_those_of_whole_ones(require_label: bool) -> None:
    whole = {field: objs for field, (objs, _) in POLICY_STORES.items()}
    small = {field: trimmed(objs, fn) for field, (objs, fn) in POLICY_STORES.items()}
    small_namespaces = trimmed(NAMESPACES, trim.namespace)
    expected = policies_read(whole, NAMESPACES, require_label)
    assert policies_read(small, small_namespaces, require_label) == expected
    seen: dict[str, dict[str, set[Path]]] = {field: {} for field in POLICY_STORES}
    seen_namespaces: dict[str, set[Path]] = {}
    views = {field: read_objects(objs, seen[field], ReadAsList) for field, (objs, _) in POLICY_STORES.items()}
    recorded = policy_reads(
        **views, namespaces=read_objects(NAMESPACES, seen_namespaces), require_namespace_label=require_label
    )
    assert [(r.kind, r.namespace, r.name, r.message) for r in recorded] == [
        (r.kind, r.namespace, r.name, r.message) for r, _ in expected
    ]  # the recording views read as the objects do
    for field, (objs, fn) in POLICY_STORES.items():
        assert not unkept(objs, seen[field], fn), field
        assert not too_big(objs, fn, 0.5), field
        assert not changes_argument(objs, fn), field
    assert not unkept(NAMESPACES, seen_namespaces, trim.namespace)


def test_the_policy_fixtures_decide_the_reading_by_every_field_read() -> None:
    """The equality above means something: the whole objects use every rule of the reader."""
    stores = {field: objs for field, (objs, _) in POLICY_STORES.items()}
    reads = {(r.kind, r.namespace, r.name): r for r in policy_reads(**stores, namespaces=NAMESPACES)}
    assert set(reads) == {
        ("AuthorizationPolicy", "shop", "web-callers"),
        ("AuthorizationPolicy", "shop", "deny-db"),
        ("AuthorizationPolicy", "shop", "bad-caller"),
        ("AuthorizationPolicy", "shop", "unknown-field"),
        ("AuthorizationPolicy", "other", "api"),
        ("TrafficTarget", "shop", "web-from-client"),
        ("TrafficTarget", "shop", "db-from-web"),
        ("TrafficTarget", "shop", "bad-regex"),
    }  # not those in the namespace out of the mesh
    callers = reads["AuthorizationPolicy", "shop", "web-callers"]
    assert callers.created == "2025-10-01T08:00:00Z"
    assert callers.policy is not None
    assert callers.policy.service_account == "web"
    first, anyone, everything = callers.policy.rules
    assert [(c.namespace, c.service_account) for c in first.callers] == [("shop", "client"), ("blog", "*")]
    assert (first.ports, first.paths, first.methods) == ((80,), ("/api/*", "/health"), ("GET", "POST"))
    assert [(c.namespace, c.service_account) for c in anyone.callers] == [("*", "*")]
    assert (everything.callers, everything.ports, everything.paths) == ((), (), ())
    deny = reads["AuthorizationPolicy", "shop", "deny-db"]
    assert deny.policy is not None
    assert (deny.policy.service_account, deny.policy.rules, deny.generation) == ("db", (), 5)
    bad = reads["AuthorizationPolicy", "shop", "bad-caller"]
    assert bad.policy is not None
    assert (bad.policy.service_account, bad.policy.rules, bad.generation) == ("web", (), 9)  # closed
    assert "Not_A_Name" in bad.message
    assert reads["AuthorizationPolicy", "shop", "unknown-field"].message  # parsed strictly
    target = reads["TrafficTarget", "shop", "web-from-client"]
    assert target.policy is not None
    assert target.created == "2025-10-02T08:00:00Z"
    reads_rule, any_rule = target.policy.rules  # "writes" is not named; "not-yet" does not exist
    assert [(c.namespace, c.service_account) for c in reads_rule.callers] == [
        ("shop", "client"),
        ("blog", "bot"),
    ]
    assert (reads_rule.ports, reads_rule.paths, reads_rule.methods, reads_rule.regex) == (
        (80,),
        ("/api/.*",),
        ("GET", "HEAD"),
        True,
    )
    assert (any_rule.paths, any_rule.methods) == ((), ())
    db = reads["TrafficTarget", "shop", "db-from-web"]
    assert db.policy is not None
    assert [r.ports for r in db.policy.rules] == [(5432, 5433)]
    refused = reads["TrafficTarget", "shop", "bad-regex"]
    assert refused.policy is not None
    assert (refused.policy.rules, refused.generation) == ((), 4)
    assert "RE2" in refused.message
    labelled = policy_reads(**stores, namespaces=NAMESPACES, require_namespace_label=True)
    assert {r.namespace for r in labelled} == {"shop"}  # "other" is not labelled enabled


def test_a_policy_reading_is_remembered_while_its_objects_are_the_same() -> None:
    """The memo re-reads an object only when it (or, for a TrafficTarget, a group or TCPRoute its
    rules name) was replaced, as the store does for a change; a new group is read at once."""
    stores = {field: dict(objs) for field, (objs, _) in POLICY_STORES.items()}
    memo: dict[Any, Any] = {}
    first = {(r.kind, r.name): r for r in policy_reads(**stores, namespaces=NAMESPACES, memo=memo)}
    again = {(r.kind, r.name): r for r in policy_reads(**stores, namespaces=NAMESPACES, memo=memo)}
    assert all(again[k] is first[k] for k in first)
    group = copy.deepcopy(ROUTE_GROUPS["shop/web-all"])
    group["spec"]["matches"][0]["methods"] = ["DELETE"]
    stores["route_groups"]["shop/web-all"] = group
    stores["route_groups"]["shop/not-yet"] = smi("HTTPRouteGroup", "not-yet", {"matches": [{"name": "a"}]})
    changed = {(r.kind, r.name): r for r in policy_reads(**stores, namespaces=NAMESPACES, memo=memo)}
    target = changed["TrafficTarget", "web-from-client"]
    assert target is not first["TrafficTarget", "web-from-client"]
    assert target.policy is not None
    assert [r.methods for r in target.policy.rules] == [("GET", "HEAD"), ("DELETE",), ()]
    assert changed["AuthorizationPolicy", "web-callers"] is first["AuthorizationPolicy", "web-callers"]
    del stores["policies"]["shop/deny-db"]
    policy_reads(**stores, namespaces=NAMESPACES, memo=memo)
    assert ("AuthorizationPolicy", "shop/deny-db") not in memo
