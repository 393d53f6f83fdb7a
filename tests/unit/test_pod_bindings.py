"""Pod-bound tokens (identity.pod_bindings, identity.kube_tokens): a TokenReview naming a pod binds
the stream to that pod's name (the Node must claim it) and uid; when the member cluster's watch
shows the pod gone or replaced, the stream's Revocation fires with UNAUTHENTICATED, and only then."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import grpc
import pytest

from isthmus.discovery.model import Locality
from isthmus.identity.kube_tokens import KubeTokens
from isthmus.identity.pod_bindings import POD_NAME_KEY, POD_UID_KEY, PodBindings
from isthmus.xds.proxy import Proxy, Role
from isthmus.xds.server.auth import AuthFailure, Revocation

NODE = Proxy(
    "sidecar~web.shop~east", Role.SIDECAR, "shop", "web", "web", Locality("", "", "east"), pod="web-1"
)


class Pods:
    """What a member cluster's pod watch holds: (cluster, namespace, name) -> uid; None if unlisted."""

    def __init__(self) -> None:
        self.uids: dict[tuple[str, str, str], str] = {("east", "shop", "web-1"): "uid-1"}
        self.listed = True

    def uid(self, cluster: str, namespace: str, name: str) -> str | None:
        if not self.listed:
            return ""
        return self.uids.get((cluster, namespace, name))


@dataclass(frozen=True)
class Answer:
    authenticated: bool = True
    username: str = "system:serviceaccount:shop:web"
    error: str = ""
    unavailable: bool = False
    extra: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {POD_NAME_KEY: ("web-1",), POD_UID_KEY: ("uid-1",)}
    )


@pytest.fixture
def pods() -> Pods:
    return Pods()


@pytest.fixture
def bindings(pods: Pods) -> PodBindings:
    return PodBindings(pods.uid)


def revoked_with(revocation: Revocation) -> AuthFailure:
    assert revocation.failure is not None
    return revocation.failure


async def test_a_pod_bound_token_binds_the_pod_name_and_ends_when_the_pod_is_deleted(
    pods: Pods, bindings: PodBindings
) -> None:
    async def review(cluster: str, token: str, audiences: tuple[str, ...]) -> Answer:
        return Answer()

    tokens = KubeTokens(review, bindings=bindings)
    metadata = {"authorization": "Bearer pod-token", "isthmus-cluster": "east"}
    with pytest.raises(AuthFailure) as failure:  # the Node claims another pod
        (await tokens(metadata))(replace(NODE, pod="web-2"))
    assert failure.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert "pod 'web-2' (credentials: 'web-1')" in failure.value.details
    revocation = (await tokens(metadata))(NODE)
    assert isinstance(revocation, Revocation)
    woken = asyncio.Event()
    revocation.watch(woken)

    bindings.pods_changed("east", ["shop/web-2", "other/web-1"])  # other pods changed
    bindings.pods_changed("west", None)  # another cluster relisted
    assert revocation.failure is None
    assert not woken.is_set()
    del pods.uids[("east", "shop", "web-1")]
    bindings.pods_changed("east", ["shop/web-1"])
    failure_ = revoked_with(revocation)
    assert failure_.code is grpc.StatusCode.UNAUTHENTICATED
    assert failure_.reason == "pod-deleted"
    assert "shop/web-1 (uid uid-1)" in failure_.details
    assert woken.is_set()
    assert bindings.revoked == 1
    assert len(bindings) == 0


def test_a_pod_replaced_under_the_same_name_revokes_at_a_relist(pods: Pods, bindings: PodBindings) -> None:
    old = bindings.bind("east", "shop", "web-1", "uid-1")
    pods.uids[("east", "shop", "web-1")] = "uid-2"  # a StatefulSet's next pod
    new = bindings.bind("east", "shop", "web-1", "uid-2")
    bindings.pods_changed("east", None)
    assert revoked_with(old).reason == "pod-deleted"
    assert new.failure is None


def test_a_pod_the_watch_has_not_listed_is_not_taken_for_deleted(pods: Pods, bindings: PodBindings) -> None:
    pods.listed = False
    revocation = bindings.bind("east", "shop", "web-9", "uid-9")
    bindings.pods_changed("east", None)
    assert revocation.failure is None
    pods.listed = True  # listed now, and web-9 is not there
    bindings.pods_changed("east", None)
    assert revoked_with(revocation).reason == "pod-deleted"


def test_an_ended_stream_leaves_no_binding(pods: Pods, bindings: PodBindings) -> None:
    revocation = bindings.bind("east", "shop", "web-1", "uid-1")
    assert len(bindings) == 1
    del revocation
    gc.collect()
    assert len(bindings) == 0
    del pods.uids[("east", "shop", "web-1")]
    bindings.pods_changed("east", ["shop/web-1"])
    assert bindings.revoked == 0  # nobody left to close


async def test_a_token_that_is_not_pod_bound_is_not_followed(bindings: PodBindings) -> None:
    async def review(cluster: str, token: str, audiences: tuple[str, ...]) -> Answer:
        return Answer(extra={})

    tokens = KubeTokens(review, bindings=bindings)
    authorize = await tokens({"authorization": "Bearer sa-token", "isthmus-cluster": "east"})
    assert authorize(replace(NODE, pod="")) is None
    assert len(bindings) == 0


async def test_a_deleted_pods_token_is_refused_though_its_review_was_cached(
    pods: Pods, bindings: PodBindings
) -> None:
    asked: list[str] = []

    async def review(cluster: str, token: str, audiences: tuple[str, ...]) -> Answer:
        asked.append(token)
        return Answer()  # as the API server answers for a while after the deletion (its cache)

    tokens = KubeTokens(review, bindings=bindings)
    token = jwt(exp=time.time() + 600)
    metadata = {"authorization": f"Bearer {token}", "isthmus-cluster": "east"}
    (await tokens(metadata))(NODE)
    (await tokens(metadata))(NODE)
    assert asked == [token]  # cached
    del pods.uids[("east", "shop", "web-1")]
    bindings.pods_changed("east", ["shop/web-1"])  # the watch sees the deletion
    for _ in range(2):  # the cached answer, then a fresh review that still says yes
        with pytest.raises(AuthFailure) as failure:
            await tokens(metadata)
        assert (failure.value.code, failure.value.reason) == (grpc.StatusCode.UNAUTHENTICATED, "pod-deleted")
    assert asked == [token, token]


def jwt(exp: float) -> str:
    claims = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).decode().rstrip("=")
    return f"e30.{claims}.signature"


async def test_a_new_pod_the_watch_has_not_seen_yet_is_admitted(pods: Pods, bindings: PodBindings) -> None:
    """The sidecar of a pod just created can connect before the member cluster's pod watch has the
    pod: the review (the API server knows the pod) decides, and the stream is followed from then on."""
    del pods.uids[("east", "shop", "web-1")]  # listed, but this pod is not in the watch yet

    async def review(cluster: str, token: str, audiences: tuple[str, ...]) -> Answer:
        return Answer()

    tokens = KubeTokens(review, bindings=bindings)
    token = jwt(exp=time.time() + 600)
    metadata = {"authorization": f"Bearer {token}", "isthmus-cluster": "east"}
    revocation = (await tokens(metadata))(NODE)
    assert isinstance(revocation, Revocation)
    assert revocation.failure is None
    pods.uids[("east", "shop", "web-1")] = "uid-1"
    bindings.pods_changed("east", ["shop/web-1"])  # the watch catches up
    assert revocation.failure is None
    del pods.uids[("east", "shop", "web-1")]
    bindings.pods_changed("east", ["shop/web-1"])
    assert revoked_with(revocation).reason == "pod-deleted"
