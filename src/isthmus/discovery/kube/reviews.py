"""TokenReviews and SubjectAccessReviews: the questions isthmus asks an API server about a caller.

"Who does this token belong to?" is asked of a member cluster's API server about its proxies, with
the member cluster's own credentials (the reader role grants ``create`` on ``tokenreviews``;
identity.kube_tokens asks through ``Members.review``), and of the home cluster about callers of the
admin API; "may this user do that?" (a SubjectAccessReview on the request's path and verb) of the
home cluster (identity.admin_kube). The Kubernetes client stays here."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client

from isthmus.discovery.kube.secrets import home_api_client


@dataclass(frozen=True, slots=True)
class Review:
    """A TokenReview's answer; ``unavailable``: the API server could not be asked (fail closed)."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)
    error: str = ""
    unavailable: bool = False
    groups: tuple[str, ...] = ()
    uid: str = ""


@dataclass(frozen=True, slots=True)
class Access:
    """A SubjectAccessReview's answer; ``unavailable``: the API server could not be asked."""

    allowed: bool
    reason: str = ""
    unavailable: bool = False


def _unreachable(exc: Exception) -> str:
    """Why a review could not be asked: the API server's status and reason, or the client's error."""
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None) or type(exc).__name__
    return f"{status} {reason}" if status else str(reason)


class Reviewer:
    """Sends reviews to one API server, over one client made by ``connect`` and kept."""

    def __init__(
        self, connect: Callable[[], Awaitable[client.ApiClient]], timeout: float = 5.0, key: str = ""
    ) -> None:
        self.connect = connect
        self.key = key  # what the client was made from (a credentials digest): rotated if it changes
        self.timeout = timeout
        self._api: client.ApiClient | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def home(cls, kubeconfig: str | None, timeout: float = 5.0) -> Reviewer:
        """The control plane's own cluster: a kubeconfig file, else the in-cluster account."""
        return cls(lambda: home_api_client(kubeconfig), timeout, key=kubeconfig or "in-cluster")

    async def _api_client(self) -> client.ApiClient:
        async with self._lock:
            if self._api is None:
                self._api = await self.connect()
            return self._api

    async def _client(self) -> Any:
        return client.AuthenticationV1Api(await self._api_client())

    async def review(self, token: str, audiences: tuple[str, ...]) -> Review:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(audiences)},
        }
        try:
            api = await self._client()
            answer = await api.create_token_review(body, _request_timeout=self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return Review(False, error=_unreachable(exc), unavailable=True)
        status = answer.status
        user = status.user if status is not None else None
        if status is None or not status.authenticated or user is None:
            return Review(False, error="" if status is None else (status.error or ""))
        extra = {k: tuple(v or ()) for k, v in (user.extra or {}).items()}
        return Review(
            True,
            user.username or "",
            tuple(status.audiences or ()),
            extra,
            groups=tuple(user.groups or ()),
            uid=user.uid or "",
        )

    async def access(
        self,
        user: str,
        groups: tuple[str, ...],
        uid: str,
        extra: Mapping[str, tuple[str, ...]],
        verb: str,
        path: str,
    ) -> Access:
        """May ``user`` (as a TokenReview described them) do ``verb`` on the non-resource ``path``?"""
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "groups": list(groups),
                "uid": uid,
                "extra": {k: list(v) for k, v in extra.items()},
                "nonResourceAttributes": {"path": path, "verb": verb},
            },
        }
        try:
            api = client.AuthorizationV1Api(await self._api_client())
            answer = await api.create_subject_access_review(body, _request_timeout=self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return Access(False, _unreachable(exc), unavailable=True)
        status = answer.status
        if status is None:
            return Access(False, "no status in the answer")
        return Access(bool(status.allowed) and not status.denied, status.reason or "")

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None
