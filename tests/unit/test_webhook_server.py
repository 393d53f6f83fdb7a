"""`isthmus serve --webhook-address`: the admission webhook over HTTPS with a mesh-CA certificate
for --webhook-san, verified against the mesh root, injecting pods of known member clusters, and
renewing its certificate without a restart (new handshakes get the new one)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from isthmus.app import ControlPlane
from isthmus.settings import ServeSettings, SettingsError
from isthmus.xds.ca import CERT_FILE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def webhook(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    port = free_port()
    settings = ServeSettings(
        xds_address=f"127.0.0.1:{free_port()}",
        admin_address=f"127.0.0.1:{free_port()}",
        xds_sans=("isthmus.isthmus-system.svc",),
        ca_dir=tmp_path / "ca",
        cert_ttl=10,  # renewed every 5 s
        webhook_address=f"127.0.0.1:{port}",
        webhook_sans=("localhost",),
    )
    plane = ControlPlane(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(plane.run(stop))
    try:
        await asyncio.wait_for(plane.started.wait(), 10)
        yield f"https://localhost:{port}", tmp_path / "ca" / CERT_FILE
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)


def serial(port: int, root: Path) -> int:
    context = ssl.create_default_context(cafile=str(root))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


async def test_the_webhook_injects_over_verified_https_and_renews_its_certificate(
    webhook: tuple[str, Path],
) -> None:
    base, root = webhook
    context = ssl.create_default_context(cafile=str(root))
    pod = {"metadata": {"name": "web-1"}, "spec": {"containers": [{"name": "app", "image": "x"}]}}
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {"uid": "1", "kind": {"kind": "Pod"}, "namespace": "shop", "object": pod},
    }
    async with aiohttp.ClientSession() as session:
        # The built-in example mesh has member cluster east.
        async with session.post(f"{base}/inject/east", json=review, ssl=context) as resp:
            assert resp.status == 200
            answer = (await resp.json())["response"]
        async with session.post(f"{base}/inject/nowhere", json=review, ssl=context) as resp:
            assert resp.status == 404
        async with session.post(f"{base}/inject/east", data=b"{not json", ssl=context) as resp:
            assert resp.status == 400
    assert answer["allowed"] is True
    ops = json.loads(base64.b64decode(answer["patch"]))
    proxy = next(op["value"] for op in ops if op["path"] == "/spec/initContainers")[1]
    bootstrap = json.loads(proxy["args"][1])
    xds = bootstrap["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert xds["endpoint"]["address"]["socket_address"]["address"] == "isthmus.isthmus-system.svc"
    port = int(base.rsplit(":", 1)[1])
    first = await asyncio.to_thread(serial, port, root)
    for _ in range(100):  # renewed at half of 10 s, refreshed every 2.5 s
        await asyncio.sleep(0.2)
        if await asyncio.to_thread(serial, port, root) != first:
            break
    else:
        pytest.fail("the webhook's certificate was not renewed within 20 s")


def test_the_webhook_needs_its_names_and_tls_for_sidecars() -> None:
    with pytest.raises(SettingsError, match="--webhook-san"):
        ServeSettings(webhook_address="127.0.0.1:9443", xds_sans=("x",))
    with pytest.raises(SettingsError, match="--xds-san"):
        ServeSettings(webhook_address="127.0.0.1:9443", webhook_sans=("x",))
