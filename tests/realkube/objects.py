"""Kubernetes objects the real-Kubernetes tests create: the test app's Deployment and Service."""

from __future__ import annotations

from typing import Any

from realkube.node import APP_IMAGE


def deployment(
    name: str, answer: str, namespace: str = "default", labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """One replica of the test app (APP_IMAGE ``serve ANSWER`` on 8080, ready when it answers)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, **(labels or {})}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 1,
                    "containers": [
                        {
                            "name": "app",
                            "image": APP_IMAGE,
                            "imagePullPolicy": "Never",
                            "args": ["serve", answer],
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
                        }
                    ],
                },
            },
        },
    }


def service(
    name: str, namespace: str = "default", ports: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A Service selecting ``app: NAME``, port 80 (``http``) to 8080 unless ``ports`` say otherwise."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"app": name},
            "ports": ports or [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    }


def service_without_selector(name: str = "web", namespace: str = "shop") -> dict[str, Any]:
    """A Service with no selector (its EndpointSlices are written by hand), port http 80 to 8080."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }


def endpoint_slice(
    addresses: list[str], service: str = "web", namespace: str = "shop", name: str = ""
) -> dict[str, Any]:
    """An EndpointSlice of ``service`` (port http 8080) with these ready addresses."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service}-1",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
    }
