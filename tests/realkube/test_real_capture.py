"""Issue 13 end to end on real nodes: an unmodified HTTP client in an injected pod of member cluster
east calls a service that only member cluster west has, by its cluster.local name, and gets west's
answer through west's east-west gateway, over mTLS; nothing in the client knows about the mesh.

::

    east (node + pods, netns of a datapath Topology)      west (node + pods)
      client pod (injected): curl http://api.shop.svc.cluster.local/
        DNS (UDP 53, captured) -> sidecar dns_15053: the clusterset IP (api is remote-only here)
        TCP to it (captured)   -> sidecar outbound_15001 (original destination) -> mTLS, SNI
          -> west's transit address :15443 ---------------> gateway Envoy (host network, SNI
                                                              passthrough) -> api pod :15006
                                                              (sidecar, mTLS) -> app :8080

* Both clusters are real (etcd, kube-apiserver, controller manager, scheduler) with a real node each
  (realkube.node) in its namespace of a data-path Topology, joined only by the transit bridge; pods
  leaving their node for the transit network are masqueraded to the node's transit address (as a
  real node's CNI does), since no other node has a route to a cluster's pod range.
* One ``isthmus serve`` (root namespace, loopback) serves both clusters with the reader role,
  xDS over TLS for west's transit address (forwarded there into the root namespace: every sidecar
  and the gateway connect to it, east's across the transit bridge), the admission webhook
  registered in both clusters for namespace ``shop`` (labelled ``isthmus.io/inject=enabled``), and
  ``--cluster-gateway west=<west's transit address>:15443``.
* West's gateway is a host-network pod of the Envoy image with the bootstrap of ``isthmus bootstrap
  --role gateway``, authenticating with a projected, pod-bound token of isthmus-system/isthmus-gateway
  (the gateway identity isthmus expects by default).
* The client pod's resolver is glibc's, from the /etc/resolv.conf the kubelet writes (``dnsPolicy:
  None``: search domains as in Kubernetes, ndots 5, and a nameserver where nothing listens: east's
  node address), so every answer comes from the sidecar. Commands run in the client's container as
  ``kubectl exec`` would run them: in its mount and network namespaces (nsenter).

The nameserver never answering costs time: with ndots 5 the resolver asks the search-domain
expansions first, the sidecar forwards them to it and answers each NXDOMAIN only at its resolver
timeout (2 s), so a name of four dots takes ~13 s to resolve here (a real cluster's DNS answers those
at once); curl gets 60 s.

Also: a same-cluster call by ClusterIP (east's injected ``web``), a clusterset name that does not
exist (curl cannot resolve it: exit 6), a destination that is no mesh service (passthrough) and a
port excluded from capture (``isthmus.io/exclude-outbound-ports``: the sidecar never sees it).
A strict xfail: the sidecar answers AAAA for a name it has only an A record for with NXDOMAIN
(Envoy's DNS filter, envoyproxy/envoy#42590), where RFC 4074 wants NOERROR and no answers.
Everything is removed at the end, also on failure: the nodes, clusters, namespaces, isthmus.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio

from realkube.binaries import kube_bin
from realkube.fixtures import clusters_with_nodes, reader_kubeconfig
from realkube.mesh import (
    GATEWAY_NS,
    GATEWAY_POD,
    GATEWAY_PORT,
    GATEWAY_SA,
    SHOP,
    Cluster,
    client_pod,
    gateway_admin,
    gateway_bootstrap,
    gateway_objects,
    import_curl,
    masquerade,
    pod_log,
    pod_pid,
    proxy_admin,
    ready_pod,
    stat,
)
from realkube.node import Node, available
from realkube.objects import deployment, service
from realkube.test_real_inject import (
    PROXY,
    Isthmus,
    names,
    namespaces,
    registered,
    serving,
    webhook_active,
    webhook_configuration,
)

pytestmark = [pytest.mark.realkube, pytest.mark.asyncio(loop_scope="module")]

A, AAAA = 1, 28
# One DNS query over UDP (argv: server, name, type); prints the answer's rcode and answer count.
DNS_QUERY = """
import socket, struct, sys
server, name, qtype = sys.argv[1], sys.argv[2], int(sys.argv[3])
labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
query = struct.pack(">HHHHHH", 0x1337, 0x0100, 1, 0, 0, 0) + labels + bytes(1) + struct.pack(">HH", qtype, 1)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.settimeout(10)
    sock.sendto(query, (server, 53))
    answer = sock.recv(4096)
flags, _, answers = struct.unpack(">HHH", answer[2:8])
print(flags & 15, answers)
"""
SIDECARS = ("api", "web", "client", "bypass", "registry")  # the injected pods


def why_not() -> str | None:
    if (why := available()) is not None:
        return why
    if shutil.which("curl") is None:
        return "curl is not installed (hack/node-packages.sh installs it)"
    return None


@dataclass
class Mesh:
    east: Cluster
    west: Cluster
    isthmus: Isthmus
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> the Ready pod

    def pod_pid(self, cluster: Cluster, pod: str, with_file: str = "") -> int:
        """A process of ``pod`` (one whose root holds ``with_file``, when given: a container's)."""
        return pod_pid(cluster.node, self.pods[pod], with_file)

    def exec(
        self, cluster: Cluster, pod: str, *argv: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` in the pod's container ``client`` (its mount and network namespaces), as
        ``kubectl exec`` runs a command."""
        pid = self.pod_pid(cluster, pod, with_file="/usr/bin/curl")
        return subprocess.run(
            ["nsenter", "-t", str(pid), "-m", "-n", "-u", "-i", "-r", "-w", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def curl(self, pod: str, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
        """An HTTP GET by east's pod ``pod`` with its own curl and resolver."""
        return self.exec(self.east, pod, "/usr/bin/curl", "-sS", "--max-time", "60", *extra, url, timeout=90)

    def dns(self, pod: str, name: str, qtype: int) -> tuple[int, int]:
        """(rcode, answers) of one query for ``name`` to east's pod's nameserver, from the pod's
        network namespace (so captured, as its resolver's queries are)."""
        netns = f"/proc/{self.pod_pid(self.east, pod)}/ns/net"
        argv = [sys.executable, "-c", DNS_QUERY, self.east.node.address, name, str(qtype)]
        done = subprocess.run(
            ["nsenter", f"--net={netns}", "--", *argv], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        rcode, answers = done.stdout.split()
        return int(rcode), int(answers)

    def proxy_admin(self, cluster: Cluster, pod: str, path: str) -> str:
        """The sidecar's admin API (loopback of the pod's network namespace; not captured)."""
        return proxy_admin(cluster.node, self.pods[pod], path)

    def gateway_admin(self, path: str) -> str:
        return gateway_admin(self.west.node, path)

    def logs(self) -> str:
        out = []
        for cluster, pod, containers in (
            (self.east, "client", (PROXY, "client")),
            (self.west, "api", (PROXY, "app")),
        ):
            name = self.pods.get(pod, {}).get("metadata", {}).get("name", pod)
            for container in containers:
                out.append(
                    f"--- {cluster.name} {name} {container}\n{pod_log(cluster.node, SHOP, name, container)}"
                )
        out.append(f"--- west gateway\n{pod_log(self.west.node, GATEWAY_NS, GATEWAY_POD, 'envoy')}")
        return "\n".join(out)


# ---- the module's two clusters, nodes, isthmus, gateway and workloads ------------------------------


@pytest.fixture(scope="module")
def _skip_if_unable() -> None:
    if (why := why_not()) is not None:
        pytest.skip(why)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(_skip_if_unable: None, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    binaries = kube_bin("all")
    base = tmp_path_factory.mktemp("capture")

    def prepare(node: Node) -> None:
        node.import_envoy()
        node.import_capture()
        masquerade(node)

    mesh: Mesh | None = None
    try:
        with clusters_with_nodes(("east", "west"), base, binaries, prepare) as (_, made):
            east, west = Cluster("east", made["east"]), Cluster("west", made["west"])
            import_curl(east.node)

            kubeconfigs = base / "kubeconfigs"
            kubeconfigs.mkdir()
            for c in (east, west):
                await reader_kubeconfig(c.api, kubeconfigs / f"{c.name}.yaml")
            # Every sidecar and the gateway reach isthmus at west's transit address (forwarded to its
            # loopback port); east's cross the transit bridge.
            xds_host = west.node.address
            isthmus = Isthmus(base / "isthmus", kubeconfigs, xds_sans=(xds_host,), inject_xds_host=xds_host)
            isthmus.process.argv += ["--cluster-gateway", f"west={west.node.address}:{GATEWAY_PORT}"]
            west.node.expose(isthmus.xds_port)
            mesh = Mesh(east, west, isthmus)
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(serving(isthmus))
                for c in (east, west):
                    await stack.enter_async_context(
                        namespaces(c.api, {SHOP: {"isthmus.io/inject": "enabled"}})
                    )
                    config = webhook_configuration(
                        f"isthmus-capture-{os.getpid()}", c.name, isthmus.webhook_port, isthmus.ca_pem, [SHOP]
                    )
                    await stack.enter_async_context(registered(c.api, config))
                for c in (east, west):
                    await webhook_active(c.api, SHOP)
                # West: the api service and its east-west gateway.
                for obj in gateway_objects(
                    gateway_bootstrap("west", xds_host, isthmus.xds_port, west.node.address), isthmus.ca_pem
                ):
                    await west.api.admin.apply(obj)
                await west.api.admin.apply(service("api", SHOP))
                await west.api.admin.apply(deployment("api", "api-west", SHOP))
                # East: no api; web (same-cluster) and the clients.
                await east.api.admin.apply(service("web", SHOP))
                await east.api.admin.apply(deployment("web", "web-east", SHOP))
                nameserver = east.node.address  # nothing listens on port 53 there
                await east.api.admin.create(client_pod("client", nameserver))
                await east.api.admin.create(
                    client_pod("bypass", nameserver, {"isthmus.io/exclude-outbound-ports": "8080"})
                )
                await east.api.admin.create(
                    client_pod("registry", nameserver, {"isthmus.io/outbound-traffic": "registry-only"})
                )
                try:
                    for c, namespace, app in (
                        (west, SHOP, "api"),
                        (west, GATEWAY_NS, GATEWAY_POD),
                        (east, SHOP, "web"),
                        (east, SHOP, "client"),
                        (east, SHOP, "bypass"),
                        (east, SHOP, "registry"),
                    ):
                        mesh.pods[app] = await ready_pod(c.api, namespace, app)
                    for app in SIDECARS:
                        assert PROXY in names(mesh.pods[app]["spec"]["initContainers"]), app
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\n{mesh.logs()}") from None
                yield mesh
    finally:
        if mesh is not None:
            print(mesh.logs())


# ---- the tests ------------------------------------------------------------------------------------


async def test_a_remote_only_service_is_called_by_its_cluster_local_name_through_wests_gateway(
    mesh: Mesh,
) -> None:
    gateway_before = mesh.gateway_admin("/stats")
    called = mesh.curl("client", f"http://api.{SHOP}.svc.cluster.local/")
    assert (called.returncode, called.stdout.strip()) == (0, "api-west"), (
        f"curl exit {called.returncode}: {called.stderr}\n{mesh.logs()}"
    )
    # The client's resolver got the clusterset IP from its sidecar (east defines no api).
    resolved = mesh.curl(
        "client", f"http://api.{SHOP}.svc.cluster.local/", "-o", "/dev/null", "-w", "%{remote_ip}"
    )
    assert resolved.stdout.startswith("240.240."), resolved
    assert mesh.dns("client", f"api.{SHOP}.svc.cluster.local", A) == (0, 1)
    # The sidecar sent it over mTLS to west's gateway, which passed it on by SNI.
    sni = f"outbound_.80_._.api.{SHOP}.svc.cluster.local"
    cluster = f"outbound|80||api.{SHOP}.svc.cluster.local"
    client_stats = mesh.proxy_admin(mesh.east, "client", "/stats")
    assert stat(client_stats, f"cluster.{cluster}.upstream_rq_200") >= 2, client_stats
    assert stat(client_stats, f"cluster.{cluster}.ssl.handshake") >= 1, client_stats
    endpoints = mesh.proxy_admin(mesh.east, "client", "/clusters")
    assert f"{cluster}::{mesh.west.node.address}:{GATEWAY_PORT}::" in endpoints, endpoints
    gateway_after = mesh.gateway_admin("/stats")
    before, after = (stat(s, f"cluster.{sni}.upstream_cx_total") for s in (gateway_before, gateway_after))
    assert after >= before + 1, gateway_after
    # isthmus's view: the gateway and every sidecar connected with pod-bound tokens, none refused.
    status = await mesh.isthmus.readyz()
    assert status["proxies"] == len(SIDECARS) + 1, status
    assert status["xds"]["pod_bound_streams"] == len(SIDECARS) + 1, status
    assert status["xds"]["refused_streams"] == {}, status
    assert f"proxy gateway~{GATEWAY_SA}.{GATEWAY_NS}~west connected" in mesh.isthmus.log()


async def cluster_ip(cluster: Cluster, name: str) -> str:
    found = await cluster.api.admin.get("Service", SHOP, name)
    assert found is not None, name
    return str(found["spec"]["clusterIP"])


async def test_a_same_cluster_service_is_called_by_its_cluster_ip_and_clusterset_name(mesh: Mesh) -> None:
    """East's own web: by the ClusterIP kube-proxy would have handled, and by its clusterset name
    (the cluster.local name is east's cluster DNS's, which these tests do not run), both through
    the sidecars over mTLS."""
    address = await cluster_ip(mesh.east, "web")
    cluster = f"outbound|80||web.{SHOP}.svc.cluster.local"
    before = stat(mesh.proxy_admin(mesh.east, "web", "/stats"), "http.inbound_80.downstream_rq_2xx")
    by_ip = mesh.curl("client", f"http://{address}/")
    assert (by_ip.returncode, by_ip.stdout.strip()) == (0, "web-east"), f"{by_ip.stderr}\n{mesh.logs()}"
    by_name = mesh.curl("client", f"http://web.{SHOP}.svc.clusterset.local/", "-w", " %{remote_ip}")
    assert by_name.returncode == 0, by_name.stderr
    answer, remote = by_name.stdout.split()
    assert answer == "web-east"
    assert remote.startswith("240.240."), remote
    client_stats = mesh.proxy_admin(mesh.east, "client", "/stats")
    assert stat(client_stats, f"cluster.{cluster}.upstream_rq_200") >= 2, client_stats
    assert stat(client_stats, f"cluster.{cluster}.ssl.handshake") >= 1, client_stats
    # Received by web's sidecar, on its inbound mTLS listener.
    after = stat(mesh.proxy_admin(mesh.east, "web", "/stats"), "http.inbound_80.downstream_rq_2xx")
    assert after >= before + 2, (before, after)


async def test_a_clusterset_name_that_no_service_has_does_not_resolve(mesh: Mesh) -> None:
    missing = mesh.curl("client", f"http://nope.{SHOP}.svc.clusterset.local/")
    assert missing.returncode == 6, missing  # CURLE_COULDNT_RESOLVE_HOST
    assert "Could not resolve host" in missing.stderr, missing.stderr
    # ... while the same resolver, at the same time, finds a name that exists.
    found = mesh.curl("client", f"http://api.{SHOP}.svc.clusterset.local/")
    assert (found.returncode, found.stdout.strip()) == (0, "api-west"), found.stderr


async def test_other_destinations_pass_through_and_excluded_ports_bypass_the_sidecar(mesh: Mesh) -> None:
    """A pod address is no mesh service's: the client's sidecar passes the connection on to it
    (allow-any). A pod that excludes the port connects to it without its sidecar seeing it."""
    web = mesh.pods["web"]["status"]["podIP"]
    url = f"http://{web}:8080/"  # the app's own port, left out of web's inbound capture (probed)
    outbound = "listener.127.0.0.1_15001.downstream_cx_total"
    client_before = mesh.proxy_admin(mesh.east, "client", "/stats")
    through = mesh.curl("client", url)
    assert (through.returncode, through.stdout.strip()) == (0, "web-east"), through.stderr
    client_after = mesh.proxy_admin(mesh.east, "client", "/stats")
    for name in ("cluster.passthrough.upstream_cx_total", outbound):
        assert stat(client_after, name) == stat(client_before, name) + 1, (name, client_after)
    # Excluded: the same request, and the bypassing pod's sidecar never sees a connection.
    bypass_before = mesh.proxy_admin(mesh.east, "bypass", "/stats")
    direct = mesh.curl("bypass", url)
    assert (direct.returncode, direct.stdout.strip()) == (0, "web-east"), direct.stderr
    bypass_after = mesh.proxy_admin(mesh.east, "bypass", "/stats")
    for name in ("cluster.passthrough.upstream_cx_total", outbound):
        assert stat(bypass_after, name) == stat(bypass_before, name), (name, bypass_after)
    # Other ports of the bypassing pod are still captured: the mesh name works through its sidecar.
    called = mesh.curl("bypass", f"http://api.{SHOP}.svc.cluster.local/")
    assert (called.returncode, called.stdout.strip()) == (0, "api-west"), called.stderr
    assert stat(mesh.proxy_admin(mesh.east, "bypass", "/stats"), outbound) == stat(bypass_after, outbound) + 1


async def test_registry_only_closes_connections_to_addresses_of_no_mesh_service(mesh: Mesh) -> None:
    """With isthmus.io/outbound-traffic: registry-only, the pod address that the allow-any client
    reaches (above) matches no filter chain of the sidecar's outbound listener: the connection is
    closed; mesh services still work."""
    web = mesh.pods["web"]["status"]["podIP"]
    before = mesh.proxy_admin(mesh.east, "registry", "/stats")
    closed = mesh.curl("registry", f"http://{web}:8080/")
    assert closed.returncode in (52, 56), closed  # empty reply / connection reset: no HTTP answer
    after = mesh.proxy_admin(mesh.east, "registry", "/stats")
    no_chain = "listener.127.0.0.1_15001.no_filter_chain_match"
    assert stat(after, no_chain) == stat(before, no_chain) + 1, after
    passthrough = "cluster.passthrough.upstream_cx_total"
    assert stat(after, passthrough) == stat(before, passthrough) == 0, after
    called = mesh.curl("registry", f"http://api.{SHOP}.svc.cluster.local/")
    assert (called.returncode, called.stdout.strip()) == (0, "api-west"), called.stderr


NO_DATA = (
    "Envoy's DNS filter answers a query of a type a known name has no record of with NXDOMAIN "
    "(envoyproxy/envoy#42590), not NOERROR with no answers (RFC 4074): glibc uses the A answer "
    "anyway, musl (Alpine) fails the whole lookup"
)


@pytest.mark.xfail(strict=True, reason=NO_DATA)
async def test_the_sidecar_says_a_name_it_knows_has_no_ipv6_address_without_denying_the_name(
    mesh: Mesh,
) -> None:
    assert mesh.dns("client", f"api.{SHOP}.svc.cluster.local", AAAA) == (0, 0)
