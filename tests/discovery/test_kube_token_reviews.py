"""Proxy tokens verified by TokenReviews against fake API servers that answer in kube-apiserver's
shapes (identity.kube_tokens through Members.review; the real-Kubernetes tier checks the same
against real servers): each proxy's token is reviewed by the member cluster it names, audiences
and expiry decide, a pod-bound token's pod comes back in ``extra``, and a cluster whose role does
not grant reviews (403) or that is down admits no new proxy (UNAVAILABLE)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Collection
from pathlib import Path

import grpc
import pytest

from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.kube.members import Members
from isthmus.discovery.kube.reflector import Timing
from isthmus.discovery.model import Locality
from isthmus.identity.kube_tokens import KubeTokens, ReviewAnswer, ReviewFn
from isthmus.identity.pod_bindings import PodBindings
from isthmus.workers.messages import Asking, WorkerConfig, frame, read
from isthmus.workers.pool import WorkerPool
from isthmus.workers.worker import Worker
from isthmus.xds.proxy import Proxy, Role
from isthmus.xds.server.auth import AuthFailure, StreamAuthenticator
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


async def refused(tokens: StreamAuthenticator, token: str, cluster: str, node: Proxy) -> AuthFailure:
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


@contextlib.asynccontextmanager
async def worker_of(pool: WorkerPool) -> AsyncIterator[Worker]:
    """The pool's one worker (isthmus.workers), wired here in one process, the messages framed as
    between processes."""
    [side] = pool._workers
    to_worker, to_main = asyncio.StreamReader(), asyncio.StreamReader()

    class Pipe:  # what the worker's and the pool's stream writers do: frames, in order
        def __init__(self, reader: asyncio.StreamReader) -> None:
            self.reader = reader

        def write(self, data: bytes) -> None:
            self.reader.feed_data(data)

    side.stdin = Pipe(to_worker)  # type: ignore[assignment]
    side.asking = Asking(lambda message: to_worker.feed_data(frame(message)), 5.0)
    worker = Worker(side.config, lambda message: to_main.feed_data(frame(message)))
    await worker.start()

    async def deliver() -> None:
        while True:
            worker.apply(await read(to_worker))

    pumps = [asyncio.create_task(deliver()), asyncio.create_task(pool._reports(side, to_main))]
    try:
        yield worker
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await worker.ads.stop(0.1)


WORKER = WorkerConfig(1, "127.0.0.1", 0, 30.0, 1 << 20, 1.0, 3600.0, token_audience="isthmus")


def token_cache(review: ReviewFn) -> ReviewFn:
    """A review as kube-apiserver answers it for a while after a bound pod is deleted: from its
    token cache (the fake API server refuses such a token at once)."""
    answers: dict[tuple[str, str], ReviewAnswer] = {}

    async def cached(cluster: str, token: str, audiences: tuple[str, ...]) -> ReviewAnswer:
        if (cluster, token) not in answers:
            answers[cluster, token] = await review(cluster, token, audiences)
        return answers[cluster, token]

    return cached


async def until(check: Callable[[], bool], what: str) -> None:
    for _ in range(250):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not within 5 s")


async def bound_pod(api: FakeKubeApi, members: Members, name: str) -> str:
    """A pod of ``api``'s cluster, as its watch in ``members`` lists it: a token bound to it."""
    pod = api.create(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop"}, "spec": {}}
    )
    uid = pod["metadata"]["uid"]
    await until(lambda: members.pod_uid("east", "shop", name) == uid, f"the watch lists {name}")
    return api.issue_token("shop", "web", pod=(name, uid))


async def test_an_xds_worker_reviews_through_the_main_process_and_follows_its_pods(
    clusters: tuple[dict[str, FakeKubeApi], Members],
) -> None:
    """A worker process asks the main process for TokenReviews and for the pods of its streams'
    tokens."""
    apis, members = clusters
    east = apis["east"]
    pool = WorkerPool(review=members.review, pod_uid=members.pod_uid)
    pool.configure([WORKER])
    members.on_pods = pool.pods_changed  # as the main process wires it (app.ControlPlane._pods_changed)
    async with worker_of(pool) as worker:
        assert worker.ads.authenticator is not None
        token = await bound_pod(east, members, "web-1")
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
        east.delete("pods", "shop", "web-1")
        await until(lambda: revocation.failure is not None, "the worker's stream is revoked")
        assert revocation.failure is not None
        assert revocation.failure.reason == "pod-deleted"


async def test_a_deleted_pods_token_is_refused_by_every_process_wherever_its_stream_was(
    clusters: tuple[dict[str, FakeKubeApi], Members],
) -> None:
    """The API server still accepts a deleted pod's token for a while (its token cache): a reconnect
    landing on another process than the one that held the stream is refused all the same, both
    ways (the main process's PodBindings hear of the workers' streams)."""
    apis, members = clusters
    east = apis["east"]
    review = token_cache(members.review)
    bindings = PodBindings(members.pod_uid)
    pool = WorkerPool(review=review, pod_uid=members.pod_uid, bindings=bindings)
    pool.configure([WORKER])

    def pods_changed(cluster: str, keys: Collection[str] | None) -> None:  # app.ControlPlane's
        bindings.pods_changed(cluster, keys)
        pool.pods_changed(cluster, keys)

    members.on_pods = pods_changed
    main = KubeTokens(review, bindings=bindings)
    async with worker_of(pool) as worker:
        assert worker.ads.authenticator is not None
        # A stream in the worker; its pod deleted; the reconnect lands on the main process.
        token = await bound_pod(east, members, "web-1")
        headers = {"authorization": f"Bearer {token}", "isthmus-cluster": "east"}
        in_worker = (await worker.ads.authenticator(headers))(proxy("east", pod="web-1"))
        assert in_worker is not None
        [side] = pool._workers
        await until(lambda: bool(side.watched), "the main process binds the worker's stream")
        assert len(bindings) == 0, "the main process counts its own streams only"
        east.delete("pods", "shop", "web-1")
        await until(lambda: in_worker.failure is not None, "the worker's stream is revoked")
        assert (await refused(main, token, "east", proxy("east", pod="web-1"))).reason == "pod-deleted"
        # A stream in the main process; its pod deleted; the reconnect lands on the worker.
        token = await bound_pod(east, members, "web-2")
        headers = {"authorization": f"Bearer {token}", "isthmus-cluster": "east"}
        in_main = (await main(headers))(proxy("east", pod="web-2"))
        assert in_main is not None
        east.delete("pods", "shop", "web-2")
        await until(lambda: in_main.failure is not None, "the main process's stream is revoked")
        failure = await refused(worker.ads.authenticator, token, "east", proxy("east", pod="web-2"))
        assert failure.reason == "pod-deleted"
        assert worker.bindings is not None
        assert len(worker.bindings) == 0
