"""Write a standard kubeconfig (one cluster, one user, one context) that points at a FakeKubeApi."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def kubeconfig_dict(
    server_url: str,
    token: str,
    cluster_name: str,
    *,
    exec_plugin: bool = False,
    namespace: str | None = None,
) -> dict[str, Any]:
    """The kubeconfig as a dict (what ``write_kubeconfig`` serializes).

    With ``exec_plugin`` the user authenticates through a ``client.authentication.k8s.io/v1``
    exec plugin instead of a static token. The plugin is a working one (the current Python
    interpreter printing an ExecCredential carrying ``token``), so a client that refuses it refuses
    it by policy, not because it cannot run.
    """
    user_name = f"{cluster_name}-user"
    user: dict[str, Any]
    if exec_plugin:
        credential = {
            "apiVersion": "client.authentication.k8s.io/v1",
            "kind": "ExecCredential",
            "status": {"token": token},
        }
        user = {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1",
                "command": sys.executable,
                "args": ["-c", f"print({json.dumps(json.dumps(credential))})"],
                "interactiveMode": "Never",
                "provideClusterInfo": False,
            }
        }
    else:
        user = {"token": token}
    context: dict[str, Any] = {"cluster": cluster_name, "user": user_name}
    if namespace:
        context["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "clusters": [{"name": cluster_name, "cluster": {"server": server_url}}],
        "users": [{"name": user_name, "user": user}],
        "contexts": [{"name": cluster_name, "context": context}],
        "current-context": cluster_name,
    }


def write_kubeconfig(
    path: str | Path,
    server_url: str,
    token: str,
    cluster_name: str,
    exec_plugin: bool = False,
    *,
    namespace: str | None = None,
) -> Path:
    """Write the kubeconfig YAML to ``path`` (mode 0600, like kubectl) and return the path.

    The server is plain ``http://`` (the fake serves no TLS), so there is no certificate-authority
    entry; token auth is ``users[].user.token``.
    """
    path = Path(path)
    data = kubeconfig_dict(server_url, token, cluster_name, exec_plugin=exec_plugin, namespace=namespace)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    path.chmod(0o600)
    return path
