"""The admin API with --admin-token-file: probes stay open; status needs a token with ``read``,
drains one with ``drain``; 401 and 403 with JSON errors; `isthmus drain --token-file` sends it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from isthmus import cli
from isthmus.admin.app import DrainActions, Readiness, make_admin_app, start_admin
from isthmus.identity.admin_tokens import AdminTokens

READER, OPERATOR = "reader-token-123", "operator-token-456"


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[tuple[str, list[tuple[str, bool]]]]:
    tokens = tmp_path / "admin-tokens.csv"
    tokens.write_text(f"# token,name,rights\n{READER},alice,read\n{OPERATOR},bob,drain\n")
    started: list[tuple[str, bool]] = []

    def start(cluster: str, drain: bool) -> dict[str, object]:
        if cluster != "east":
            raise KeyError(cluster)
        started.append((cluster, drain))
        return {"state": "done", "weight": 0 if drain else 100}

    app = make_admin_app(
        lambda: Readiness(True, "serving"),
        lambda: {},
        DrainActions(start, lambda: {"east": {"state": "done", "weight": 0}}),
        AdminTokens(tokens).check,
    )
    runner = await start_admin(app, "127.0.0.1", 0)
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", started
    await runner.cleanup()


async def call(
    base: str, method: str, path: str, token: str | None = None
) -> tuple[int, dict[str, object], str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, base + path, headers=headers) as resp,
    ):
        return resp.status, await resp.json(), resp.headers.get("WWW-Authenticate", "")


async def test_probes_are_open_and_the_rest_needs_the_right_token(
    admin: tuple[str, list[tuple[str, bool]]],
) -> None:
    base, started = admin
    assert (await call(base, "GET", "/healthz"))[0] == 200
    assert (await call(base, "GET", "/readyz"))[0] == 200
    status, body, challenge = await call(base, "GET", "/drain")
    assert (status, challenge) == (401, "Bearer")
    assert "bearer token" in str(body["error"])
    assert (await call(base, "GET", "/drain", "not-a-token"))[0] == 401
    assert (await call(base, "GET", "/drain", READER))[0] == 200
    status, body, _ = await call(base, "POST", "/drain/east", READER)
    assert (status, body) == (403, {"error": "alice may not drain"})
    assert started == []
    assert (await call(base, "POST", "/drain/east", OPERATOR))[0] == 202
    assert (await call(base, "POST", "/drain/nowhere", OPERATOR))[0] == 404
    assert started == [("east", True)]


async def test_isthmus_drain_sends_the_token_of_its_file(
    admin: tuple[str, list[tuple[str, bool]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, started = admin
    address = base.removeprefix("http://")
    token = tmp_path / "token"
    token.write_text(OPERATOR + "\n")
    argv = ["drain", "east", "--undo", "--admin-address", address, "--token-file", str(token)]
    assert await asyncio.to_thread(cli.main, argv) == 0
    assert started == [("east", False)]
    assert await asyncio.to_thread(cli.main, ["drain", "east", "--admin-address", address]) == 1
    assert "bearer token" in capsys.readouterr().err
