"""Building blocks of the real-node mesh tests (test_real_capture.py, test_real_upgrade.py): member
clusters with real nodes in a data-path Topology, isthmus's sidecars injected into their pods, and
east-west gateways as host-network pods.

* ``gateway_bootstrap`` / ``gateway_objects``: a cluster's gateway, the Envoy image with the
  bootstrap of ``isthmus bootstrap --role gateway``, authenticating with a projected, pod-bound token
  of isthmus-system/isthmus-gateway (the gateway identity isthmus expects by default), listening on
  the node's transit address.
* ``client_pod``: a pod whose container sleeps, with curl (CURL_IMAGE, ``import_curl``), and a
  resolv.conf of Kubernetes' shape whose nameserver answers nothing (only the sidecar does).
* ``masquerade``: pods leaving their node for the transit network go out as the node's transit
  address (as a real node's CNI does), since no other node has a route to a cluster's pod range.
* Looking into pods: a pod's processes (``pod_pid``), its sidecar's admin API (``proxy_admin``), a
  gateway's (``gateway_admin``), a container's log as the kubelet wrote it (``pod_log``), a counter
  of Envoy's /stats text (``stat``), a DNS query answered by a pod's sidecar (``resolve``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datapath.netns import CLUSTER_LINK
from realkube.cluster import RealCluster
from realkube.fixtures import READER_NAMESPACE
from realkube.images import with_libraries, write_image
from realkube.node import ENVOY_IMAGE, Node
from realkube.rest import path_of
from realkube.wait import until

ISTHMUS = Path(sys.executable).parent / "isthmus"
SHOP = "shop"
CURL_IMAGE = "isthmus.test/curl:1"  # this machine's curl and its libraries, and /testapp (pause)
GATEWAY_PORT, GATEWAY_ADMIN, GATEWAY_READY = 15443, 15000, 15021
GATEWAY_NS, GATEWAY_SA, GATEWAY_POD = READER_NAMESPACE, "isthmus-gateway", "eastwest"
SEARCHES = [f"{SHOP}.svc.cluster.local", "svc.cluster.local", "cluster.local"]
# One DNS query of type A over UDP (argv: server, name); prints the rcode and the first address.
DNS_RESOLVE = """
import socket, struct, sys
server, name = sys.argv[1], sys.argv[2]
labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
query = struct.pack(">HHHHHH", 0x1337, 0x0100, 1, 0, 0, 0) + labels + bytes(1) + struct.pack(">HH", 1, 1)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.settimeout(10)
    sock.sendto(query, (server, 53))
    answer = sock.recv(4096)
flags, _, answers = struct.unpack(">HHH", answer[2:8])
at = len(query)
address = "-"
for _ in range(answers):
    at += 2 if answer[at] & 0xC0 == 0xC0 else answer.index(0, at) + 1 - at
    rtype, _, _, length = struct.unpack(">HHIH", answer[at:at + 10])
    at += 10
    if rtype == 1 and length == 4:
        address = socket.inet_ntoa(answer[at:at + 4])
        break
    at += length
print(flags & 15, address)
"""


@dataclass
class Cluster:
    """A member cluster and its node."""

    name: str
    node: Node

    @property
    def api(self) -> RealCluster:
        return self.node.cluster


# ---- objects ---------------------------------------------------------------------------------------


def client_pod(
    name: str, nameserver: str, annotations: dict[str, str] | None = None, namespace: str = SHOP
) -> dict[str, Any]:
    """A pod whose container sleeps (commands are run in it, as kubectl exec would), with curl, and
    a resolv.conf of Kubernetes' shape whose nameserver answers nothing (only the sidecar does)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app": name},
            "annotations": annotations or {},
        },
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "dnsPolicy": "None",
            "dnsConfig": {
                "nameservers": [nameserver],
                "searches": SEARCHES,
                "options": [{"name": "ndots", "value": "5"}],
            },
            "containers": [{"name": "client", "image": CURL_IMAGE, "imagePullPolicy": "Never"}],
        },
    }


def import_curl(node: Node) -> None:
    """Make CURL_IMAGE available on ``node``: this machine's curl, its libraries, and testapp."""
    files = {
        **with_libraries("/usr/bin/curl", Path(str(shutil.which("curl")))),
        "/testapp": node.bin / "testapp",
    }
    node.import_image(write_image(node.dir / "curl-1.tar", CURL_IMAGE, files, ["/testapp", "pause"]))


def gateway_bootstrap(cluster: str, xds_host: str, xds_port: int, listen: str) -> str:
    """What `isthmus bootstrap --role gateway` writes for the gateway pod (JSON, for --config-yaml)."""
    argv = [
        str(ISTHMUS), "bootstrap", "--role", "gateway", "--cluster", cluster,
        "--namespace", GATEWAY_NS, "--service", GATEWAY_SA, "--service-account", GATEWAY_SA,
        "--pod-name", GATEWAY_POD, "--node-name", f"{cluster}-node",
        "--xds-address", f"{xds_host}:{xds_port}", "--xds-root-ca", "/etc/isthmus/root/ca.crt",
        "--xds-server-name", xds_host, "--token-file", "/var/run/secrets/isthmus/token",
        "--admin-port", str(GATEWAY_ADMIN), "--readiness-port", str(GATEWAY_READY),
        "--listen-address", listen, "--delta", "--format", "json",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return json.dumps(json.loads(done.stdout), separators=(",", ":"))


def gateway_objects(bootstrap: str, root_pem: str) -> list[dict[str, Any]]:
    """The gateway's ServiceAccount, the mesh root it trusts, and its host-network pod."""
    meta = {"namespace": GATEWAY_NS}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": GATEWAY_SA, **meta}},
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "isthmus-root", **meta},
            "data": {"ca.crt": root_pem},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": GATEWAY_POD, "labels": {"app": GATEWAY_POD}, **meta},
            "spec": {
                "hostNetwork": True,
                "serviceAccountName": GATEWAY_SA,
                "automountServiceAccountToken": False,
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "envoy",
                        "image": ENVOY_IMAGE,
                        "imagePullPolicy": "Never",
                        "args": ["--config-yaml", bootstrap, "--disable-hot-restart", "--log-level", "info"],
                        "readinessProbe": {
                            "httpGet": {"path": "/ready", "port": GATEWAY_READY},
                            "periodSeconds": 1,
                        },
                        "volumeMounts": [
                            {"name": "token", "mountPath": "/var/run/secrets/isthmus", "readOnly": True},
                            {"name": "root", "mountPath": "/etc/isthmus/root", "readOnly": True},
                        ],
                    }
                ],
                "volumes": [
                    {
                        "name": "token",
                        "projected": {
                            "sources": [
                                {
                                    "serviceAccountToken": {
                                        "audience": "isthmus",
                                        "expirationSeconds": 3600,
                                        "path": "token",
                                    }
                                }
                            ]
                        },
                    },
                    {"name": "root", "configMap": {"name": "isthmus-root"}},
                ],
            },
        },
    ]


def masquerade(node: Node) -> None:
    """Pods leaving the node for the transit network go out as the node's transit address."""
    done = node.run_in(
        "iptables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        node.pod_cidr,
        "-o",
        CLUSTER_LINK,
        "-j",
        "MASQUERADE",
    )
    assert done.returncode == 0, done.stderr


# ---- looking into pods -----------------------------------------------------------------------------


def is_ready(obj: dict[str, Any] | None) -> bool:
    conditions = (obj or {}).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


async def ready_pod(cluster: RealCluster, namespace: str, app: str, timeout: float = 180) -> dict[str, Any]:
    async def find() -> dict[str, Any] | None:
        pods = await cluster.admin.request("GET", f"{path_of('Pod', namespace)}?labelSelector=app%3D{app}")
        return next((dict(p) for p in pods["items"] if is_ready(p)), None)

    return await until(find, f"a Ready pod of {app} in {cluster.name}/{namespace}", timeout)


def pod_log(node: Node, namespace: str, pod: str, container: str) -> str:
    """The kubelet's log of a container (in the node's podLogsDir, or the host's /var/log/pods)."""
    found: list[Path] = []
    for base in (node.dir / "pod-logs", Path("/var/log/pods")):
        found += sorted(base.glob(f"{namespace}_{pod}_*/{container}/*.log"))
    return "\n".join(p.read_text(errors="replace")[-4000:] for p in found) or "<no log>"


def pod_pid(node: Node, pod: dict[str, Any], with_file: str = "") -> int:
    """A process of ``pod`` (one whose root holds ``with_file``, when given: a container's)."""
    pids = sorted(node.pod_pids(pod["metadata"]["uid"]))
    for pid in pids:
        if not with_file or Path(f"/proc/{pid}/root{with_file}").exists():
            return pid
    raise AssertionError(
        f"no process of pod {pod['metadata']['name']} with {with_file or 'anything'}: {pids}"
    )


def proxy_admin(node: Node, pod: dict[str, Any], path: str) -> str:
    """The sidecar's admin API (loopback of the pod's network namespace; not captured)."""
    netns = f"/proc/{pod_pid(node, pod)}/ns/net"
    url = f"http://127.0.0.1:15000{path}"
    done = subprocess.run(
        ["nsenter", f"--net={netns}", "--", "curl", "-sS", "--max-time", "10", url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def gateway_admin(node: Node, path: str) -> str:
    """The admin API of the gateway on ``node`` (host network: the node's loopback)."""
    done = node.run_in("curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{GATEWAY_ADMIN}{path}")
    assert done.returncode == 0, done.stderr
    return done.stdout


def resolve(node: Node, pod: dict[str, Any], name: str) -> str:
    """The address ``pod``'s sidecar answers for ``name`` (type A), asked from the pod's network
    namespace (so captured, as its resolver's queries are)."""
    netns = f"/proc/{pod_pid(node, pod)}/ns/net"
    argv = [sys.executable, "-c", DNS_RESOLVE, node.address, name]
    done = subprocess.run(
        ["nsenter", f"--net={netns}", "--", *argv], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    rcode, address = done.stdout.split()
    assert (rcode, address != "-") == ("0", True), f"{name}: rcode {rcode}, address {address}"
    return address


def stat(stats: str, name: str) -> int:
    """A counter of an Envoy /stats text (0 if absent)."""
    match = re.search(rf"^{re.escape(name)}: (\d+)$", stats, re.MULTILINE)
    return int(match.group(1)) if match else 0
