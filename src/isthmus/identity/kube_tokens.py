"""Kubernetes proxies authenticate with a projected service-account token (audience ``isthmus`` by
default), verified by a TokenReview against the API server of the member cluster the proxy names in
its ``isthmus-cluster`` header, with the credentials isthmus already holds for that cluster.

* The review's username ``system:serviceaccount:NS:SA`` is the proxy's identity; the Node must claim
  it, and the member cluster it named (identity.tokens.Peer). A pod-bound token (the review's
  ``extra`` names a pod) also binds the pod name, and the stream is closed when that pod is deleted
  (identity.pod_bindings).
* Results are cached by (cluster, token digest): a verified token until its expiry (read from the
  token after the API server verified it; at most ``max_cache``) or, pod-bound, until the pod watch
  shows its pod gone; a refusal for a few seconds; in at most ``cache_size`` entries. Concurrent
  streams with the same token share one review, so 1,000 proxies reconnecting at once cause one
  review per distinct token.
* An API server that cannot be asked admits no new proxy (UNAVAILABLE: Envoy retries); streams
  already authenticated are never cut for it.

The review itself is asked through ``ReviewFn`` (``Members.review`` in discovery.kube): this module
does not talk to Kubernetes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import grpc

from isthmus.identity.pod_bindings import POD_NAME_KEY, POD_UID_KEY, PodBindings
from isthmus.identity.tokens import Peer, StaticTokens, bearer
from isthmus.xds.generate.bootstrap import CLUSTER_HEADER
from isthmus.xds.proxy import Proxy
from isthmus.xds.server.auth import AuthFailure, Authorizer, Revocation

SA_PREFIX = "system:serviceaccount:"


class ReviewAnswer(Protocol):
    @property
    def authenticated(self) -> bool: ...
    @property
    def username(self) -> str: ...
    @property
    def error(self) -> str: ...
    @property
    def unavailable(self) -> bool: ...
    @property
    def extra(self) -> Mapping[str, tuple[str, ...]]: ...


ReviewFn = Callable[[str, str, tuple[str, ...]], Awaitable[ReviewAnswer]]


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (not verified here: the API server did), or None."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def peer_of(cluster: str, answer: ReviewAnswer) -> Peer | AuthFailure:
    """What a TokenReview's answer in member cluster ``cluster`` admits: a service account's peer
    (and the pod its token is bound to), or why not."""
    if answer.unavailable:
        return AuthFailure(
            grpc.StatusCode.UNAVAILABLE,
            "review-unavailable",
            f"member cluster {cluster!r} cannot verify tokens now ({answer.error}); retry",
        )
    if not answer.authenticated:
        why = answer.error or "not authenticated"
        return AuthFailure(grpc.StatusCode.UNAUTHENTICATED, "bad-token", f"the token is not valid: {why}")
    if not answer.username.startswith(SA_PREFIX) or answer.username.count(":") != 3:
        return AuthFailure(
            grpc.StatusCode.PERMISSION_DENIED,
            "not-a-service-account",
            "the token is not a service account's",
        )
    namespace, account = answer.username[len(SA_PREFIX) :].split(":")
    pod, uid = (next(iter(answer.extra.get(key, ())), "") for key in (POD_NAME_KEY, POD_UID_KEY))
    return Peer(namespace, account, cluster, via=f"TokenReview in {cluster}", pod=pod, pod_uid=uid)


class KubeTokens:
    """A ``StreamAuthenticator`` verifying service-account tokens with TokenReviews."""

    def __init__(
        self,
        review: ReviewFn,
        audiences: tuple[str, ...] = ("isthmus",),
        cache_size: int = 10_000,
        max_cache: float = 600.0,
        refusal_cache: float = 5.0,
        clock: Callable[[], float] = time.time,
        bindings: PodBindings | None = None,
    ) -> None:
        self._review = review
        self.bindings = bindings  # None: pod-bound tokens are not followed after the stream opens
        self.audiences = audiences
        self.cache_size = cache_size
        self.max_cache = max_cache
        self.refusal_cache = refusal_cache
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Peer | AuthFailure]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Peer | AuthFailure]] = {}
        self.reviews = 0

    async def _verify(self, cluster: str, token: str) -> Peer | AuthFailure:
        self.reviews += 1
        answer = await self._review(cluster, token, self.audiences)
        return peer_of(cluster, answer)

    def _remember(self, key: str, token: str, result: Peer | AuthFailure) -> None:
        now = self._clock()
        if isinstance(result, AuthFailure):
            if result.code is grpc.StatusCode.UNAVAILABLE:
                return  # ask again next time
            until = now + self.refusal_cache
        else:
            expiry = token_expiry(token)
            until = min(expiry if expiry is not None else now, now + self.max_cache)
        self._cache[key] = (until, result)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def __call__(self, metadata: Mapping[str, str]) -> Authorizer:
        token = bearer(metadata)
        cluster = metadata.get(CLUSTER_HEADER, "")
        if not cluster:
            raise AuthFailure(
                grpc.StatusCode.UNAUTHENTICATED,
                "no-cluster",
                f"no {CLUSTER_HEADER} header: name your member cluster",
            )
        key = hashlib.sha256(f"{cluster}\0{token}".encode()).hexdigest()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._clock():
            result = cached[1]
        else:
            pending = self._inflight.get(key)
            if pending is None:
                pending = self._inflight[key] = asyncio.ensure_future(self._verify(cluster, token))
                try:
                    result = await asyncio.shield(pending)
                finally:
                    self._inflight.pop(key, None)
                self._remember(key, token, result)
            else:
                result = await asyncio.shield(pending)
        if isinstance(result, AuthFailure):
            raise result
        peer, bindings = result, self.bindings
        if not peer.pod_uid or bindings is None:
            return peer.authorize
        if not bindings.may_exist(*peer.bound_pod()):
            # The API server accepts a deleted pod's token for a few seconds more (its own token
            # cache); the pod watch already knows better.
            self._cache.pop(key, None)
            raise bindings.deleted(*peer.bound_pod())

        def authorize(proxy: Proxy) -> Revocation:
            peer.authorize(proxy)
            return bindings.bind(*peer.bound_pod())

        return authorize


class FirstOf:
    """Tokens of the static file first (VMs and the like), every other token by TokenReview."""

    def __init__(self, static: StaticTokens, kube: KubeTokens) -> None:
        self.static, self.kube = static, kube

    async def __call__(self, metadata: Mapping[str, str]) -> Authorizer:
        try:
            return await self.static(metadata)
        except AuthFailure as exc:
            if exc.reason != "bad-token":  # no token, malformed, or the file's token misused
                raise
        return await self.kube(metadata)
