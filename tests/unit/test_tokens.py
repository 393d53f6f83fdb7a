"""Proxy authentication by token (identity.tokens): the credentials file, and the check that a
proxy's Node claims the identity its token proves. No token, a malformed or unknown one:
UNAUTHENTICATED; the right token with the wrong claims: PERMISSION_DENIED naming the mismatch."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from isthmus.discovery.model import Locality
from isthmus.identity.kube_tokens import FirstOf, KubeTokens
from isthmus.identity.tokens import StaticTokens, bearer
from isthmus.xds.proxy import Proxy, Role
from isthmus.xds.server.auth import AuthFailure

TOKEN = "t0k3n-east-web"


@dataclass(frozen=True)
class Answer:
    """A TokenReview's answer, as identity.kube_tokens reads it."""

    authenticated: bool = True
    username: str = "system:serviceaccount:shop:web"
    error: str = ""
    unavailable: bool = False
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def proxy(namespace: str = "shop", account: str = "web", cluster: str = "east") -> Proxy:
    return Proxy(
        f"sidecar~web.{namespace}~{cluster}",
        Role.SIDECAR,
        namespace,
        "web",
        account,
        Locality("r", "z", cluster),
    )


@pytest.fixture
def tokens(tmp_path: Path) -> StaticTokens:
    path = tmp_path / "tokens.csv"
    path.write_text(f"# comment\n{TOKEN},shop,web,east\nany-cluster,shop,api\nbroken line\n,shop,web\n")
    return StaticTokens(path, check_every=0)


async def admit(tokens: StaticTokens, metadata: dict[str, str], target: Proxy) -> None:
    authorize = await tokens(metadata)
    authorize(target)


async def refused(tokens: StaticTokens, metadata: dict[str, str], target: Proxy | None = None) -> AuthFailure:
    with pytest.raises(AuthFailure) as failure:
        await admit(tokens, metadata, target or proxy())
    return failure.value


async def test_a_token_admits_the_node_it_proves(tokens: StaticTokens) -> None:
    authorize = await tokens({"authorization": f"Bearer {TOKEN}", "isthmus-cluster": "east"})
    assert authorize(proxy()) is None  # admitted: the check returns, it does not raise
    with pytest.raises(AuthFailure):  # the same check refuses a node claiming more
        authorize(proxy(account="admin"))


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ({}, "no-credentials"),
        ({"authorization": f"Basic {TOKEN}"}, "malformed"),
        ({"authorization": "Bearer "}, "malformed"),
        ({"authorization": "Bearer nope"}, "bad-token"),
        ({"authorization": f"Bearer {TOKEN}x"}, "bad-token"),
    ],
)
async def test_without_a_known_token_the_stream_is_unauthenticated(
    tokens: StaticTokens, metadata: dict[str, str], reason: str
) -> None:
    failure = await refused(tokens, metadata)
    assert (failure.code, failure.reason) == (grpc.StatusCode.UNAUTHENTICATED, reason)
    assert TOKEN not in failure.details


@pytest.mark.parametrize(
    ("metadata", "node", "named"),
    [
        ({"isthmus-cluster": "east"}, proxy(account="admin"), "service account 'admin' (credentials: 'web')"),
        ({"isthmus-cluster": "east"}, proxy(namespace="bank"), "namespace 'bank' (credentials: 'shop')"),
        ({"isthmus-cluster": "west"}, proxy(), "for member cluster 'east', presented as 'west'"),
        ({"isthmus-cluster": "east"}, proxy(cluster="west"), "member cluster 'west' (credentials: 'east')"),
    ],
)
async def test_claims_other_than_the_tokens_are_denied(
    tokens: StaticTokens, metadata: dict[str, str], node: Proxy, named: str
) -> None:
    failure = await refused(tokens, {"authorization": f"Bearer {TOKEN}", **metadata}, node)
    assert failure.code is grpc.StatusCode.PERMISSION_DENIED
    assert named in failure.details


async def test_a_token_without_a_cluster_binds_the_cluster_header(tokens: StaticTokens) -> None:
    authorize = await tokens({"authorization": "Bearer any-cluster", "isthmus-cluster": "west"})
    authorize(proxy(account="api", cluster="west"))
    with pytest.raises(AuthFailure, match="member cluster 'east'"):
        authorize(proxy(account="api", cluster="east"))


async def test_the_file_is_reread_when_it_changes_and_bad_lines_are_reported(
    tokens: StaticTokens, tmp_path: Path
) -> None:
    assert len(tokens.errors) == 2  # "broken line" and the line without a token
    (tmp_path / "tokens.csv").write_text("rotated-token-value,shop,web,east\n")
    assert (await refused(tokens, {"authorization": f"Bearer {TOKEN}"})).reason == "bad-token"
    await tokens({"authorization": "Bearer rotated-token-value"})
    (tmp_path / "tokens.csv").unlink()  # fail closed
    assert (await refused(tokens, {"authorization": "Bearer rotated-token-value"})).reason == "bad-token"


def test_bearer_takes_the_token_after_the_scheme() -> None:
    assert bearer({"authorization": "bearer  abc "}) == "abc"


async def test_tokens_of_the_file_come_first_and_others_go_to_review(tokens: StaticTokens) -> None:
    asked: list[str] = []

    async def review(cluster: str, token: str, audiences: tuple[str, ...]) -> Answer:
        asked.append(token)
        return Answer(username="system:serviceaccount:shop:api")

    chain = FirstOf(tokens, KubeTokens(review))
    (await chain({"authorization": f"Bearer {TOKEN}", "isthmus-cluster": "east"}))(proxy())
    assert asked == []  # the file's token: no review
    (await chain({"authorization": "Bearer sa-token", "isthmus-cluster": "east"}))(proxy(account="api"))
    assert asked == ["sa-token"]
    with pytest.raises(AuthFailure) as failure:  # the file's token misused is not retried by review
        await chain({"authorization": f"Bearer {TOKEN}", "isthmus-cluster": "west"})
    assert failure.value.reason == "cluster-mismatch"
    assert asked == ["sa-token"]


async def test_a_thousand_reconnects_cause_one_review_per_distinct_token() -> None:
    """1,000 streams at once (a control plane restart), 100 distinct tokens: 100 reviews, each
    answered once for everyone who waits on it, and none again while cached."""
    asked: list[str] = []
    gate = asyncio.Event()

    async def review(cluster: str, token: str, audiences: tuple[str, ...]) -> Answer:
        asked.append(token)
        await gate.wait()  # every stream arrives before any review is answered
        return Answer()

    tokens = KubeTokens(review)
    claims = base64.urlsafe_b64encode(json.dumps({"exp": time.time() + 600}).encode()).decode().rstrip("=")
    distinct = [f"e30.{claims}.sig{i}" for i in range(100)]

    async def stream(i: int) -> None:
        authorize = await tokens({"authorization": f"Bearer {distinct[i % 100]}", "isthmus-cluster": "east"})
        authorize(proxy())

    streams = [asyncio.create_task(stream(i)) for i in range(1000)]
    await asyncio.sleep(0.1)
    gate.set()
    await asyncio.gather(*streams)
    assert sorted(asked) == sorted(distinct)
    await asyncio.gather(*(stream(i) for i in range(1000)))  # reconnect again: all cached
    assert len(asked) == 100
