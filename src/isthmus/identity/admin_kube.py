"""Who may use the admin API, decided by the home cluster's RBAC (in the manner of kube-rbac-proxy).

A caller's bearer token (a user's or a service account's: whatever the home cluster's API server
authenticates) is verified with a TokenReview; what it asks is then put to a SubjectAccessReview
as a non-resource request: the path (``/drain/east``) with verb ``get`` for a read and ``create``
for a drain. An operator grants it with a ClusterRole's ``nonResourceURLs`` (deploy/home-cluster/
admin-rbac.yaml has a viewer and a drainer role), and may scope it to one member cluster's path.

No token or one the API server does not accept: 401; not allowed: 403 naming who and what; the
API server unreachable: 503 (fail closed). Answers are cached for ``ttl`` seconds per (token,
verb, path), in at most ``cache_size`` entries, so a polling ``isthmus drain`` asks once per
``ttl``. The reviews go through ``TokenReviewFn`` and ``AccessFn`` (discovery.kube.reviews): this
module does not talk to Kubernetes.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

VERBS = {"read": "get", "drain": "create"}


class TokenAnswer(Protocol):
    @property
    def authenticated(self) -> bool: ...
    @property
    def username(self) -> str: ...
    @property
    def groups(self) -> tuple[str, ...]: ...
    @property
    def uid(self) -> str: ...
    @property
    def extra(self) -> Mapping[str, tuple[str, ...]]: ...
    @property
    def error(self) -> str: ...
    @property
    def unavailable(self) -> bool: ...


class AccessAnswer(Protocol):
    @property
    def allowed(self) -> bool: ...
    @property
    def reason(self) -> str: ...
    @property
    def unavailable(self) -> bool: ...


TokenReviewFn = Callable[[str, tuple[str, ...]], Awaitable[TokenAnswer]]
AccessFn = Callable[
    [str, tuple[str, ...], str, Mapping[str, tuple[str, ...]], str, str], Awaitable[AccessAnswer]
]


class KubeAdmin:
    """An admin check (admin.app.AdminCheck) by TokenReview and SubjectAccessReview."""

    def __init__(
        self,
        review: TokenReviewFn,
        access: AccessFn,
        ttl: float = 10.0,
        cache_size: int = 1_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._review, self._access = review, access
        self.ttl, self.cache_size, self._clock = ttl, cache_size, clock
        self._cache: OrderedDict[str, tuple[float, tuple[int, str]]] = OrderedDict()
        self.reviews = 0

    async def check(self, token: str | None, right: str, path: str) -> tuple[int, str]:
        if not token:
            return 401, "a valid bearer token is required"
        verb = VERBS[right]
        key = hashlib.sha256(f"{token}\0{verb}\0{path}".encode()).hexdigest()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        answer = await self._decide(token, verb, path)
        if answer[0] != 503:
            self._cache[key] = (self._clock() + self.ttl, answer)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return answer

    async def _decide(self, token: str, verb: str, path: str) -> tuple[int, str]:
        self.reviews += 1
        who = await self._review(token, ())
        if who.unavailable:
            return 503, f"the home cluster cannot verify tokens now ({who.error}); retry"
        if not who.authenticated:
            return 401, "a valid bearer token is required"
        access = await self._access(who.username, who.groups, who.uid, who.extra, verb, path)
        if access.unavailable:
            return 503, f"the home cluster cannot authorize now ({access.reason}); retry"
        if not access.allowed:
            because = f" ({access.reason})" if access.reason else ""
            return 403, f"{who.username} may not {verb} {path}{because}"
        return 200, who.username
