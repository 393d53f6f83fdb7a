"""Proxy tokens verified by TokenReviews against fake API servers that answer in kube-apiserver's
shapes (identity.kube_tokens through Members.review; the real-Kubernetes tier checks the same
against real servers): each proxy's token is reviewed by the member cluster it names, audiences
and expiry decide, a pod-bound token's pod comes back in ``extra``, and a cluster whose role does
not grant reviews (403) or that is down admits no new proxy (UNAVAILABLE)."""

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
from kubeapi.kubeconfig import write_kubeconfig
from kubeapi.server import DEFAULT_TOKEN, FakeKubeApi


def proxy(cluster: str, account: str = "web", pod: str = "") -> Proxy:
    return Proxy(
        f"sidecar~x.shop~{cluster}", Role.SIDECAR, "shop", "x", account, Locality("", "", cluster), pod=pod
    )


@pytest.fixture
async def clusters(tmp_path: Path) -> AsyncIterator[tuple[dict[str, FakeKubeApi], Members]]:
    apis = {name: FakeKubeApi() for name in ("east", "west")}
    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    for name, api in apis.items():
        write_kubeconfig(directory / f"{name}.yaml", await api.start(), DEFAULT_TOKEN, name)
    timing = Timing(watch_timeout=30, request_timeout=2.0, backoff_initial=0.1, backoff_max=0.5)
    members = Members(
        Aggregator(lambda view: None, quiet=0.01, max_delay=0.1), directory=directory, timing=timing
    )
    task = asyncio.create_task(members.run())
    while set(members.members) != set(apis):
        await asyncio.sleep(0.02)
    try:
        yield apis, members
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for api in apis.values():
            await api.stop()


async def refused(tokens: KubeTokens, token: str, cluster: str, node: Proxy) -> AuthFailure:
    with pytest.raises(AuthFailure) as failure:
        (await tokens({"authorization": f"Bearer {token}", "isthmus-cluster": cluster}))(node)
    return failure.value


async def test_tokens_are_reviewed_by_the_cluster_the_proxy_names(
    clusters: tuple[dict[str, FakeKubeApi], Members],
) -> None:
    apis, members = clusters
    tokens = KubeTokens(members.review)
    good = apis["east"].issue_token("shop", "web")
    (await tokens({"authorization": f"Bearer {good}", "isthmus-cluster": "east"}))(proxy("east"))
    assert apis["east"].token_reviews == 1
    # The same token named as west: west's API server does not know it.
    failure = await refused(tokens, good, "west", proxy("west"))
    assert (failure.code, failure.reason) == (grpc.StatusCode.UNAUTHENTICATED, "bad-token")
    assert "invalid bearer token" in failure.details
    assert apis["west"].token_reviews == 1
    other_audience = apis["east"].issue_token("shop", "web", audiences=("https://kubernetes.default.svc",))
    failure = await refused(tokens, other_audience, "east", proxy("east"))
    assert "is invalid for the target audiences" in failure.details
    expired = apis["east"].issue_token("shop", "web", seconds=-1)
    assert "expired" in (await refused(tokens, expired, "east", proxy("east"))).details
    another = apis["east"].issue_token("shop", "api")
    failure = await refused(tokens, another, "east", proxy("east", account="web"))
    assert (failure.code, failure.reason) == (grpc.StatusCode.PERMISSION_DENIED, "node-mismatch")


async def test_a_pod_bound_tokens_pod_comes_back_and_is_checked(
    clusters: tuple[dict[str, FakeKubeApi], Members],
) -> None:
    apis, members = clusters
    east = apis["east"]
    pod = east.create(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "shop"}, "spec": {}}
    )
    token = east.issue_token("shop", "web", pod=("web-1", pod["metadata"]["uid"]))
    tokens = KubeTokens(members.review)
    failure = await refused(tokens, token, "east", proxy("east", pod="web-2"))
    assert "pod 'web-2' (credentials: 'web-1')" in failure.details
    tokens = KubeTokens(members.review)
    assert (await tokens({"authorization": f"Bearer {token}", "isthmus-cluster": "east"}))(
        proxy("east", pod="web-1")
    ) is None  # no PodBindings given: admitted, not followed
    east.delete("pods", "shop", "web-1")
    tokens = KubeTokens(members.review)
    assert (
        'pod "web-1" not found' in (await refused(tokens, token, "east", proxy("east", pod="web-1"))).details
    )


async def test_a_cluster_that_cannot_review_admits_no_new_proxy(
    clusters: tuple[dict[str, FakeKubeApi], Members],
) -> None:
    apis, members = clusters
    tokens = KubeTokens(members.review)
    token = apis["east"].issue_token("shop", "web")
    apis["east"].forbid("tokenreviews")
    failure = await refused(tokens, token, "east", proxy("east"))
    assert (failure.code, failure.reason) == (grpc.StatusCode.UNAVAILABLE, "review-unavailable")
    assert "403" in failure.details
    apis["east"].allow("tokenreviews")
    (await tokens({"authorization": f"Bearer {token}", "isthmus-cluster": "east"}))(proxy("east"))
    await apis["west"].stop()
    west_token = apis["west"].issue_token("shop", "web")
    failure = await refused(tokens, west_token, "west", proxy("west"))
    assert failure.code is grpc.StatusCode.UNAVAILABLE


async def test_an_xds_worker_reviews_through_the_main_process_and_follows_its_pods(
    clusters: tuple[dict[str, FakeKubeApi], Members],
) -> None:
    """A worker process (isthmus.workers) asks the main process for TokenReviews and for the pods
    of its streams' tokens: wired here in one process, the messages framed as between processes."""
    from isthmus.workers.messages import Asking, WorkerConfig, frame, read
    from isthmus.workers.pool import WorkerPool
    from isthmus.workers.worker import Worker

    apis, members = clusters
    east = apis["east"]
    config = WorkerConfig(1, "127.0.0.1", 0, 30.0, 1 << 20, 1.0, 3600.0, token_audience="isthmus")
    pool = WorkerPool(review=members.review, pod_uid=members.pod_uid)
    pool.configure([config])
    members.on_pods = pool.pods_changed  # as the main process wires it (app.ControlPlane._pods_changed)
    [side] = pool._workers
    to_worker, to_main = asyncio.StreamReader(), asyncio.StreamReader()

    class Pipe:  # what the worker's and the pool's stream writers do: frames, in order
        def __init__(self, reader: asyncio.StreamReader) -> None:
            self.reader = reader

        def write(self, data: bytes) -> None:
            self.reader.feed_data(data)

    side.stdin = Pipe(to_worker)  # type: ignore[assignment]
    side.asking = Asking(lambda message: to_worker.feed_data(frame(message)), 5.0)
    worker = Worker(config, lambda message: to_main.feed_data(frame(message)))
    await worker.start()

    async def deliver() -> None:
        while True:
            worker.apply(await read(to_worker))

    pumps = [asyncio.create_task(deliver()), asyncio.create_task(pool._reports(side, to_main))]
    try:
        assert worker.ads.authenticator is not None
        pod = east.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "web-1", "namespace": "shop"},
                "spec": {},
            }
        )
        token = east.issue_token("shop", "web", pod=("web-1", pod["metadata"]["uid"]))
        headers = {"authorization": f"Bearer {token}", "isthmus-cluster": "east"}
        revocation = (await worker.ads.authenticator(headers))(proxy("east", pod="web-1"))
        assert revocation is not None, "a pod-bound token's stream is followed"
        assert east.token_reviews == 1, "the main process asked east's API server"
        other = east.issue_token("shop", "api")
        with pytest.raises(AuthFailure) as failure:
            (await worker.ads.authenticator({"authorization": f"Bearer {other}", "isthmus-cluster": "east"}))(
                proxy("east", account="web")
            )
        assert failure.value.reason == "node-mismatch"
        # The main process's pod watch sees web-1 go: the worker's stream of its token ends.
        await asyncio.sleep(0.3)  # the pod watch has listed web-1
        east.delete("pods", "shop", "web-1")
        for _ in range(100):
            if revocation.failure is not None:
                break
            await asyncio.sleep(0.02)
        assert revocation.failure is not None
        assert revocation.failure.reason == "pod-deleted"
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await worker.ads.stop(0.1)
