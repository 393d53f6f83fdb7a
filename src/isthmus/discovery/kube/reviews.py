"""TokenReviews: the one question isthmus asks a member cluster's API server about a proxy, "who
does this token belong to?", with the member cluster's own credentials (the reader role grants
``create`` on ``tokenreviews``). identity.kube_tokens asks it through ``Members.review``; the
Kubernetes client stays here."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client

from isthmus.discovery.kube.kubeconfig import Credentials


@dataclass(frozen=True, slots=True)
class Review:
    """A TokenReview's answer; ``unavailable``: the API server could not be asked (fail closed)."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)
    error: str = ""
    unavailable: bool = False


class Reviewer:
    """Sends TokenReviews to one member cluster, over one client kept for its credentials."""

    def __init__(self, credentials: Credentials, timeout: float = 5.0) -> None:
        self.credentials = credentials
        self.timeout = timeout
        self._api: client.ApiClient | None = None
        self._lock = asyncio.Lock()

    async def _client(self) -> Any:
        async with self._lock:
            if self._api is None:
                self._api = await self.credentials.api_client()
            return client.AuthenticationV1Api(self._api)

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
            status = getattr(exc, "status", None)
            reason = getattr(exc, "reason", None) or type(exc).__name__
            return Review(False, error=f"{status} {reason}" if status else str(reason), unavailable=True)
        status = answer.status
        user = status.user if status is not None else None
        if status is None or not status.authenticated or user is None:
            return Review(False, error="" if status is None else (status.error or ""))
        extra = {k: tuple(v or ()) for k, v in (user.extra or {}).items()}
        return Review(True, user.username or "", tuple(status.audiences or ()), extra)

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None
