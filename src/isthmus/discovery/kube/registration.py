"""Registering member clusters: what ``isthmus cluster add | remove | list`` do to API servers.

``add NAME``, with the operator's kubeconfig of the member cluster:

1. In the member cluster: the namespace, the reader ServiceAccount and the two roles of
   deploy/member-cluster/rbac.yaml (packaged as isthmus/manifests/member-rbac.yaml), applied
   server-side (so ``add`` can run again), and a token Secret for the account
   (``kubernetes.io/service-account-token``, filled by the cluster's token controller: it lasts until
   the Secret is deleted, as istioctl's and linkerd's remote secrets do).
2. A kubeconfig of its own: the cluster's server URL (the operator's, or ``server``), its CA (from the
   token Secret, else the operator's kubeconfig) and that token. Never the operator's credentials,
   never an exec plugin. It is tried (a list of namespaces with it) before anything is written home.
3. In the home cluster: the member Secret ``isthmus-member-NAME`` (label
   ``isthmus.io/member-cluster=true``, key NAME: the kubeconfig) that discovery.kube.secrets watches;
   or, with ``dry_run``, the Secret is returned as YAML and the home cluster is not touched.

The operator's kubeconfig must not use an exec or auth-provider plugin unless ``allow_exec`` (its
plugin then runs here, as kubectl would run it; the member Secret never holds it). A member cluster
that cannot be reached fails before anything is made there.

``remove NAME`` deletes the member Secret (and with the member's kubeconfig, the token Secret and
the role bindings made by ``add``); ``registered`` lists the member Secrets of the home namespace.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio import client, config

from isthmus.discovery.kube.secrets import CLUSTER_NAME, MEMBER_LABEL

READER_NAMESPACE, READER = "isthmus-system", "isthmus-reader"
TOKEN_SECRET = "isthmus-reader-token"
FIELD_MANAGER = "isthmus"
MEMBER_SECRET_PREFIX = "isthmus-member-"

Obj = dict[str, Any]


class RegistrationError(RuntimeError):
    """``cluster add/remove`` cannot be done; the message says why and what was (not) changed."""


def member_objects() -> list[Obj]:
    """What a member cluster needs: deploy/member-cluster/rbac.yaml, and the reader's token Secret."""
    text = resources.files("isthmus").joinpath("manifests/member-rbac.yaml").read_text()
    objects: list[Obj] = [doc for doc in yaml.safe_load_all(text) if doc]
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": TOKEN_SECRET,
                "namespace": READER_NAMESPACE,
                "annotations": {"kubernetes.io/service-account.name": READER},
            },
            "type": "kubernetes.io/service-account-token",
        }
    )
    return objects


def member_secret(name: str, kubeconfig: str, namespace: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": MEMBER_SECRET_PREFIX + name,
            "namespace": namespace,
            "labels": {MEMBER_LABEL: "true"},
        },
        "type": "Opaque",
        "data": {name: base64.b64encode(kubeconfig.encode()).decode()},
    }


def reader_kubeconfig(name: str, server: str, ca_pem: bytes, token: str) -> str:
    """A kubeconfig holding only the reader's token and the cluster's CA."""
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": name,
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": f"{READER}@{name}", "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": f"{READER}@{name}"}}],
        "current-context": name,
    }
    return yaml.safe_dump(document, sort_keys=False)


# ---- the operator's kubeconfig -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """One cluster as the operator's kubeconfig reaches it."""

    path: str | None
    context: str | None
    server: str
    ca_pem: bytes


def read_target(path: str | None, context: str | None, allow_exec: bool) -> Target:
    """The context's server and CA, and refusal of plugins unless allowed (RegistrationError)."""
    file = Path(path) if path else Path(config.KUBE_CONFIG_DEFAULT_LOCATION).expanduser()
    try:
        document = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RegistrationError(f"kubeconfig {file}: {exc}") from None
    if not isinstance(document, dict):
        raise RegistrationError(f"kubeconfig {file}: not a kubeconfig")
    name = context or document.get("current-context")
    contexts = {c.get("name"): c.get("context") or {} for c in document.get("contexts") or []}
    if name not in contexts:
        raise RegistrationError(f"kubeconfig {file}: no context {name!r}")
    ctx = contexts[name]
    clusters = {c.get("name"): c.get("cluster") or {} for c in document.get("clusters") or []}
    users = {u.get("name"): u.get("user") or {} for u in document.get("users") or []}
    cluster, user = clusters.get(ctx.get("cluster"), {}), users.get(ctx.get("user"), {})
    for plugin in ("exec", "auth-provider"):
        if plugin in user and not allow_exec:
            raise RegistrationError(
                f"kubeconfig {file}, context {name!r}: its user authenticates with an {plugin} plugin; "
                "give a kubeconfig with a token or client certificate, or pass --allow-exec-auth to let "
                "this command run the plugin (the member Secret never contains it). Nothing was changed."
            )
    server = str(cluster.get("server") or "")
    if not server:
        raise RegistrationError(f"kubeconfig {file}, context {name!r}: its cluster has no server")
    ca_pem = b""
    if cluster.get("certificate-authority-data"):
        ca_pem = base64.b64decode(cluster["certificate-authority-data"])
    elif cluster.get("certificate-authority"):
        ca_file = Path(cluster["certificate-authority"])
        if not ca_file.is_absolute():
            ca_file = file.parent / ca_file
        try:
            ca_pem = ca_file.read_bytes()
        except OSError as exc:
            raise RegistrationError(f"kubeconfig {file}: certificate-authority: {exc}") from None
    return Target(str(file), name, server, ca_pem)


@contextlib.asynccontextmanager
async def _api(target: Target | None, request_timeout: float) -> AsyncIterator[client.ApiClient]:
    """A client for ``target`` (None: in-cluster, else the default kubeconfig)."""
    configuration = client.Configuration()
    if target is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            await config.load_kube_config(client_configuration=configuration)
    else:
        await config.load_kube_config(target.path, target.context, client_configuration=configuration)
    api = client.ApiClient(configuration)
    try:
        yield api
    finally:
        await api.close()


_PATHS = {
    ("v1", "Namespace"): "/api/v1/namespaces",
    ("v1", "ServiceAccount"): "/api/v1/namespaces/{namespace}/serviceaccounts",
    ("v1", "Secret"): "/api/v1/namespaces/{namespace}/secrets",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRoleBinding",
    ): "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
}


def _path(obj: Obj) -> str:
    meta = obj["metadata"]
    base = _PATHS[(obj["apiVersion"], obj["kind"])].format(namespace=meta.get("namespace", ""))
    return f"{base}/{meta['name']}"


async def _apply(api: client.ApiClient, obj: Obj, request_timeout: float) -> Obj:
    """Server-side apply of ``obj`` (field manager ``isthmus``, taking over its fields)."""
    answer = await api.call_api(
        _path(obj),
        "PATCH",
        query_params=[("fieldManager", FIELD_MANAGER), ("force", "true")],
        header_params={"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"},
        body=obj,
        response_types_map={200: "object", 201: "object"},
        auth_settings=["BearerToken"],
        _return_http_data_only=True,
        _request_timeout=request_timeout,
    )
    return dict(answer)


async def _call(api: client.ApiClient, method: str, path: str, request_timeout: float) -> Obj | None:
    """GET or DELETE ``path``: its answer, None when it does not exist (404)."""
    try:
        answer = await api.call_api(
            path,
            method,
            header_params={"Accept": "application/json"},
            response_types_map={200: "object"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _request_timeout=request_timeout,
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return dict(answer or {})


async def _get(api: client.ApiClient, path: str, request_timeout: float) -> Obj | None:
    return await _call(api, "GET", path, request_timeout)


async def _delete(api: client.ApiClient, path: str, request_timeout: float) -> bool:
    return await _call(api, "DELETE", path, request_timeout) is not None


def _why(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    if status:
        return f"{status} {getattr(exc, 'reason', '')}".strip()
    return f"{type(exc).__name__}: {exc}"


# ---- the commands ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Added:
    name: str
    secret: Obj  # the member Secret (written home unless dry run)
    written: bool


async def add(
    name: str,
    member: Target,
    home: Target | None,
    home_namespace: str,
    *,
    server: str | None = None,
    dry_run: bool = False,
    request_timeout: float = 10.0,
    token_wait: float = 30.0,
) -> Added:
    if not CLUSTER_NAME.match(name):
        raise RegistrationError(f"{name!r} is not a valid cluster name (a lowercase DNS label)")
    async with _api(member, request_timeout) as api:
        try:  # reachable, and the operator may act there, before anything is made
            await client.CoreV1Api(api).list_namespace(limit=1, _request_timeout=request_timeout)
        except (TimeoutError, client.ApiException, OSError) as exc:
            raise RegistrationError(
                f"member cluster {name} ({member.server}): {_why(exc)}. Nothing was changed."
            ) from None
        try:
            for obj in member_objects():
                await _apply(api, obj, request_timeout)
            token, ca_pem = await _token(api, request_timeout, token_wait)
        except (TimeoutError, client.ApiException, OSError) as exc:
            raise RegistrationError(
                f"member cluster {name}: {_why(exc)} while making the reader account (running "
                "`isthmus cluster add` again completes it; `isthmus cluster remove` undoes it)"
            ) from None
    kubeconfig = reader_kubeconfig(name, server or member.server, ca_pem or member.ca_pem, token)
    await _check(name, kubeconfig, request_timeout)
    secret = member_secret(name, kubeconfig, home_namespace)
    if dry_run:
        return Added(name, secret, written=False)
    async with _api(home, request_timeout) as api:
        try:
            await _apply(api, secret, request_timeout)
        except (TimeoutError, client.ApiException, OSError) as exc:
            raise RegistrationError(
                f"home cluster: writing Secret {home_namespace}/{secret['metadata']['name']}: {_why(exc)} "
                "(the member cluster's account is made; run the command again)"
            ) from None
    return Added(name, secret, written=True)


async def _token(api: client.ApiClient, request_timeout: float, wait: float) -> tuple[str, bytes]:
    """The reader's token and the cluster CA, once the token controller has filled the Secret."""
    path = f"/api/v1/namespaces/{READER_NAMESPACE}/secrets/{TOKEN_SECRET}"
    deadline = time.monotonic() + wait
    while True:
        secret = await _get(api, path, request_timeout) or {}
        data = secret.get("data") or {}
        if data.get("token"):
            return base64.b64decode(data["token"]).decode(), base64.b64decode(data.get("ca.crt") or "")
        if time.monotonic() > deadline:
            raise RegistrationError(
                f"the token controller did not fill Secret {READER_NAMESPACE}/{TOKEN_SECRET} in {wait:.0f}s "
                "(is kube-controller-manager running with --service-account-private-key-file?)"
            )
        await asyncio.sleep(0.2)


async def _check(name: str, kubeconfig: str, request_timeout: float) -> None:
    """The new kubeconfig works: it may list namespaces (its role grants it)."""
    configuration = client.Configuration()
    await config.load_kube_config_from_dict(yaml.safe_load(kubeconfig), client_configuration=configuration)
    async with client.ApiClient(configuration) as api:
        try:
            await client.CoreV1Api(api).list_namespace(limit=1, _request_timeout=request_timeout)
        except (TimeoutError, client.ApiException, OSError) as exc:
            raise RegistrationError(
                f"member cluster {name}: the reader's kubeconfig does not work ({_why(exc)}); if the server "
                "URL the home cluster uses differs from yours, give it with --server"
            ) from None


async def remove(
    name: str,
    home: Target | None,
    home_namespace: str,
    member: Target | None = None,
    request_timeout: float = 10.0,
) -> list[str]:
    """Delete the member Secret (and, with ``member``, what ``add`` made there but the namespace and
    roles, which other tools may share); returns what was deleted."""
    done = []
    async with _api(home, request_timeout) as api:
        secret = f"/api/v1/namespaces/{home_namespace}/secrets/{MEMBER_SECRET_PREFIX}{name}"
        if await _delete(api, secret, request_timeout):
            done.append(f"home: Secret {home_namespace}/{MEMBER_SECRET_PREFIX}{name}")
    if member is not None:
        async with _api(member, request_timeout) as api:
            for obj in reversed(member_objects()):
                kind = obj["kind"]
                if kind in ("Secret", "ClusterRoleBinding", "ServiceAccount") and await _delete(
                    api, _path(obj), request_timeout
                ):
                    done.append(f"{name}: {kind} {obj['metadata']['name']}")
    if not done:
        raise RegistrationError(f"no member cluster {name} registered in namespace {home_namespace}")
    return done


async def registered(
    home: Target | None, home_namespace: str, request_timeout: float = 10.0
) -> list[tuple[str, str]]:
    """(cluster, source) for every cluster the labelled Secrets of the home namespace declare."""
    async with _api(home, request_timeout) as api:
        found = await client.CoreV1Api(api).list_namespaced_secret(
            home_namespace, label_selector=f"{MEMBER_LABEL}=true", _request_timeout=request_timeout
        )
    out = []
    for secret in found.items:
        for key in sorted(secret.data or {}):
            out.append((key, f"secret {home_namespace}/{secret.metadata.name}"))
    return sorted(out)
