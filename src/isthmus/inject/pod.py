"""Sidecar injection as a pure function: a Pod (raw JSON, as the admission request carries it) and
the injection settings in, a JSONPatch (RFC 6902) out.

What an injected pod gets (docs/injection.md):

* ``isthmus-capture``, the first init container: loads the capture rules (inject.capture) with
  ``nft -f`` from a file of the pod's downward API (the rules are an annotation of the pod, so they
  can be read with kubectl); it needs NET_ADMIN and NET_RAW and runs before anything else.
* ``isthmus-proxy``, the Envoy sidecar as a native sidecar (an init container with ``restartPolicy:
  Always``: it starts before the application's containers and stops after them), second, so later
  init containers already have the mesh. Its bootstrap is the one `isthmus bootstrap` writes
  (xds.generate.bootstrap), passed inline with ``--config-yaml``; the pod's name comes from the
  downward API through Kubernetes' ``$(POD_NAME)`` expansion. It authenticates with a projected
  service-account token (audience ``isthmus``) over TLS, trusting the mesh root from the pod's
  downward API, and runs as the proxy's user id (excluded from capture), without privileges,
  with a read-only root filesystem. Its readiness probe asks Envoy whether it is configured.
* Annotations: ``isthmus.io/inbound-port`` (discovery then knows the pod has a sidecar),
  ``isthmus.io/status`` (injected: a pod is never injected twice), the capture rules and the root.

The patch adds and never replaces or removes: containers it does not own are untouched. A pod
already injected, opted out (annotation ``isthmus.io/inject: "false"``) or on the host's network
gets no patch, and ``decide`` says why. Per-pod annotations tune it: ``isthmus.io/service``,
``isthmus.io/exclude-inbound-ports``, ``isthmus.io/exclude-outbound-ports``,
``isthmus.io/exclude-outbound-cidrs`` (comma-separated), ``isthmus.io/capture-probe-ports``
(the ports the kubelet probes are not captured unless this is "true"), ``isthmus.io/proxy-cpu``,
``isthmus.io/proxy-memory``, ``isthmus.io/proxy-memory-limit``, ``isthmus.io/proxy-log-level``,
``isthmus.io/outbound-traffic`` (``allow-any`` or ``registry-only``: where the captured sidecar
sends connections to addresses of no mesh service).
A bad value is an ``InjectError`` naming the annotation (the webhook refuses the pod with it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from isthmus.inject.capture import Capture, nft_rules
from isthmus.xds.generate.bootstrap import BootstrapOptions, bootstrap_dict
from isthmus.xds.proxy import DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT, DNS_PORT, OutboundTraffic, Role

PREFIX = "isthmus.io/"
INJECT = PREFIX + "inject"
STATUS = PREFIX + "status"
INBOUND_PORT = PREFIX + "inbound-port"  # discovery.kube.gateway reads it
CAPTURE_RULES = PREFIX + "capture-rules"
XDS_ROOT = PREFIX + "xds-root-ca"
CAPTURE_PROBES = PREFIX + "capture-probe-ports"
OUTBOUND_TRAFFIC = PREFIX + "outbound-traffic"
PROXY, CAPTURE = "isthmus-proxy", "isthmus-capture"
TOKEN_VOLUME, POD_VOLUME = "isthmus-xds-token", "isthmus-pod"
TOKEN_DIR, POD_DIR = "/var/run/secrets/isthmus", "/etc/isthmus/pod"
ADMIN_PORT, READINESS_PORT = 15000, 15021
LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")
DEFAULT_PROXY_IMAGE = "envoyproxy/envoy:v1.40.0"
DEFAULT_CAPTURE_IMAGE = "isthmus/capture:latest"  # a small image with nft (deploy/images/capture)


class InjectError(ValueError):
    """The pod asks for something that cannot be injected; the message names the annotation."""


@dataclass(frozen=True, slots=True)
class InjectSettings:
    """What isthmus injects into the pods of one member cluster."""

    cluster: str
    xds_host: str  # where sidecars reach isthmus, e.g. isthmus.isthmus-system.svc
    xds_port: int = 15012
    xds_server_name: str = ""  # the SAN the serving certificate has (default: xds_host)
    root_pem: str = ""  # the mesh root, PEM
    proxy_image: str = DEFAULT_PROXY_IMAGE
    capture_image: str = DEFAULT_CAPTURE_IMAGE
    token_audience: str = "isthmus"
    token_seconds: int = 3600
    proxy_uid: int = 1337
    delta: bool = True
    region: str = ""
    zone: str = ""
    proxy_cpu: str = "50m"
    proxy_memory: str = "64Mi"
    proxy_memory_limit: str = "512Mi"
    log_level: str = "warning"
    outbound_traffic: str = "allow-any"  # captured connections to no mesh service (inject.capture)


Obj = Mapping[str, Any]


def _meta(pod: Obj) -> Mapping[str, Any]:
    meta = pod.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _annotations(pod: Obj) -> Mapping[str, str]:
    found = _meta(pod).get("annotations")
    return found if isinstance(found, Mapping) else {}


def _spec(pod: Obj) -> Mapping[str, Any]:
    spec = pod.get("spec")
    if not isinstance(spec, Mapping):
        raise InjectError("the pod has no spec")
    return spec


def decide(pod: Obj) -> str:
    """Why the pod gets no sidecar ("" if it gets one)."""
    annotations, spec = _annotations(pod), _spec(pod)
    if STATUS in annotations or any(c.get("name") == PROXY for c in spec.get("initContainers") or []):
        return "already injected"
    if str(annotations.get(INJECT, "")).lower() == "false":
        return f"opted out ({INJECT}: false)"
    if spec.get("hostNetwork"):
        return "on the host's network (capture would take the node's traffic)"
    return ""


def _ports(annotations: Mapping[str, str], key: str) -> tuple[int, ...]:
    text = str(annotations.get(PREFIX + key, "")).strip()
    if not text:
        return ()
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 0 < int(part) < 65536:
            raise InjectError(f"{PREFIX}{key}: {part!r} is not a port number")
        out.append(int(part))
    return tuple(out)


def _cidrs(annotations: Mapping[str, str]) -> tuple[str, ...]:
    text = str(annotations.get(PREFIX + "exclude-outbound-cidrs", "")).strip()
    return tuple(p.strip() for p in text.split(",") if p.strip()) if text else ()


def service_of(pod: Obj) -> str:
    """The service the pod serves: annotation isthmus.io/service, else the usual name labels."""
    labels = _meta(pod).get("labels") or {}
    for value in (
        _annotations(pod).get(PREFIX + "service"),
        labels.get("app.kubernetes.io/name"),
        labels.get("app"),
    ):
        if value:
            return str(value)
    name = str(_meta(pod).get("name") or _meta(pod).get("generateName") or "unknown")
    return name.rstrip("-") or "unknown"


def probe_ports(pod: Obj) -> tuple[int, ...]:
    """The ports the kubelet probes the pod's containers on (httpGet, tcpSocket, grpc; a named port
    resolved through the container's ports)."""
    found: set[int] = set()
    for container in _spec(pod).get("containers") or []:
        named = {p.get("name"): p.get("containerPort") for p in container.get("ports") or [] if p.get("name")}
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = container.get(kind) or {}
            for action in ("httpGet", "tcpSocket", "grpc"):
                port = (probe.get(action) or {}).get("port")
                port = named.get(port, port) if isinstance(port, str) and not port.isdigit() else port
                if isinstance(port, (int, str)) and str(port).isdigit() and 0 < int(port) < 65536:
                    found.add(int(port))
    return tuple(sorted(found))


def _capture(settings: InjectSettings, pod: Obj, annotations: Mapping[str, str]) -> Capture:
    # The kubelet probes from the node in plain text, which the sidecar's inbound listener (mTLS
    # only) would refuse: the probed ports are not captured, unless the pod asks for it.
    probed = () if str(annotations.get(CAPTURE_PROBES, "")).lower() == "true" else probe_ports(pod)
    capture = Capture(
        proxy_uid=settings.proxy_uid,
        outbound_port=DEFAULT_OUTBOUND_PORT,
        inbound_port=DEFAULT_INBOUND_PORT,
        dns_port=DNS_PORT,
        own_ports=(ADMIN_PORT, DEFAULT_OUTBOUND_PORT, DEFAULT_INBOUND_PORT, READINESS_PORT),
        exclude_inbound_ports=_ports(annotations, "exclude-inbound-ports") + probed,
        exclude_outbound_ports=_ports(annotations, "exclude-outbound-ports"),
        exclude_outbound_cidrs=_cidrs(annotations),
    )
    try:
        nft_rules(capture)
    except ValueError as exc:
        raise InjectError(f"{PREFIX}exclude-outbound-cidrs: {exc}") from None
    return capture


def _outbound_traffic(settings: InjectSettings, annotations: Mapping[str, str]) -> str:
    value = str(annotations.get(OUTBOUND_TRAFFIC, settings.outbound_traffic))
    if value not in {t.value for t in OutboundTraffic}:
        raise InjectError(f"{OUTBOUND_TRAFFIC}: {value!r} is not allow-any or registry-only")
    return value


def _bootstrap(settings: InjectSettings, namespace: str, pod: Obj, log_level: str) -> str:
    service_account = str(_spec(pod).get("serviceAccountName") or "default")
    options = BootstrapOptions(
        role=Role.SIDECAR,
        cluster=settings.cluster,
        namespace=namespace,
        service=service_of(pod),
        service_account=service_account,
        pod="$(POD_NAME)",
        node_name="$(NODE_NAME)",
        node_id=f"sidecar~$(POD_NAME).{namespace}~{settings.cluster}",
        region=settings.region,
        zone=settings.zone,
        xds_host=settings.xds_host,
        xds_port=settings.xds_port,
        xds_root_ca=f"{POD_DIR}/xds-root.pem",
        xds_server_name=settings.xds_server_name,
        token_file=f"{TOKEN_DIR}/token",
        admin_port=ADMIN_PORT,
        delta=settings.delta,
        readiness_port=READINESS_PORT,
        capture=True,
        outbound_traffic=_outbound_traffic(settings, _annotations(pod)),
    )
    return json.dumps(bootstrap_dict(options), separators=(",", ":"), sort_keys=True)


def _containers(settings: InjectSettings, namespace: str, pod: Obj) -> tuple[dict[str, Any], dict[str, Any]]:
    annotations = _annotations(pod)
    log_level = str(annotations.get(PREFIX + "proxy-log-level", settings.log_level))
    if log_level not in LOG_LEVELS:
        raise InjectError(f"{PREFIX}proxy-log-level: {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    pod_mount = {"name": POD_VOLUME, "mountPath": POD_DIR, "readOnly": True}
    capture = {
        "name": CAPTURE,
        "image": settings.capture_image,
        "command": ["nft", "-f", f"{POD_DIR}/capture.nft"],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "volumeMounts": [pod_mount],
    }
    proxy = {
        "name": PROXY,
        "image": settings.proxy_image,
        "restartPolicy": "Always",
        "command": ["envoy"],
        "args": [
            "--config-yaml",
            _bootstrap(settings, namespace, pod, log_level),
            "--log-level",
            log_level,
            "--disable-hot-restart",
        ],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": READINESS_PORT},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "securityContext": {
            "runAsUser": settings.proxy_uid,
            "runAsGroup": settings.proxy_uid,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "resources": {
            "requests": {
                "cpu": str(annotations.get(PREFIX + "proxy-cpu", settings.proxy_cpu)),
                "memory": str(annotations.get(PREFIX + "proxy-memory", settings.proxy_memory)),
            },
            "limits": {
                "memory": str(annotations.get(PREFIX + "proxy-memory-limit", settings.proxy_memory_limit))
            },
        },
        "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True}, pod_mount],
    }
    return capture, proxy


def _volumes(settings: InjectSettings) -> list[dict[str, Any]]:
    token = {
        "name": TOKEN_VOLUME,
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": settings.token_audience,
                        "expirationSeconds": settings.token_seconds,
                        "path": "token",
                    }
                }
            ]
        },
    }
    files = [("xds-root.pem", XDS_ROOT), ("capture.nft", CAPTURE_RULES)]
    downward = {
        "name": POD_VOLUME,
        "downwardAPI": {
            "items": [
                {"path": path, "fieldRef": {"fieldPath": f"metadata.annotations['{key}']"}}
                for path, key in files
            ]
        },
    }
    return [token, downward]


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _add_all(ops: list[dict[str, Any]], path: str, existing: Any, items: list[Any], front: bool) -> None:
    """Add ``items`` to the list at ``path``: the whole list if there is none, else each one."""
    if not existing:
        ops.append({"op": "add", "path": path, "value": items})
        return
    for i, item in enumerate(items):
        ops.append({"op": "add", "path": f"{path}/{i if front else '-'}", "value": item})


def patch(pod: Obj, settings: InjectSettings, namespace: str) -> list[dict[str, Any]]:
    """The JSONPatch that injects ``pod`` (of ``namespace``: admission requests carry it beside the
    pod), or [] if ``decide`` says it gets no sidecar. Raises InjectError for bad annotations."""
    if decide(pod):
        return []
    spec, annotations = _spec(pod), _annotations(pod)
    capture = _capture(settings, pod, annotations)
    capture_container, proxy_container = _containers(settings, namespace, pod)
    ops: list[dict[str, Any]] = []
    _add_all(
        ops, "/spec/initContainers", spec.get("initContainers"), [capture_container, proxy_container], True
    )
    _add_all(ops, "/spec/volumes", spec.get("volumes"), _volumes(settings), False)
    status = json.dumps({"proxy": PROXY, "capture": CAPTURE, "volumes": [TOKEN_VOLUME, POD_VOLUME]})
    added = {
        INBOUND_PORT: str(DEFAULT_INBOUND_PORT),
        STATUS: status,
        CAPTURE_RULES: nft_rules(capture),
        XDS_ROOT: settings.root_pem,
    }
    if not annotations:
        if "metadata" not in pod:
            ops.append({"op": "add", "path": "/metadata", "value": {}})
        ops.append({"op": "add", "path": "/metadata/annotations", "value": added})
    else:
        for key, value in added.items():
            ops.append({"op": "add", "path": f"/metadata/annotations/{_escape(key)}", "value": value})
    return ops
