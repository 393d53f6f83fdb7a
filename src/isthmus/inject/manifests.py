"""Offline injection (`isthmus inject -f FILE`): the webhook's patch applied to the pods that
manifests describe, for people who render manifests before they reach a cluster.

A Pod is injected itself; a Deployment, StatefulSet, DaemonSet, ReplicaSet or Job through its
``spec.template``, a CronJob through ``spec.jobTemplate.spec.template``. Anything else passes
through unchanged, so a whole multi-document YAML can be piped through. The namespace of a
document is its own, else ``namespace``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import jsonpatch

from isthmus.inject.pod import InjectError, InjectSettings, patch

TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


def inject_document(document: Any, settings: InjectSettings, namespace: str = "default") -> Any:
    """``document`` with its pod (template) injected; unchanged if it has none or needs none."""
    if not isinstance(document, dict) or document.get("kind") not in TEMPLATE_PATHS:
        return document
    result = copy.deepcopy(document)
    pod: Any = result
    for key in TEMPLATE_PATHS[str(document["kind"])]:
        pod = pod.get(key) if isinstance(pod, dict) else None
    name = (document.get("metadata") or {}).get("name", "?")
    if not isinstance(pod, dict):
        raise InjectError(f"{document['kind']} {name}: no pod template")
    own = (document.get("metadata") or {}).get("namespace") or namespace
    try:
        ops = patch(pod, settings, str(own))
    except InjectError as exc:
        raise InjectError(f"{document['kind']} {name}: {exc}") from None
    if ops:
        jsonpatch.apply_patch(pod, ops, in_place=True)
    return result


def inject_documents(
    documents: Iterable[Any], settings: InjectSettings, namespace: str = "default"
) -> list[Any]:
    return [inject_document(d, settings, namespace) for d in documents if d is not None]
