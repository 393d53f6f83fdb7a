"""Transparent capture in a real network namespace (issue 13): the injector's nftables rules loaded
with ``nft -f`` into cluster east's namespace, which then is one captured pod; its sidecar (Envoy,
user 1337, ``isthmus bootstrap --capture``) is configured by isthmus over TLS; unmodified clients
(the agent's HTTP client, curl with the system resolver) run as root beside it.

What it proves, with the real kernel and a real Envoy: an application that calls a service by its
ClusterIP, by its cluster.local name when the service exists only in another member cluster (the
name resolved by the sidecar's DNS to the clusterset IP, the call answered by west over mTLS through
west's gateway), by a TCP service's ClusterIP, or anything outside the mesh (forwarded DNS, then
passthrough to the original destination) gets there without knowing about the mesh; an excluded
port is not captured; a clusterset name that does not exist is NXDOMAIN; in registry-only mode a
destination outside the mesh gets nothing.

The real-node version of the cross-cluster call (kubelet, webhook, pods) is
tests/realkube/test_real_capture.py; this tier is the one that fails fast and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from datapath.harness import DataPath, NsEnvoy, eventually
from datapath.netns import ClusterNet, NsProcess
from datapath.scenario import meshed, pods, start_sidecars
from isthmus.inject.capture import Capture, nft_rules

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.datapath,
    pytest.mark.parametrize("dp", ["transit"], indirect=True),
    pytest.mark.skipif(shutil.which("nft") is None, reason="no nft (hack/node-packages.sh installs it)"),
]

PROXY_UID = 1337
SERVICE_RANGE = "10.96.0.0/16"
CLUSTERSET_RANGE = "240.240.0.0/16"
OUTSIDE_PORT, EXCLUDED_PORT = 7000, 7001
OUTSIDE_NAME = "outside.test"
SEARCH = "shop.svc.cluster.local svc.cluster.local cluster.local"

# The "cluster's resolver" of the captured pod, in west's namespace on west's transit address: it
# knows OUTSIDE_NAME and nothing else, and logs every question it gets.
RESOLVER = """
import socket, sys
import dns.message, dns.rcode, dns.rrset
name, answer = sys.argv[3] + ".", sys.argv[2]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], 53))
print("listening", flush=True)
while True:
    data, peer = sock.recvfrom(4096)
    query = dns.message.from_wire(data)
    question = query.question[0]
    print("question", question.name, dns.rdatatype.to_text(question.rdtype), flush=True)
    reply = dns.message.make_response(query)
    if str(question.name) == name and question.rdtype == dns.rdatatype.A:
        reply.answer.append(dns.rrset.from_text(question.name, 5, "IN", "A", answer))
    elif str(question.name) != name:
        reply.set_rcode(dns.rcode.NXDOMAIN)
    sock.sendto(reply.to_wire(), peer)
"""


@contextlib.contextmanager
def resolv_conf(net: ClusterNet, nameserver: str) -> Iterator[None]:
    """/etc/netns/NETNS/resolv.conf: what `ip netns exec` shows processes of ``net`` as
    /etc/resolv.conf (started after this): the pod's resolver, as the kubelet would write it."""
    assert net.netns is not None
    directory = Path("/etc/netns") / net.netns
    directory.mkdir(parents=True)
    try:
        (directory / "resolv.conf").write_text(f"nameserver {nameserver}\nsearch {SEARCH}\noptions ndots:5\n")
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            directory.parent.rmdir()  # only if empty: others may use /etc/netns


def capture(net: ClusterNet, rules: Capture) -> None:
    """Load the injector's capture rules into ``net`` as its init container does, and route the
    service and clusterset ranges out of eth0 (a pod has a default route; without one, a connect
    to a ClusterIP fails before the rules see it). The routes lead nowhere but to capture."""
    assert net.netns is not None
    done = subprocess.run(
        ["ip", "netns", "exec", net.netns, "nft", "-f", "-"],
        input=nft_rules(rules),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    for cidr in (SERVICE_RANGE, CLUSTERSET_RANGE):
        subprocess.run(["ip", "-n", net.netns, "route", "add", cidr, "dev", "eth0"], check=True, timeout=30)


async def curl(dp: DataPath, cluster: str, url: str) -> tuple[int, str]:
    """curl (the system resolver, no proxy settings) run as root inside ``cluster``: (exit code, output)."""
    process = dp.topology.run(
        cluster, ["curl", "-sS", "--max-time", "10", "-o", "-", url], name=f"curl-{len(dp.envoys)}"
    )
    code = await asyncio.to_thread(process.proc.wait, 30)
    return code, process.log_text()


async def counter(envoy: NsEnvoy, name: str) -> int:
    """One of Envoy's counters by its exact name (names hold regex characters: filter by the tail)."""
    stats = await envoy.admin.stats(name.rsplit(".", 1)[-1])
    return int(stats.get(name, 0))


async def captured_pod(dp: DataPath, policy: str) -> tuple[NsEnvoy, NsProcess, Any]:
    """The mesh, the control plane, west's gateway and resolver, and east as one captured pod with
    its sidecar, configured (web answers by its ClusterIP): returns (the sidecar, the resolver, the
    pods by name). Call it inside ``resolv_conf(east, west's transit address)``."""
    east, west = dp.topology["east"], dp.topology["west"]
    p = await pods(dp, ("west", "api-west"), ("east", "web-east"), ("east", "db-east"))
    outside = await dp.app("west", "outside", address=west.transit_address, port=OUTSIDE_PORT)
    await dp.app("west", "excluded", address=west.transit_address, port=EXCLUDED_PORT)
    api = dp.mesh.service("api", meshed(dp, p["api-west"], "api"))
    api["cluster_ips"] = {"west": ["10.96.0.10"]}  # east has no Service api
    web = dp.mesh.service("web", meshed(dp, p["web-east"], "web"))
    web["cluster_ips"] = {"east": ["10.96.0.10"]}  # the same address in east: another service
    db = dp.mesh.service("db", dp.mesh.endpoint(p["db-east"].app), port=5432, protocol="tcp")
    db["cluster_ips"] = {"east": ["10.96.0.20"]}
    await dp.control_plane(api, web, db, extra_args=["--clusterset-range", CLUSTERSET_RANGE])
    resolver = dp.topology.run(
        "west",
        [sys.executable, "-c", RESOLVER, west.transit_address, outside.address, OUTSIDE_NAME],
        name="resolver",
    )
    await eventually(lambda: _says(resolver, "listening"), within=20, what="the resolver listens")
    capture(east, Capture(exclude_outbound_ports=(EXCLUDED_PORT,)))
    await start_sidecars(dp, {"api-west": "api"}, p)
    p["web-east"].sidecar = await dp.sidecar("east", "web", app=p["web-east"].app, uid=PROXY_UID)
    await dp.gateway("west")
    sidecar = await dp.sidecar(
        "east", "client", listen_address="0.0.0.0", app_address="127.0.0.1", capture=policy, uid=PROXY_UID
    )
    await sidecar.wait_live()
    await web_by_cluster_ip(dp)  # 10.96.0.10 is web in east (in west it is api's)
    return sidecar, resolver, p


def isolated(dp: DataPath) -> tuple[ClusterNet, ClusterNet]:
    if not dp.topology.isolated:
        pytest.skip("needs network namespaces (root)")
    return dp.topology["east"], dp.topology["west"]


async def web_by_cluster_ip(dp: DataPath) -> None:
    """Until east's client reaches web by its ClusterIP in east (the captured pod is configured)."""

    async def answered() -> None:
        got = await dp.agents["east"].requests("http://10.96.0.10/", count=3)
        assert got.all_ok, got.summary()
        assert got.apps == {"web-east"}, got.summary()

    await eventually(answered, within=20, what="web by its ClusterIP")


async def _says(process: NsProcess, text: str) -> None:
    process.ensure_running()
    assert text in process.log_text()


async def test_a_captured_pod_reaches_services_by_address_and_name_and_the_rest_by_passthrough(
    dp: DataPath,
) -> None:
    east, west = isolated(dp)
    with resolv_conf(east, west.transit_address):
        sidecar, resolver, _ = await captured_pod(dp, "allow-any")
        agent = dp.agents["east"]

        # A service that exists only in west, by its cluster.local name through the system resolver
        # and the search path: the sidecar's DNS answers its clusterset IP; west answers over mTLS
        # through west's gateway.
        code, out = await curl(dp, "east", "http://api.shop.svc.cluster.local/")
        assert code == 0, out
        assert '"app": "api-west"' in out or '"app":"api-west"' in out, out
        code, out = await curl(dp, "east", "http://api.shop.svc.clusterset.local/")
        assert code == 0, out
        assert "api-west" in out, out
        assert (
            await counter(sidecar, "cluster.outbound|80||api.shop.svc.cluster.local.upstream_cx_total") >= 1
        )
        # A TCP service by ClusterIP: tcp_proxy to its endpoint (the bytes are HTTP, unseen).
        got = await agent.requests("http://10.96.0.20:5432/", count=3)
        assert got.all_ok, got.summary()
        assert got.apps == {"db-east"}, got.summary()
        assert (
            await counter(sidecar, "cluster.outbound|5432||db.shop.svc.cluster.local.upstream_cx_total") >= 1
        )
        # Outside the mesh: the name is forwarded to the pod's resolver, the connection passes through.
        before = await counter(sidecar, "cluster.passthrough.upstream_cx_total")
        code, out = await curl(dp, "east", f"http://{OUTSIDE_NAME}:{OUTSIDE_PORT}/")
        assert code == 0, out
        assert '"outside"' in out, out
        assert "question outside.test. A" in resolver.log_text()
        assert await counter(sidecar, "cluster.passthrough.upstream_cx_total") == before + 1
        # An excluded port is not captured: answered, and the passthrough saw nothing.
        got = await agent.requests(f"http://{west.transit_address}:{EXCLUDED_PORT}/", count=2)
        assert got.all_ok, got.summary()
        assert got.apps == {"excluded"}, got.summary()
        assert await counter(sidecar, "cluster.passthrough.upstream_cx_total") == before + 1
        # A clusterset name that does not exist: NXDOMAIN (curl: could not resolve host, 6).
        code, out = await curl(dp, "east", "http://nope.shop.svc.clusterset.local/")
        assert code == 6, out
        assert await counter(sidecar, "dns_filter.dns.local_a_record_answers") >= 2


async def test_registry_only_refuses_destinations_outside_the_mesh(dp: DataPath) -> None:
    east, west = isolated(dp)
    with resolv_conf(east, west.transit_address):
        sidecar, _, _ = await captured_pod(dp, "registry-only")
        agent = dp.agents["east"]

        got = await agent.requests(f"http://{west.transit_address}:{OUTSIDE_PORT}/", count=3)
        assert got.errors == 3, got.summary()
        apps = await dp.agents["west"].apps()
        assert apps["outside"]["hits"] == 0, apps
        assert await counter(sidecar, "listener.127.0.0.1_15001.no_filter_chain_match") >= 3
