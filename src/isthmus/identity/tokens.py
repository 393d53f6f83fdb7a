"""Proxy authentication by bearer token, for the xDS server's ``StreamAuthenticator``.

A proxy sends ``authorization: Bearer <token>`` and ``isthmus-cluster: <member cluster>`` as gRPC
metadata on its ADS stream (``isthmus bootstrap --token-file`` makes Envoy send both, reading the
token from a file). The token says who the proxy is (namespace and service account, and for some
the member cluster); the proxy's Node must then agree: its namespace, service account and member
cluster equal the authenticated ones, else the stream ends with PERMISSION_DENIED naming the
mismatch. No token or an unknown one: UNAUTHENTICATED, before anything is sent.

``StaticTokens`` reads a credentials file for proxies outside Kubernetes (VMs, the file source, the
demo), one per line, in the spirit of kube-apiserver's ``--token-auth-file``::

    # token,namespace,service-account[,member-cluster]
    3f2a...,shop,web,east

It is re-read when it changes (checked at most once a second), so a token is added or revoked
without a restart; a malformed line is reported and ignored, never taken for a credential. Tokens
are held and looked up by their SHA-256 digest (one lookup however many there are) and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from isthmus.xds.generate.bootstrap import CLUSTER_HEADER
from isthmus.xds.proxy import Proxy
from isthmus.xds.server.auth import AuthFailure, Authorizer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Peer:
    """Who authenticated: the identity the credentials prove, and how."""

    namespace: str
    service_account: str
    cluster: str  # "" = any member cluster (the credential does not bind one)
    via: str
    pod: str = ""  # a pod-bound token: its pod's name and uid
    pod_uid: str = ""

    def bound_pod(self) -> tuple[str, str, str, str]:
        """Member cluster, namespace, pod name and uid of a pod-bound token."""
        return self.cluster, self.namespace, self.pod, self.pod_uid

    def authorize(self, proxy: Proxy) -> None:
        claimed = {"namespace": proxy.namespace, "service account": proxy.service_account}
        proven = {"namespace": self.namespace, "service account": self.service_account}
        if self.cluster:
            claimed["member cluster"], proven["member cluster"] = proxy.cluster, self.cluster
        if self.pod:
            claimed["pod"], proven["pod"] = proxy.pod, self.pod
        wrong = [
            f"{k} {claimed[k]!r} (credentials: {proven[k]!r})" for k in claimed if claimed[k] != proven[k]
        ]
        if wrong:
            raise AuthFailure(
                grpc.StatusCode.PERMISSION_DENIED,
                "node-mismatch",
                f"node {proxy.node_id} claims {', '.join(wrong)}",
            )


def bearer(metadata: Mapping[str, str]) -> str:
    value = metadata.get("authorization", "")
    if not value:
        raise AuthFailure(
            grpc.StatusCode.UNAUTHENTICATED, "no-credentials", "no credentials: send a bearer token"
        )
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthFailure(grpc.StatusCode.UNAUTHENTICATED, "malformed", "authorization is not a bearer token")
    return token.strip()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenFile:
    """A file of ``token,field,...`` lines (``#`` comments), re-read when it changes (checked at most
    every ``check_every`` seconds); a malformed line is reported and ignored, a missing file holds no
    token. ``lookup`` compares tokens in constant time and never logs them."""

    def __init__(self, path: Path, fields: tuple[int, int], layout: str, check_every: float = 1.0) -> None:
        self.path = path
        self.fields = fields  # how many fields after the token: at least, at most
        self.layout = layout  # for messages: "token,namespace,service-account[,cluster]"
        self.check_every = check_every
        self._tokens: dict[bytes, tuple[bytes, tuple[str, ...]]] = {}  # SHA-256 of a token -> it, record
        self._stat: tuple[float, int] | None = None
        self._checked = 0.0
        self.errors: list[str] = []
        self._reload()

    def _reload(self) -> None:
        try:
            stat = self.path.stat()
            text = self.path.read_text()
        except OSError as exc:
            if self._stat is not None or not self.errors:
                log.error("token file %s: %s; no token is accepted", self.path, exc)
            self._tokens, self._stat, self.errors = {}, None, [str(exc)]
            return
        tokens: dict[bytes, tuple[bytes, tuple[str, ...]]] = {}
        errors = []
        least, most = self.fields
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = [f.strip() for f in line.split(",")]
            if not least + 1 <= len(fields) <= most + 1 or not all(fields[: least + 1]):
                errors.append(f"{self.path}:{number}: expected {self.layout}")
                continue
            digest = _digest(fields[0])
            tokens[digest] = (digest, tuple(fields[1:]) + ("",) * (most + 1 - len(fields)))
        for error in errors:
            log.error("%s (line ignored)", error)
        self._tokens, self.errors = tokens, errors
        self._stat = (stat.st_mtime, stat.st_size)
        log.info("token file %s: %d tokens", self.path, len(tokens))

    def _fresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.check_every:
            return
        self._checked = now
        try:
            stat = self.path.stat()
            current: tuple[float, int] | None = (stat.st_mtime, stat.st_size)
        except OSError:
            current = None
        if current != self._stat:
            self._reload()

    def lookup(self, token: str) -> tuple[str, ...] | None:
        """The record of ``token``, found by its SHA-256 digest: one dictionary lookup however many
        tokens the file holds, and what it reveals by its timing is about a digest, not a token."""
        self._fresh()
        digest = _digest(token)
        found = self._tokens.get(digest)
        return found[1] if found is not None and hmac.compare_digest(found[0], digest) else None


class StaticTokens:
    """A credentials file of tokens and the identities they prove; a ``StreamAuthenticator``."""

    def __init__(self, path: Path, check_every: float = 1.0) -> None:
        self.file = TokenFile(path, (2, 3), "token,namespace,service-account[,cluster]", check_every)
        self.path = path

    @property
    def errors(self) -> list[str]:
        return self.file.errors

    def lookup(self, token: str) -> tuple[str, ...] | None:
        return self.file.lookup(token)

    async def __call__(self, metadata: Mapping[str, str]) -> Authorizer:
        token = bearer(metadata)
        identity = self.lookup(token)
        if identity is None:
            raise AuthFailure(grpc.StatusCode.UNAUTHENTICATED, "bad-token", "the token is not valid")
        namespace, account, cluster = identity
        claimed = metadata.get(CLUSTER_HEADER, "")
        if cluster and claimed and claimed != cluster:
            raise AuthFailure(
                grpc.StatusCode.PERMISSION_DENIED,
                "cluster-mismatch",
                f"the token is for member cluster {cluster!r}, presented as {claimed!r}",
            )
        return Peer(namespace, account, cluster or claimed, via=f"token file {self.path}").authorize
