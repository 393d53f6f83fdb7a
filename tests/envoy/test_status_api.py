"""The status API against a real Envoy (issue 15): what isthmus says a proxy has is what the proxy
says it has.

* ``/debug/syncz``: the Envoy is listed with its cluster, role and mode, every type SYNCED, and the
  versions are Envoy's own: in SotW the version Envoy's config_dump reports for its clusters and
  listeners is the one isthmus sent and saw ACKed; in Delta each cluster's resource version is.
* ``/debug/config_dump?proxy=ID``: the same resource names as Envoy's config_dump, each decoded;
  secrets' private keys redacted (no PEM key anywhere in the page); 400 without a proxy or for a
  huge id, 404 for one that is not connected, and a request line too long for the server is
  refused with a 4xx while the server keeps serving.
* CSDS on the xDS port (FetchClientStatus and StreamClientStatus): the Envoy's resources, SYNCED
  and ACKED, with contents but for secrets; node matchers select; a bad regex is INVALID_ARGUMENT.
* ``isthmus status``, ``isthmus status ID``, ``isthmus clusters`` (tables and ``-o json``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.service.status.v3 import csds_pb2
from envoy.type.matcher.v3 import node_pb2, regex_pb2, string_pb2

from isthmus.xds import types

pytestmark = pytest.mark.envoy

CSDS = "/envoy.service.status.v3.ClientStatusDiscoveryService/"


async def admin_get(port: int, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


def isthmus(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isthmus.cli", *argv], capture_output=True, text=True, timeout=60, check=False
    )


async def test_status_pages_and_csds_say_what_envoy_has(delta, procs, mesh, upstreams, eventually) -> None:
    web1 = await upstreams.start("web-1")
    mesh.write(mesh.service("web", web1))
    cp = await procs.control_plane(mesh.path)
    boot = procs.bootstrap(xds_port=cp.xds_port, delta=delta)
    envoy = await procs.envoy(boot)

    async def serving() -> None:
        reply = await envoy.request("web.shop:80")
        assert (reply.status, reply.upstream) == (200, "web-1"), reply

    await eventually(serving, what="web-1 answers through Envoy")

    async def synced() -> dict[str, Any]:
        status, body = await admin_get(cp.admin_port, "/debug/syncz")
        assert status == 200, body
        [entry] = [p for p in body if p["proxy"] == boot.node_id]
        states = {name: t["state"] for name, t in entry["types"].items()}
        assert set(states) >= {"CDS", "LDS", "EDS", "SDS"}, states
        assert set(states.values()) == {"SYNCED"}, states
        return dict(entry)

    entry = await eventually(synced, what="syncz says every type is SYNCED")
    assert (entry["cluster"], entry["role"], entry["mode"]) == (
        "east",
        "sidecar",
        "delta" if delta else "sotw",
    )

    # The versions are Envoy's own.
    status, dump = await admin_get(cp.admin_port, f"/debug/config_dump?proxy={boot.node_id}")
    assert status == 200, dump
    [stream] = dump["streams"]
    ours = {item["name"]: item for item in stream["types"]["CDS"]}
    theirs = await envoy.admin.active_clusters()
    assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
    if delta:
        assert {n: c["version_info"] for n, c in theirs.items()} == {n: i["version"] for n, i in ours.items()}
    else:
        assert {c["version_info"] for c in theirs.values()} == {entry["types"]["CDS"]["acked"]}
        listeners = await envoy.admin.listeners()
        versions = {entry_["active_state"]["version_info"] for entry_ in listeners.values()}
        assert versions == {entry["types"]["LDS"]["acked"]}, versions
    for item in ours.values():
        assert item["resource"]["@type"] == types.CLUSTER
        assert item["resource"]["name"] == item["name"]
    # Secrets: named and versioned, never their keys.
    secrets = stream["types"]["SDS"]
    assert secrets, stream["types"].keys()
    assert any(
        s["resource"]["tlsCertificate"]["privateKey"] == "[redacted]"
        for s in secrets
        if s["resource"] and "tlsCertificate" in s["resource"]
    ), secrets
    assert "PRIVATE KEY" not in json.dumps(dump)

    # Bad input: clear 4xx, nothing else changes.
    assert (await admin_get(cp.admin_port, "/debug/config_dump"))[0] == 400
    assert (await admin_get(cp.admin_port, "/debug/config_dump?proxy=" + "x" * 2000))[0] == 400
    assert (await admin_get(cp.admin_port, "/debug/config_dump?proxy=nobody"))[0] == 404
    burst = [
        (await admin_get(cp.admin_port, f"/debug/config_dump?proxy={boot.node_id}"))[0] for _ in range(10)
    ]
    assert 429 in burst, burst  # past two dumps a second (a burst of four)
    assert set(burst) == {200, 429}, burst
    huge, _ = await admin_get(cp.admin_port, "/debug/syncz?" + "a=1&" * 5000)
    assert 400 <= huge < 500, huge
    await serving()

    # CSDS, unary and streaming, on the xDS port.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}") as channel:
        fetch = channel.unary_unary(
            CSDS + "FetchClientStatus",
            request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
            response_deserializer=csds_pb2.ClientStatusResponse.FromString,
        )
        answer = await fetch(csds_pb2.ClientStatusRequest(), timeout=10)
        [config] = [c for c in answer.config if c.node.id == boot.node_id]
        by_type: dict[str, dict[str, Any]] = {}
        for generic in config.generic_xds_configs:
            by_type.setdefault(generic.type_url, {})[generic.name] = generic
        assert set(by_type[types.CLUSTER]) == set(theirs)
        for generic in by_type[types.CLUSTER].values():
            assert generic.config_status == csds_pb2.SYNCED
            assert generic.xds_config.type_url == types.CLUSTER
            assert generic.version_info == ours[generic.name]["version"]
        assert all(not g.HasField("xds_config") for g in by_type[types.SECRET].values())
        exact = node_pb2.NodeMatcher(node_id=string_pb2.StringMatcher(exact="someone-else"))
        assert not (await fetch(csds_pb2.ClientStatusRequest(node_matchers=[exact]), timeout=10)).config
        prefix = node_pb2.NodeMatcher(node_id=string_pb2.StringMatcher(prefix=boot.node_id[:8]))
        assert (
            len((await fetch(csds_pb2.ClientStatusRequest(node_matchers=[prefix]), timeout=10)).config) == 1
        )
        bad = node_pb2.NodeMatcher(
            node_id=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex="(unclosed"))
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await fetch(csds_pb2.ClientStatusRequest(node_matchers=[bad]), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stream_call = channel.stream_stream(
            CSDS + "StreamClientStatus",
            request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
            response_deserializer=csds_pb2.ClientStatusResponse.FromString,
        )
        call = stream_call()
        await call.write(csds_pb2.ClientStatusRequest(exclude_resource_contents=True))
        streamed = await call.read()
        [config] = [c for c in streamed.config if c.node.id == boot.node_id]
        assert config.generic_xds_configs
        assert all(not g.HasField("xds_config") for g in config.generic_xds_configs)
        await call.done_writing()
    await serving()

    # The command line.
    admin = ("--admin-address", f"127.0.0.1:{cp.admin_port}")
    table = isthmus("status", *admin)
    assert table.returncode == 0, table.stderr
    [line] = [row for row in table.stdout.splitlines() if row.startswith(boot.node_id)]
    assert line.split()[1:4] == ["east", "sidecar", "delta" if delta else "sotw"], line
    assert line.split()[4:7] == ["SYNCED", "SYNCED", "SYNCED"], line  # CDS LDS EDS
    detail = isthmus("status", boot.node_id, *admin)
    assert detail.returncode == 0, detail.stderr
    rows = {row.split()[0]: row.split() for row in detail.stdout.splitlines()[1:] if row.strip()}
    assert rows["CDS"][1] == "SYNCED", detail.stdout
    assert int(rows["CDS"][4]) == len(theirs), detail.stdout  # resources held
    as_json = json.loads(isthmus("status", boot.node_id, "-o", "json", *admin).stdout)
    assert as_json["config_dump"]["proxy"] == boot.node_id
    clusters = isthmus("clusters", *admin)
    assert clusters.returncode == 0, clusters.stderr
    assert any(row.split()[:2] == ["east", "static"] for row in clusters.stdout.splitlines()), clusters.stdout
    unknown = isthmus("status", "nobody", *admin)
    assert unknown.returncode == 1
    assert "no connected proxy" in unknown.stderr


async def test_status_pages_and_csds_need_the_admin_apis_read_right(procs, mesh, tmp_path) -> None:
    tokens = tmp_path / "admin-tokens"
    tokens.write_text("reader-token-0123456789,alice,read\n")
    tokens.chmod(0o600)
    mesh.write()
    cp = await procs.control_plane(mesh.path, ["--admin-token-file", str(tokens)])
    status, body = await admin_get(cp.admin_port, "/debug/syncz")
    assert status == 401, body
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}") as channel:
        fetch = channel.unary_unary(
            CSDS + "FetchClientStatus",
            request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
            response_deserializer=csds_pb2.ClientStatusResponse.FromString,
        )
        for metadata, code in (
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Bearer wrong-token"),), grpc.StatusCode.UNAUTHENTICATED),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await fetch(csds_pb2.ClientStatusRequest(), metadata=metadata, timeout=10)
            assert refused.value.code() == code, refused.value
        allowed = await fetch(
            csds_pb2.ClientStatusRequest(),
            metadata=(("authorization", "Bearer reader-token-0123456789"),),
            timeout=10,
        )
        assert list(allowed.config) == []  # no proxy connected: an answer, empty
    assert "reader-token-0123456789" not in cp.log_text()
