"""Member cluster credentials: kubeconfigs read, checked and turned into kubernetes_asyncio clients.

Kubeconfigs with ``exec`` or ``auth-provider`` users are refused: they would make
the control plane run programs named by whoever writes the kubeconfig. Tokens,
client certificates and CA data (inline or as files) are accepted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio import client, config


class KubeconfigError(ValueError):
    """A kubeconfig that isthmus will not use; the message says why."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """One member cluster's kubeconfig, parsed and checked; ``digest`` changes when it is rotated."""

    cluster: str
    document: dict[str, Any]
    digest: str

    @classmethod
    def parse(cls, cluster: str, text: str, source: str) -> Credentials:
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise KubeconfigError(f"{source}: not valid YAML: {exc}") from exc
        if not isinstance(document, dict) or not document.get("clusters"):
            raise KubeconfigError(f"{source}: not a kubeconfig (no clusters)")
        context_name = document.get("current-context")
        contexts = {c.get("name"): c.get("context") or {} for c in document.get("contexts") or []}
        if context_name not in contexts:
            raise KubeconfigError(f"{source}: current-context {context_name!r} is not defined")
        user_name = contexts[context_name].get("user")
        users = {u.get("name"): u.get("user") or {} for u in document.get("users") or []}
        user = users.get(user_name, {})
        for refused in ("exec", "auth-provider"):
            if refused in user:
                raise KubeconfigError(
                    f"{source}: user {user_name!r} uses an {refused} plugin; isthmus refuses kubeconfigs "
                    "that would run programs. Use a service-account token or client certificate instead."
                )
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        return cls(cluster, document, digest)

    def bearer_token(self) -> str:
        """The current user's bearer token (``token``, else the file ``tokenFile`` names)."""
        context_name = self.document.get("current-context")
        contexts = {c.get("name"): c.get("context") or {} for c in self.document.get("contexts") or []}
        user_name = contexts[context_name].get("user")
        users = {u.get("name"): u.get("user") or {} for u in self.document.get("users") or []}
        user = users.get(user_name, {})
        if user.get("token"):
            return str(user["token"])
        if user.get("tokenFile"):
            try:
                return Path(user["tokenFile"]).read_text().strip()
            except OSError as exc:
                raise KubeconfigError(f"user {user_name!r}: tokenFile: {exc}") from exc
        raise KubeconfigError(f"user {user_name!r} of the current context has no bearer token")

    async def api_client(self) -> client.ApiClient:
        configuration = client.Configuration()
        await config.load_kube_config_from_dict(self.document, client_configuration=configuration)
        return client.ApiClient(configuration)
