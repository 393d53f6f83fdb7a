"""Proxy authentication with real Envoys (`--xds-token-file` on the server, `isthmus bootstrap
--token-file` on the proxy, xDS over TLS): Envoy's gRPC client sends the token read from a file,
the server admits the stream only if the token is known and the Node claims the identity the token
proves; a refused Envoy receives nothing. A token rewritten in the file is what the next stream
uses, while the open stream is kept and traffic flows with no failed request."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from isthmus.xds.ca import CERT_FILE

pytestmark = pytest.mark.envoy

GOOD, OTHER, NEXT = "tok-good-0123456789", "tok-other-0123456789", "tok-next-0123456789"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


async def test_only_envoys_whose_token_proves_their_node_are_served(
    procs, mesh, upstreams, eventually, holds, tmp_path
) -> None:
    web = await upstreams.start("web-1", "127.0.0.1")
    mesh.write(mesh.service("web", web, port=80))
    # The test proxies run as shop/default in member cluster east (procs.bootstrap's node).
    tokens = write(
        tmp_path / "tokens.csv",
        f"# token,namespace,service-account[,cluster]\n{GOOD},shop,default,east\n{OTHER},shop,other\n",
    )
    ca_dir = tmp_path / "ca"
    cp = await procs.control_plane(
        mesh.path, ["--xds-san", "localhost", "--ca-dir", str(ca_dir), "--xds-token-file", str(tokens)]
    )
    tls = ["--xds-root-ca", str(ca_dir / CERT_FILE), "--xds-server-name", "localhost"]

    def token_file(name: str, token: str) -> list[str]:
        # No newline: Envoy sends the file as it is, and a newline is not allowed in a header value
        # (a projected service-account token has none).
        return ["--token-file", str(write(tmp_path / f"{name}.token", token))]

    good = await procs.envoy(
        procs.bootstrap(xds_port=cp.xds_port, delta=True, extra=[*tls, *token_file("good", GOOD)])
    )
    refused = {
        "no token": await procs.envoy(
            procs.bootstrap(xds_port=cp.xds_port, delta=True, extra=tls, service="a")
        ),
        "unknown token": await procs.envoy(
            procs.bootstrap(
                xds_port=cp.xds_port, delta=True, extra=[*tls, *token_file("bad", "garbage")], service="b"
            )
        ),
        "token of another service account": await procs.envoy(
            procs.bootstrap(
                xds_port=cp.xds_port, delta=True, extra=[*tls, *token_file("other", OTHER)], service="c"
            )
        ),
    }
    cluster = mesh.cluster("web", 80)

    async def applied() -> None:
        hosts = await good.admin.cluster_hosts()
        assert set(hosts.get(cluster, {})) == {web.address}, hosts

    await eventually(applied, what="the authenticated Envoy gets its config")

    async def nothing_for_the_others() -> None:
        for what, proxy in refused.items():
            assert await proxy.admin.active_clusters() == {}, what
            assert await proxy.admin.config_dump("dynamic_listeners") == [], what

    await holds(nothing_for_the_others, what="refused Envoys get nothing", duration=3)
    log = cp.log_path.read_text()
    assert "no credentials" in log
    assert "the token is not valid" in log
    assert "claims service account 'default' (credentials: 'other')" in log  # the mismatch is named
    assert GOOD not in log  # tokens are never logged
    assert OTHER not in log
    counted = (await cp.readyz())["xds"]["refused_streams"]
    assert set(counted) == {"no-credentials", "bad-token", "node-mismatch"}, counted

    # Rotation under steady traffic. The server learns the next token, the Envoy's file is rewritten
    # with it: the open stream is kept (a stream is authenticated once, when it opens) and still
    # receives changes; the old token is then revoked, which the open stream does not notice either;
    # after a control plane restart the Envoy's next stream authenticates with what its file says.
    failures: list[str] = []
    sent = 0

    async def steady() -> None:
        nonlocal sent
        while True:
            try:
                reply = await good.request("web.shop:80")
                if reply.status != 200:
                    failures.append(f"HTTP {reply.status}")
            except Exception as exc:
                failures.append(repr(exc))
            sent += 1
            await asyncio.sleep(0.05)

    traffic = asyncio.create_task(steady())

    def streams_of_the_good_envoy() -> int:  # the google_grpc client has no Envoy cluster stats
        return cp.log_path.read_text().count(f"proxy {good.bootstrap.node_id} connected")

    try:
        write(tokens, f"{GOOD},shop,default,east\n{NEXT},shop,default,east\n")
        write(tmp_path / "good.token", NEXT)
        web2 = await upstreams.start("web-2", "127.0.0.2")
        mesh.write(mesh.service("web", web, web2, port=80))

        async def both() -> None:
            hosts = await good.admin.cluster_hosts()
            assert set(hosts.get(cluster, {})) == {web.address, web2.address}, hosts

        await eventually(both, what="a change reaches the Envoy on its first stream")
        write(tokens, f"{NEXT},shop,default,east\n")  # the old token revoked
        web3 = await upstreams.start("web-3", "127.0.0.3")
        mesh.write(mesh.service("web", web, web2, web3, port=80))

        async def three() -> None:
            hosts = await good.admin.cluster_hosts()
            assert set(hosts.get(cluster, {})) == {web.address, web2.address, web3.address}, hosts

        await eventually(three, what="the open stream outlives its token's revocation")
        assert streams_of_the_good_envoy() == 1
        cp.kill()
        mesh.write(mesh.service("web", web, port=80))
        cp.start()
        await cp.wait_ready()
        await eventually(applied, what="the next stream, with the rotated token, is served", within=30)
        assert streams_of_the_good_envoy() == 2
    finally:
        traffic.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await traffic
    assert sent > 20, sent
    assert failures == [], failures[:5]
