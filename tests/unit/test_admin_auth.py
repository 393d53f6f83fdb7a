"""The admin API with --admin-token-file: probes stay open; status needs a token with ``read``,
drains one with ``drain``; 401 and 403 with JSON errors; `isthmus drain --token-file` sends it.
With --admin-kube-auth (identity.admin_kube; the real API server tier has the full test): reviews
decide, outages are 503 and not cached; the file's tokens come first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import yaml

from isthmus import cli
from isthmus.admin.app import DrainActions, Readiness, make_admin_app, start_admin
from isthmus.discovery.kube.kubeconfig import Credentials, KubeconfigError
from isthmus.identity.admin_kube import KubeAdmin
from isthmus.identity.admin_tokens import AdminTokens, FirstKnown

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


@dataclass(frozen=True)
class Who:
    authenticated: bool = True
    username: str = "alice"
    groups: tuple[str, ...] = ("ops",)
    uid: str = "u1"
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    error: str = ""
    unavailable: bool = False


@dataclass(frozen=True)
class May:
    allowed: bool
    reason: str = ""
    unavailable: bool = False


async def test_kube_admin_answers_by_review_and_access_and_caches_all_but_outages() -> None:
    now = [0.0]
    who: list[Who] = [Who(unavailable=True, error="connection refused"), Who(), Who()]
    asked: list[tuple[str, str, str]] = []

    async def review(token: str, audiences: tuple[str, ...]) -> Who:
        return who.pop(0)

    async def access(
        user: str,
        groups: tuple[str, ...],
        uid: str,
        extra: Mapping[str, tuple[str, ...]],
        verb: str,
        path: str,
    ) -> May:
        asked.append((user, verb, path))
        return May(verb == "get", "" if verb == "get" else "no role grants it")

    admin = KubeAdmin(review, access, ttl=10, clock=lambda: now[0])
    assert (await admin.check(None, "read", "/drain"))[0] == 401
    assert (await admin.check("t", "read", "/drain")) == (
        503,
        "the home cluster cannot verify tokens now (connection refused); retry",
    )
    assert await admin.check("t", "read", "/drain") == (200, "alice")  # the outage was not cached
    assert await admin.check("t", "read", "/drain") == (200, "alice")  # cached
    assert asked == [("alice", "get", "/drain")]
    assert await admin.check("t", "drain", "/drain/east") == (
        403,
        "alice may not create /drain/east (no role grants it)",
    )
    now[0] = 11.0
    with pytest.raises(IndexError):  # expired: asked again (and this test gave no more answers)
        await admin.check("t", "read", "/drain")


async def test_file_tokens_first_then_the_home_cluster() -> None:
    async def file_check(token: str | None, right: str, path: str) -> tuple[int, str]:
        return (200, "file") if token == "known" else (401, "unknown")

    async def kube_check(token: str | None, right: str, path: str) -> tuple[int, str]:
        return (403, "kube says no") if token else (401, "none")

    either = FirstKnown(file_check, kube_check)
    assert await either.check("known", "read", "/drain") == (200, "file")
    assert await either.check("other", "read", "/drain") == (403, "kube says no")
    assert (await either.check(None, "read", "/drain"))[0] == 401


def test_the_kubeconfig_users_token_is_read_from_token_or_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    for user, expected in (({"token": "inline"}, "inline"), ({"tokenFile": str(token_file)}, "from-file")):
        document = {
            "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
            "users": [{"name": "u", "user": user}],
        }
        credentials = Credentials.parse("admin", yaml.safe_dump(document), "test")
        assert credentials.bearer_token() == expected
    document["users"] = [{"name": "u", "user": {"client-certificate-data": "x"}}]
    with pytest.raises(KubeconfigError, match="no bearer token"):
        Credentials.parse("admin", yaml.safe_dump(document), "test").bearer_token()
