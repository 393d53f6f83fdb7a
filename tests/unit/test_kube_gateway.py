"""Gateways and sidecars as Kubernetes objects declare them: the labelled gateway Service's
LoadBalancer address or node address and NodePort; the sidecar annotation on pods."""

from __future__ import annotations

from typing import Any

import pytest

from isthmus.discovery.kube.gateway import gateway_of, sidecar_port
from isthmus.discovery.model import Gateway


def gateway_service(
    kind: str = "LoadBalancer", ingress: list[dict[str, str]] | None = None, labelled: bool = True
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "eastwest",
            "namespace": "isthmus-system",
            "labels": {"isthmus.io/gateway": "eastwest"} if labelled else {},
        },
        "spec": {
            "type": kind,
            "ports": [
                {"name": "status", "port": 15021, "nodePort": 31021},
                {"name": "tls", "port": 15443, "nodePort": 31443},
            ],
        },
        "status": {"loadBalancer": {"ingress": ingress or []}},
    }


NODES = {
    "n2": {"status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]}},
    "n1": {
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": "192.168.0.1"},
                {"type": "ExternalIP", "address": "203.0.113.1"},
            ]
        }
    },
}


@pytest.mark.parametrize(
    ("service", "nodes", "expected"),
    [
        (gateway_service(ingress=[{"ip": "198.51.100.7"}]), NODES, Gateway("198.51.100.7", 15443)),
        (gateway_service(ingress=[{"hostname": "gw.example.net"}]), {}, Gateway("gw.example.net", 15443)),
        # Pending LoadBalancer, or NodePort: a node's external address and the node port.
        (gateway_service(), NODES, Gateway("203.0.113.1", 31443)),
        (gateway_service("NodePort"), {"n2": NODES["n2"]}, Gateway("192.168.0.2", 31443)),
        (gateway_service("ClusterIP"), NODES, None),
        (gateway_service(ingress=[{"ip": "198.51.100.7"}], labelled=False), NODES, None),
        (gateway_service("NodePort"), {}, None),
    ],
)
def test_gateway_of(service: dict[str, Any], nodes: dict[str, Any], expected: Gateway | None) -> None:
    other = {"metadata": {"name": "web", "namespace": "shop"}, "spec": {"ports": [{"port": 80}]}}
    assert gateway_of({"shop/web": other, "isthmus-system/eastwest": service}, nodes) == expected


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({"isthmus.io/inbound-port": "15006"}, 15006),
        ({}, 0),
        ({"isthmus.io/inbound-port": "x"}, 0),
        ({"isthmus.io/inbound-port": "70000"}, 0),
    ],
)
def test_sidecar_port(annotations: dict[str, str], expected: int) -> None:
    assert sidecar_port({"metadata": {"name": "p", "annotations": annotations}}) == expected
    assert sidecar_port(None) == 0
