"""The web view (/ui) in a real browser: headless Chromium loads it from a running control plane
(in this process, reading two fake member clusters) and the test reads the page's DOM as the
browser built it: both member clusters synced and the service served by both; then east's API
server stops and the page shows east unreachable and then stale (``--max-staleness 1``) while west
stays synced. With the admin API authenticated, the page's files are served to anyone but its data
is not: the page asks for a token. ``UPDATE_SCREENSHOT=1`` also writes docs/images/web-view.png.

Chromium is Debian's (hack/node-packages.sh installs it); the test skips, saying so, without it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_kube_members import endpoint_slice, service

from isthmus.app import ControlPlane
from isthmus.settings import ServeSettings
from kubeapi.kubeconfig import write_kubeconfig
from kubeapi.server import FakeKubeApi

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (hack/node-packages.sh)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rows(HTMLParser):
    """The data-* attributes of every table row, by table id, and the text of #error and #auth."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[dict[str, str]]] = {}
        self.hidden: dict[str, bool] = {}
        self._table = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if "id" in found:
            self.hidden[found["id"]] = "hidden" in found
        if tag == "table":
            self._table = found.get("id", "")
        elif tag == "tr" and self._table:
            data = {k.removeprefix("data-"): v for k, v in found.items() if k.startswith("data-")}
            if data:
                self.tables.setdefault(self._table, []).append(data)


async def chromium(url: str, *extra: str) -> str:
    """The DOM after the page's scripts ran (a virtual-time budget lets its fetches finish)."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="isthmus-chromium-") as profile:
        return await _chromium(CHROMIUM, profile, url, *extra)


async def _chromium(binary: str, profile: str, url: str, *extra: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--headless",
        "--no-sandbox",  # root in a test machine; the page is ours, on loopback
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=4000",
        *extra,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def rows(url: str) -> Rows:
    parsed = Rows()
    parsed.feed(await chromium(url, "--dump-dom"))
    return parsed


async def answered(port: int, path: str) -> dict[str, str]:
    """The headers of the first 200 answer of the admin server to ``path`` (polled for 10 s)."""
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                    if resp.status == 200:
                        return dict(resp.headers)
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"no 200 answer to {path} in 10 s")


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[tuple[ControlPlane, dict[str, FakeKubeApi], int]]:
    apis = {name: FakeKubeApi(bookmark_interval=0.5) for name in ("east", "west")}
    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    for i, (name, api) in enumerate(apis.items()):
        await api.start()
        api.create(service())
        api.create(endpoint_slice(f"web-{name}", [f"127.0.{i + 1}.1"]))
        write_kubeconfig(directory / f"{name}.yaml", api.url, api.token, name)
    port = free_port()
    settings = ServeSettings(
        xds_address="127.0.0.1:0",
        admin_address=f"127.0.0.1:{port}",
        kubeconfig_dir=directory,
        max_staleness=1.0,
        insecure_unauthenticated_xds=True,
        mtls=False,
        ready_timeout=10,
    )
    control = ControlPlane(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(control.run(stop))
    try:
        await answered(port, "/readyz")
        yield control, apis, port
    finally:
        stop.set()
        await asyncio.wait([task], timeout=20)
        for api in apis.values():
            await api.stop()


async def until_page(url: str, check: Any, what: str, attempts: int = 15) -> Rows:
    page = Rows()
    for _ in range(attempts):
        page = await rows(url)
        if check(page):
            return page
        await asyncio.sleep(0.5)
    raise AssertionError(f"{what}: the page shows {page.tables}")


def clusters(page: Rows) -> dict[str, str]:
    return {r["cluster"]: r["state"] for r in page.tables.get("clusters", [])}


async def test_the_web_view_shows_a_member_cluster_go_stale_when_its_api_server_stops(
    plane: tuple[ControlPlane, dict[str, FakeKubeApi], int],
) -> None:
    control, apis, port = plane
    url = f"http://127.0.0.1:{port}/ui"
    page = await until_page(
        url, lambda p: clusters(p) == {"east": "synced", "west": "synced"}, "both clusters synced"
    )
    assert control.members is not None
    assert control.members.status()["west"]["last_sync"]  # when west's API server last answered
    [web] = page.tables["services"]
    assert web == {"service": "shop/web", "served-by": "east,west"}
    assert page.hidden.get("auth") is True  # no admin authentication here: nothing asked

    await apis["east"].stop()
    page = await until_page(url, lambda p: clusters(p).get("east") == "stale", "east to be shown stale")
    assert clusters(page)["west"] == "synced"
    # Stale endpoints are kept (demoted), so the service is still served by both.
    assert page.tables["services"][0]["served-by"] == "east,west"
    if os.environ.get("UPDATE_SCREENSHOT"):
        target = ROOT / "docs" / "images" / "web-view.png"
        target.parent.mkdir(exist_ok=True)
        await chromium(url, f"--screenshot={target}", "--window-size=1280,720", "--hide-scrollbars")


async def test_with_admin_authentication_the_page_asks_for_a_token(tmp_path: Path) -> None:
    tokens = tmp_path / "admin-tokens"
    tokens.write_text("reader-token-0123456789,alice,read\n")
    tokens.chmod(0o600)
    port = free_port()
    settings = ServeSettings(
        xds_address="127.0.0.1:0",
        admin_address=f"127.0.0.1:{port}",
        admin_token_file=tokens,
        mtls=False,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(ControlPlane(settings).run(stop))
    try:
        headers = await answered(port, "/ui")
        assert "Content-Security-Policy" in headers
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/debug/clusters") as resp,
        ):
            assert resp.status == 401  # the data is not the page's to give
        page = await rows(f"http://127.0.0.1:{port}/ui")
        assert page.hidden.get("auth") is False, page.hidden  # the token form is shown
        assert "clusters" not in page.tables
    finally:
        stop.set()
        await asyncio.wait([task], timeout=20)
