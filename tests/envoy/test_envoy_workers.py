"""--xds-workers: worker processes serve xDS on the main process's port, fed every mesh view.

Real `isthmus serve --xds-workers 2` (mTLS on) and ADS clients on separate connections, which the
kernel spreads over the two processes: every client gets the mesh and its changes wherever it
landed, certificates from either process chain to the one root, and a worker killed is started
again and serves the current view to the clients that reconnect.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import aiohttp
import grpc
from cryptography import x509
from envoy.service.status.v3 import csds_pb2

from conftest import LOOPBACK, MeshFile, Processes, _eventually
from isthmus.xds import types
from protocol.client import CLIENTS, AdsClient, Reply, make_node

CLIENTS_N = 16  # connections: all on one of two processes by chance 1 in 32,768


async def info(admin_port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"http://{LOOPBACK}:{admin_port}/readyz") as r:
        body: dict[str, Any] = await r.json()
        return body


def web_addresses(reply: Reply) -> set[str]:
    out = set()
    for assignment in reply.resources.values():
        if "web.shop" not in assignment.cluster_name:
            continue
        for group in assignment.endpoints:
            for lb in group.lb_endpoints:
                out.add(lb.endpoint.address.socket_address.address)
    return out


async def connect(port: int, n: int, prefix: str) -> tuple[list[AdsClient], list[grpc.aio.Channel]]:
    clients, channels = [], []
    for i in range(n):
        # A connection each (channels of one process share connections unless told not to).
        channel = grpc.aio.insecure_channel(
            f"{LOOPBACK}:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        channels.append(channel)
        node = make_node(f"{prefix}-{i}", cluster="east", namespace="shop", service="client")
        client = CLIENTS["delta"](channel, node)
        await client.subscribe(types.ENDPOINT)  # wildcard
        await client.subscribe(types.SECRET, ["default", "ROOTCA"])
        clients.append(client)
    return clients, channels


async def pump(client: AdsClient) -> None:
    """ACK whatever comes, as an Envoy does."""
    while True:
        try:
            await client.recv_ack(5)
        except TimeoutError:
            continue


async def latest(client: AdsClient, type_url: str, want: Any, within: float = 15.0) -> Reply:
    """ACK responses until one of ``type_url`` satisfies ``want``."""
    async with asyncio.timeout(within):
        while True:
            reply = await client.recv_ack(within)
            if reply.type_url == type_url and want(reply):
                return reply


async def test_workers_serve_the_mesh_its_changes_and_one_root(procs: Processes, mesh: MeshFile) -> None:
    mesh.add_member("west", "us-west1", "us-west1-a")
    west = mesh.endpoint(("127.0.0.31", 8080), member="west")
    mesh.write(mesh.service("web", ("127.0.0.11", 8080), west), mesh.service("client", ("127.0.0.20", 8080)))
    cp = await procs.control_plane(mesh.path, ["--xds-workers", "2", "--drain-step", "0.2"])
    clients, channels = await connect(cp.xds_port, CLIENTS_N, "c")
    try:
        roots, issuers = set(), set()
        for client in clients:
            await latest(client, types.ENDPOINT, lambda r: "127.0.0.11" in web_addresses(r))
            secrets = await latest(client, types.SECRET, lambda r: "default" in r.resources)
            pem = secrets.resources["default"].tls_certificate.certificate_chain.inline_string
            issuers.add(x509.load_pem_x509_certificate(pem.encode()).issuer.rfc4514_string())
            if "ROOTCA" in secrets.resources:
                roots.add(secrets.resources["ROOTCA"].validation_context.trusted_ca.inline_string)

        async def counted() -> list[dict[str, Any]]:  # workers report a few times a second
            state = await info(cp.admin_port)
            found: list[dict[str, Any]] = state["xds"]["workers"]["processes"]
            assert sum(p["streams"] for p in found) == CLIENTS_N == state["proxies"], found
            return found

        processes = await _eventually(counted, what="every stream counted", within=5)
        assert len(processes) == 2
        assert all(p["streams"] > 0 for p in processes), f"the kernel spread the connections: {processes}"
        assert len(issuers) == 1, "every process issues certificates under the one root"
        assert len(roots) <= 1

        # The per-proxy pages show every process's proxies: syncz, config dumps, and CSDS from a
        # connection to either process.
        names = {f"c-{i}" for i in range(CLIENTS_N)}
        async with aiohttp.ClientSession() as session:
            base = f"http://{LOOPBACK}:{cp.admin_port}"

            async def synced() -> list[dict[str, Any]]:  # syncz is built at most once a second
                async with session.get(f"{base}/debug/syncz") as reply:
                    rows: list[dict[str, Any]] = await reply.json()
                assert {row["proxy"] for row in rows} == names, rows
                return rows

            rows = await _eventually(synced, what="syncz lists every process's proxies", within=5)
            by_process = {row["process"]: row["proxy"] for row in rows}
            assert set(by_process) == {p["pid"] for p in processes}, (by_process, processes)
            for name in by_process.values():  # one proxy of each process
                await asyncio.sleep(0.5)  # config dumps are rate limited (2/s)
                async with session.get(f"{base}/debug/config_dump", params={"proxy": name}) as reply:
                    assert reply.status == 200, (name, await reply.text())
                    dump = await reply.json()
                assert dump["streams"], dump
                assert "EDS" in dump["streams"][0]["types"], dump
        for i in range(10):  # connections: some reach the worker, which asks the main process
            channel = grpc.aio.insecure_channel(
                f"{LOOPBACK}:{cp.xds_port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            channels.append(channel)
            fetch = channel.unary_unary(
                "/envoy.service.status.v3.ClientStatusDiscoveryService/FetchClientStatus",
                request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
                response_deserializer=csds_pb2.ClientStatusResponse.FromString,
            )
            answer = await fetch(csds_pb2.ClientStatusRequest(exclude_resource_contents=True), timeout=10)
            assert {c.node.id for c in answer.config} == names, (i, [c.node.id for c in answer.config])

        # A change reaches every client, wherever it is served.
        mesh.write(
            mesh.service("web", ("127.0.0.12", 8080), west), mesh.service("client", ("127.0.0.20", 8080))
        )
        for client in clients:
            await latest(client, types.ENDPOINT, lambda r: "127.0.0.12" in web_addresses(r))

        # A drain waits for the proxies of every process: none ACKs yet, so all of them lag.
        async with aiohttp.ClientSession() as session:
            url = f"http://{LOOPBACK}:{cp.admin_port}"
            async with session.post(f"{url}/drain/east") as reply:
                assert reply.status in (200, 202), await reply.text()

            async def waiting() -> None:
                async with session.get(f"{url}/drain") as reply:
                    progress = (await reply.json())["east"]
                names = {n for n in progress["waiting_for"] if not n.startswith("(")}
                assert names == {f"c-{i}" for i in range(CLIENTS_N)}, progress

            await _eventually(waiting, what="the drain waits for every client", within=5)
            pumps = [asyncio.create_task(pump(c)) for c in clients]

            async def done() -> None:
                async with session.get(f"{url}/drain") as reply:
                    progress = (await reply.json())["east"]
                assert progress["state"] == "done", progress
                assert progress["timed_out"] == [], progress

            await _eventually(done, what="the drain is done", within=20)
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

        # A worker killed is started again, with the current view.
        worker_pid = processes[1]["pid"]
        os.kill(worker_pid, signal.SIGKILL)

        async def restarted() -> list[dict[str, Any]]:
            found = (await info(cp.admin_port))["xds"]["workers"]
            assert found["ready"], found
            assert found["processes"][1]["pid"] not in (None, worker_pid), found
            return list(found["processes"])

        await _eventually(restarted, what="the killed worker is started again")
        mesh.write(
            mesh.service("web", ("127.0.0.13", 8080), west), mesh.service("client", ("127.0.0.20", 8080))
        )
        again, more = await connect(cp.xds_port, CLIENTS_N, "d")
        channels += more
        clients += again
        for client in again:
            await latest(client, types.ENDPOINT, lambda r: "127.0.0.13" in web_addresses(r))

        async def served_by_the_new_worker() -> None:  # as its next Summary says
            found = (await info(cp.admin_port))["xds"]["workers"]["processes"]
            assert found[1]["streams"] > 0, found

        await _eventually(served_by_the_new_worker, what="the new worker counts its streams", within=5)
    finally:
        for client in clients:
            await client.close()
        for channel in channels:
            await channel.close()
