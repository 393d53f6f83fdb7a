"""A small async REST client for the tests' writes to a real API server (aiohttp, bearer token, the
cluster's CA). Objects are plain dicts in Kubernetes JSON form, as with the fake's Python API."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Kind:
    prefix: str  # "api/v1" or "apis/GROUP/VERSION"
    plural: str
    namespaced: bool


KINDS: dict[str, Kind] = {
    "Namespace": Kind("api/v1", "namespaces", False),
    "Node": Kind("api/v1", "nodes", False),
    "Service": Kind("api/v1", "services", True),
    "Pod": Kind("api/v1", "pods", True),
    "Secret": Kind("api/v1", "secrets", True),
    "ConfigMap": Kind("api/v1", "configmaps", True),
    "ServiceAccount": Kind("api/v1", "serviceaccounts", True),
    "EndpointSlice": Kind("apis/discovery.k8s.io/v1", "endpointslices", True),
    "Deployment": Kind("apis/apps/v1", "deployments", True),
    "ClusterRole": Kind("apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": Kind("apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "Role": Kind("apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": Kind("apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "CustomResourceDefinition": Kind("apis/apiextensions.k8s.io/v1", "customresourcedefinitions", False),
    "ServiceExport": Kind("apis/multicluster.x-k8s.io/v1alpha1", "serviceexports", True),
    "ServiceImport": Kind("apis/multicluster.x-k8s.io/v1alpha1", "serviceimports", True),
    "TrafficSplit": Kind("apis/split.smi-spec.io/v1alpha2", "trafficsplits", True),
}


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:400]}")
        self.status = status
        self.body = body


def path_of(kind: str, namespace: str | None, name: str | None = None) -> str:
    k = KINDS[kind]
    path = f"/{k.prefix}"
    if k.namespaced and namespace:
        path += f"/namespaces/{namespace}"
    path += f"/{k.plural}"
    return f"{path}/{name}" if name else path


class Rest:
    """Writes and reads as one user (a bearer token) of one API server."""

    def __init__(self, url: str, ca_file: str, token: str) -> None:
        self.url = url
        self.token = token
        self._ssl = ssl.create_default_context(cafile=ca_file)

    async def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Obj:
        headers = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        timeout = aiohttp.ClientTimeout(total=30)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(
                method,
                self.url + path,
                data=json.dumps(body) if body is not None else None,
                headers={"Content-Type": "application/json", **headers} if body is not None else headers,
                ssl=self._ssl,
            ) as resp,
        ):
            text = await resp.text()
            if resp.status >= 300:
                raise ApiError(resp.status, text)
            if "json" not in resp.headers.get("Content-Type", ""):
                return {"text": text}  # /readyz and friends answer plain text
            result: Obj = json.loads(text) if text else {}
            return result

    async def wait_ready(self, timeout: float = 60.0, alive: Callable[[], bool] = lambda: True) -> None:
        """Until /readyz answers 200; ``alive`` false (the server's process exited) fails at once."""
        deadline = time.monotonic() + timeout
        while True:
            if not alive():
                raise RuntimeError(f"{self.url}: the API server exited")
            try:
                await self.request("GET", "/readyz")
                return
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.url} not ready in {timeout:.0f}s: {exc}") from exc
            await asyncio.sleep(0.1)

    @staticmethod
    def _where(obj: Mapping[str, Any]) -> tuple[str, str | None, str]:
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace") or ("default" if KINDS[obj["kind"]].namespaced else None)
        return obj["kind"], namespace, meta["name"]

    async def create(self, obj: Mapping[str, Any]) -> Obj:
        kind, namespace, _ = self._where(obj)
        return await self.request("POST", path_of(kind, namespace), obj)

    async def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        try:
            return await self.request("GET", path_of(kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def apply(self, obj: Mapping[str, Any]) -> Obj:
        """Server-side apply (create, or change only the fields given; a no-op if they are as given)."""
        kind, namespace, name = self._where(obj)
        path = f"{path_of(kind, namespace, name)}?fieldManager=isthmus-tests&force=true"
        headers = {"Content-Type": "application/apply-patch+yaml"}
        return await self.request("PATCH", path, obj, headers)

    async def replace(self, obj: Mapping[str, Any]) -> Obj:
        """Replace the existing object whole (PUT at its current resourceVersion)."""
        kind, namespace, name = self._where(obj)
        current = await self.get(kind, namespace, name)
        if current is None:
            raise ApiError(404, f"{kind} {namespace}/{name} not found")
        new = dict(obj)
        new["metadata"] = {**obj["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}
        return await self.request("PUT", path_of(kind, namespace, name), new)

    async def delete(self, kind: str, namespace: str | None, name: str) -> None:
        await self.request("DELETE", path_of(kind, namespace, name))

    async def apply_all(self, objs: list[Obj]) -> None:
        for obj in objs:
            await self.apply(obj)

    async def service_account_token(
        self,
        namespace: str,
        service_account: str,
        audience: str,
        seconds: int = 3600,
        pod: tuple[str, str] | None = None,
    ) -> str:
        """A service-account token from the TokenRequest API; bound to ``pod`` (name, uid) if given,
        as the kubelet's projected tokens are."""
        spec: dict[str, Any] = {"audiences": [audience], "expirationSeconds": seconds}
        if pod is not None:
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": pod[0], "uid": pod[1]}
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token"
        answer = await self.request("POST", path, body)
        return str(answer["status"]["token"])


async def forbidden(rest: Rest, method: str, path: str, body: Mapping[str, Any] | None = None) -> bool:
    """Whether ``rest``'s account is refused (403) ``method`` on ``path`` (a PATCH as a merge patch)."""
    headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else None
    try:
        await rest.request(method, path, body, headers)
    except ApiError as exc:
        return exc.status == 403
    return False
