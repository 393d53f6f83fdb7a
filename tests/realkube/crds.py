"""The CustomResourceDefinitions of the optional kinds isthmus watches, as a member cluster that
uses them has them installed (structural schemas that keep unknown fields: isthmus reads only a few)."""

from __future__ import annotations

from typing import Any


def crd(group: str, version: str, kind: str, plural: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                    },
                }
            ],
        },
    }


def with_status(definition: dict[str, Any]) -> dict[str, Any]:
    """``definition`` with status as a subresource (as the MCS project's ServiceImport CRD has it)."""
    version = definition["spec"]["versions"][0]
    version["subresources"] = {"status": {}}
    return definition


SERVICE_IMPORT = with_status(crd("multicluster.x-k8s.io", "v1alpha1", "ServiceImport", "serviceimports"))
SERVICE_EXPORT = crd("multicluster.x-k8s.io", "v1alpha1", "ServiceExport", "serviceexports")
TRAFFIC_SPLIT = crd("split.smi-spec.io", "v1alpha2", "TrafficSplit", "trafficsplits")
