"""Membership from Kubernetes Secrets in the control plane's own cluster.

A Secret in the watched namespace labelled ``isthmus.io/member-cluster=true`` declares member
clusters: each data key is a cluster name and its value that cluster's kubeconfig (so one Secret
may hold several clusters, and ``kubectl create secret generic NAME --from-file=CLUSTER=PATH``
makes one). The Secrets are listed and watched like any other kind; a new key adds a cluster, a
removed key or Secret removes it, a changed value rotates its credentials (``Members`` warms the
new watcher before switching, so there is no gap). A key that is not a valid cluster name or
whose kubeconfig is refused is reported in the log and in status, and never affects the others.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from kubernetes_asyncio import client, config

from isthmus.discovery.kube import trim
from isthmus.discovery.kube.kubeconfig import Credentials, KubeconfigError
from isthmus.discovery.kube.reflector import Obj, Reflector, Timing

log = logging.getLogger(__name__)

MEMBER_LABEL = "isthmus.io/member-cluster"
CLUSTER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class Found:
    """What the Secrets declare: credentials per cluster, refusals per cluster, and where each came from."""

    credentials: Mapping[str, Credentials]
    errors: Mapping[str, str]
    origins: Mapping[str, str]


def credentials_of(secrets: Mapping[str, Obj]) -> Found:
    """Read member cluster kubeconfigs out of Secret objects (pure; first Secret by name wins a name)."""
    credentials: dict[str, Credentials] = {}
    errors: dict[str, str] = {}
    origins: dict[str, str] = {}
    for key in sorted(secrets):
        data = secrets[key].get("data") or {}
        for cluster in sorted(data):
            origin = f"secret {key} key {cluster}"
            if cluster in origins:
                log.warning(
                    "%s: cluster %s already declared by %s; ignored", origin, cluster, origins[cluster]
                )
                continue
            origins[cluster] = origin
            if not CLUSTER_NAME.match(cluster):
                errors[cluster] = f"{origin}: not a valid cluster name (lowercase DNS label)"
                continue
            try:
                text = base64.b64decode(str(data[cluster]), validate=True).decode()
                credentials[cluster] = Credentials.parse(cluster, text, origin)
            except (binascii.Error, UnicodeDecodeError) as exc:
                errors[cluster] = f"{origin}: value is not base64 text ({exc})"
            except KubeconfigError as exc:
                errors[cluster] = str(exc)
    return Found(credentials, errors, origins)


async def home_api_client(kubeconfig: str | None) -> client.ApiClient:
    """A client for the control plane's own cluster: from a kubeconfig file, else in-cluster."""
    configuration = client.Configuration()
    if kubeconfig:
        await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


class SecretMembers:
    """Watches the labelled Secrets of one namespace; calls ``on_change`` when the declared set changes."""

    def __init__(
        self,
        namespace: str,
        kubeconfig: str | None = None,
        timing: Timing | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.timing = timing
        self.on_change = on_change
        self.found = Found({}, {}, {})
        self.synced = asyncio.Event()
        self.detail = ""
        self._reflector: Reflector | None = None

    @property
    def source(self) -> str:
        return f"secrets in namespace {self.namespace} labelled {MEMBER_LABEL}=true"

    def _changed(self, keys: Collection[str] | None = None) -> None:
        """Re-read every Secret (there are few, so which ``keys`` changed does not matter)."""
        assert self._reflector is not None
        found = credentials_of(self._reflector.store)
        for cluster, error in found.errors.items():
            if self.found.errors.get(cluster) != error:
                log.error("cluster %s refused: %s", cluster, error)
        self.found = found
        self.on_change()

    def _error(self, kind: str, exc: BaseException) -> None:
        detail = f"{self.source}: {exc}"
        if detail != self.detail:
            log.warning("%s; keeping the member clusters already known", detail)
        self.detail = detail

    def _ok(self, kind: str) -> None:
        self.detail = ""
        if not self.synced.is_set():
            self.synced.set()
            self.on_change()

    async def run(self) -> None:
        api = await home_api_client(self.kubeconfig)
        try:
            core = client.CoreV1Api(api)
            list_fn = functools.partial(
                core.list_namespaced_secret, self.namespace, label_selector=f"{MEMBER_LABEL}=true"
            )
            self._reflector = Reflector(
                "secrets", list_fn, self._changed, self._error, self._ok, self.timing, trim=trim.secret
            )
            await self._reflector.run()
        finally:
            await api.close()
