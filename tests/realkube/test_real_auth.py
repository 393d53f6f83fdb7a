"""Proxy authentication against real kube-apiservers: service-account tokens from the TokenRequest
API (audience ``isthmus``), verified by TokenReviews that isthmus sends with the least-privilege
reader role of the member cluster the proxy names (identity.kube_tokens through Members.review)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.kube.members import Members
from isthmus.discovery.kube.reflector import Timing
from isthmus.discovery.model import Locality
from isthmus.identity.kube_tokens import KubeTokens
from isthmus.xds.proxy import Proxy, Role
from isthmus.xds.server.auth import AuthFailure
from realkube.cluster import ISSUER, RealCluster
from realkube.fixtures import READER, READER_NAMESPACE, reader_kubeconfig

pytestmark = pytest.mark.realkube


def proxy(namespace: str, account: str, cluster: str) -> Proxy:
    return Proxy(
        f"sidecar~x.{namespace}~{cluster}", Role.SIDECAR, namespace, "x", account, Locality("", "", cluster)
    )


@pytest.fixture
async def members(real_clusters: dict[str, RealCluster], tmp_path: Path) -> AsyncIterator[Members]:
    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    for name in ("a", "b"):
        await reader_kubeconfig(real_clusters[name], directory / f"{name}.yaml")
    aggregator = Aggregator(lambda view: None, quiet=0.02, max_delay=0.2)
    timing = Timing(watch_timeout=30, request_timeout=5.0, backoff_initial=0.2, backoff_max=2.0)
    found = Members(aggregator, directory=directory, timing=timing, poll_interval=0.2)
    task = asyncio.create_task(found.run())
    while set(found.members) != {"a", "b"}:
        await asyncio.sleep(0.05)
    yield found
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_service_account_tokens_are_verified_by_the_proxys_own_cluster(
    real_clusters: dict[str, RealCluster], namespace: str, members: Members
) -> None:
    a = real_clusters["a"]
    await a.admin.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web", "namespace": namespace}}
    )
    token = await a.admin.service_account_token(namespace, "web", "isthmus", seconds=600)
    audit_start = len(a.audit())
    tokens = KubeTokens(members.review)

    async def admit(metadata: dict[str, str], node: Proxy) -> None:
        authorize = await tokens(metadata)
        authorize(node)

    async def refused(metadata: dict[str, str], node: Proxy) -> AuthFailure:
        with pytest.raises(AuthFailure) as failure:
            await admit(metadata, node)
        return failure.value

    good = {"authorization": f"Bearer {token}", "isthmus-cluster": "a"}
    # 50 streams with the same token at once: one TokenReview.
    await asyncio.gather(*(admit(good, proxy(namespace, "web", "a")) for _ in range(50)))
    assert tokens.reviews == 1
    # The same token, claiming another service account: denied, and the mismatch is named.
    denied = await refused(good, proxy(namespace, "api", "a"))
    assert denied.code is grpc.StatusCode.PERMISSION_DENIED
    assert "service account 'api'" in denied.details
    # Presented as cluster b: b's API server does not know a's signing key.
    as_b = await refused({**good, "isthmus-cluster": "b"}, proxy(namespace, "web", "b"))
    assert (as_b.code, as_b.reason) == (grpc.StatusCode.UNAUTHENTICATED, "bad-token")
    # A token for another audience (the API server's own), and garbage: unauthenticated.
    other_audience = await a.admin.service_account_token(namespace, "web", ISSUER, seconds=600)
    for bad in (other_audience, "garbage"):
        failure = await refused(
            {"authorization": f"Bearer {bad}", "isthmus-cluster": "a"}, proxy(namespace, "web", "a")
        )
        assert failure.code is grpc.StatusCode.UNAUTHENTICATED
    # No cluster header, or a cluster that is not a member: unauthenticated.
    assert (
        await refused({"authorization": f"Bearer {token}"}, proxy(namespace, "web", "a"))
    ).reason == "no-cluster"
    unknown = await refused({**good, "isthmus-cluster": "nowhere"}, proxy(namespace, "web", "nowhere"))
    assert unknown.code is grpc.StatusCode.UNAUTHENTICATED
    # The reader asked with its least-privilege role and was never refused.
    reviews = [e for e in a.audit()[audit_start:] if e["objectRef"]["resource"] == "tokenreviews"]
    assert reviews, "no TokenReview reached cluster a"
    assert {e["user"]["username"] for e in reviews} == {f"system:serviceaccount:{READER_NAMESPACE}:{READER}"}
    assert {e["responseStatus"]["code"] for e in reviews} == {201}
