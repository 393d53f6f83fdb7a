"""xDS over TLS with real Envoys: the serving certificate comes from the mesh CA for the names given
with --xds-san and is renewed without a restart and without cutting the open stream; Envoy verifies
it against the mesh root (`isthmus bootstrap --xds-root-ca`) and the expected name, and an Envoy that
trusts another root, expects another name, or speaks plain text gets nothing."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from conftest import LOOPBACK
from isthmus.xds.ca import CERT_FILE, MeshCA

pytestmark = pytest.mark.envoy


def serving_serial(port: int, root: Path) -> int:
    """The serial number of the certificate the xDS port presents to a new TLS handshake."""
    context = ssl.create_default_context(cafile=str(root))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((LOOPBACK, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


async def test_envoy_over_tls_follows_a_renewed_serving_certificate(
    procs, mesh, upstreams, eventually, holds, tmp_path
) -> None:
    web = await upstreams.start("web-1", "127.0.0.1")
    mesh.write(mesh.service("web", web, port=80))
    ca_dir = tmp_path / "ca"
    # --cert-ttl 10: the serving certificate is renewed every 5 s (half its lifetime).
    tls_args = ["--xds-san", "localhost", "--ca-dir", str(ca_dir), "--cert-ttl", "10"]
    cp = await procs.control_plane(mesh.path, tls_args)
    root = ca_dir / CERT_FILE
    tls = ["--xds-root-ca", str(root), "--xds-server-name", "localhost"]
    envoy = await procs.envoy(procs.bootstrap(xds_port=cp.xds_port, delta=True, extra=tls))
    cluster = mesh.cluster("web", 80)

    async def applied(proxy) -> None:  # type: ignore[no-untyped-def]
        hosts = await proxy.admin.cluster_hosts()
        assert set(hosts.get(cluster, {})) == {web.address}, hosts

    await eventually(lambda: applied(envoy), what="the config arrived over TLS")
    first = await asyncio.to_thread(serving_serial, cp.xds_port, root)

    async def one_connection() -> None:
        stats = await envoy.admin.stats(
            r"^cluster\.isthmus_xds\.upstream_cx_total$|^control_plane\.connected_state$"
        )
        assert stats == {"cluster.isthmus_xds.upstream_cx_total": 1, "control_plane.connected_state": 1}, (
            stats
        )

    async def renewed() -> None:
        assert await asyncio.to_thread(serving_serial, cp.xds_port, root) != first

    # The certificate is renewed while the Envoy's one stream stays up; a new Envoy gets the new one.
    await eventually(renewed, what="a new handshake gets a renewed certificate", within=20)
    await holds(one_connection, what="the first Envoy's one xDS connection", duration=1)
    later = await procs.envoy(procs.bootstrap(xds_port=cp.xds_port, delta=False, extra=tls, service="later"))
    await eventually(lambda: applied(later), what="a new Envoy gets the config over the renewed certificate")


async def test_envoys_that_cannot_verify_the_control_plane_get_nothing(
    procs, mesh, upstreams, holds, tmp_path
) -> None:
    web = await upstreams.start("web-1", "127.0.0.1")
    mesh.write(mesh.service("web", web, port=80))
    cp = await procs.control_plane(mesh.path, ["--xds-san", "localhost", "--ca-dir", str(tmp_path / "ca")])
    other_root = tmp_path / "other-root.pem"
    cert, _ = MeshCA.generate_root("elsewhere.local")
    from cryptography.hazmat.primitives import serialization

    other_root.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    root = tmp_path / "ca" / CERT_FILE
    cases = {
        "another root": ["--xds-root-ca", str(other_root), "--xds-server-name", "localhost"],
        "another name": ["--xds-root-ca", str(root), "--xds-server-name", "isthmus.example"],
        "plain text": [],
    }
    envoys = {}
    for i, (what, extra) in enumerate(cases.items()):
        envoys[what] = await procs.envoy(
            procs.bootstrap(xds_port=cp.xds_port, delta=True, extra=extra, service=f"s{i}")
        )

    # control_plane.connected_state is no witness: Envoy sets it when it opens the stream, before the
    # server has answered (a plain-text Envoy shows 1 until the TLS port drops its connection). What
    # must hold is that no update was ever accepted and no cluster arrived.
    updates = r"^cluster_manager\.cds\.update_success$|^listener_manager\.lds\.update_success$"

    async def none_connected() -> None:
        for what, proxy in envoys.items():
            stats = await proxy.admin.stats(updates)
            assert stats == {
                "cluster_manager.cds.update_success": 0,
                "listener_manager.lds.update_success": 0,
            }, (what, stats)
            assert await proxy.admin.active_clusters() == {}, what

    await holds(none_connected, what="no Envoy that cannot verify the control plane is served", duration=3)
