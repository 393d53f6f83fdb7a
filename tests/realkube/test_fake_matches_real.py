"""The fake API server (tests/kubeapi) answers as a real kube-apiserver does, for every answer
discovery depends on: the same requests to both, the same status, body kind (a Status in JSON, or
plain text) and Status reason. Where they differ on purpose, docs/testing.md says so."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from kubeapi.server import FakeKubeApi
from realkube.cluster import RealCluster
from realkube.crds import SERVICE_EXPORT

pytestmark = pytest.mark.realkube


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: str  # "json:<kind>/<reason>" or "text:<first line>"


class Client:
    def __init__(self, url: str, token: str, context: ssl.SSLContext | None) -> None:
        self.url, self.token, self.context = url, token, context

    async def get(self, path: str, token: str | None = None) -> tuple[Answer, list[dict[str, Any]]]:
        """The answer to a GET, and for a watch the events received (it is ended after 2 s)."""
        headers = {"Authorization": f"Bearer {token if token is not None else self.token}"}
        events: list[dict[str, Any]] = []
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(self.url + path, headers=headers, ssl=self.context or False) as resp,
        ):
            if "watch=1" in path and resp.status == 200:
                try:
                    async with asyncio.timeout(2):
                        async for line in resp.content:
                            if line.strip():
                                events.append(json.loads(line))
                except TimeoutError:
                    pass
                return Answer(200, "json:watch"), events
            text = await resp.text()
        if "json" in resp.headers.get("Content-Type", ""):
            doc = json.loads(text)
            return Answer(resp.status, f"json:{doc.get('kind')}/{doc.get('reason', '')}"), events
        return Answer(resp.status, "text:" + text.strip().splitlines()[0]), events


@pytest.fixture
async def fake() -> AsyncIterator[FakeKubeApi]:
    api = FakeKubeApi(serviceexports_installed=False)
    await api.start()
    yield api
    await api.stop()


REQUESTS = {
    "list": "/api/v1/services",
    "get a missing object": "/api/v1/namespaces/default/services/nope",
    "unknown resource of a served group": "/apis/discovery.k8s.io/v1/nopes",
    "a CRD that is not installed": "/apis/multicluster.x-k8s.io/v1alpha1/serviceexports",
    "a group nobody serves": "/apis/nope.example/v1/things",
}


async def test_the_fake_answers_as_the_real_api_server(
    real_clusters: dict[str, RealCluster], fake: FakeKubeApi
) -> None:
    real = real_clusters["c"]
    assert await real.admin.get("CustomResourceDefinition", None, SERVICE_EXPORT["metadata"]["name"]) is None
    clients = {
        "real": Client(real.url, real.admin_token, ssl.create_default_context(cafile=str(real.pki.ca_cert))),
        "fake": Client(fake.url, fake.token, None),
    }
    answers: dict[str, dict[str, Answer]] = {"real": {}, "fake": {}}
    for side, c in clients.items():
        for what, path in REQUESTS.items():
            answers[side][what] = (await c.get(path))[0]
        answers[side]["no token"] = (await c.get("/api/v1/services", token="not-a-token"))[0]
    assert answers["fake"] == answers["real"]


def shape(value: Any) -> Any:
    """The keys of a JSON document, recursively (values dropped; lists by their first item)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


async def test_the_fakes_token_reviews_answer_in_the_real_shape(
    real_clusters: dict[str, RealCluster], fake: FakeKubeApi, namespace: str
) -> None:
    """A TokenReview of a pod-bound token, of a token for another audience and of garbage: the
    same status code and the same document shape (and the same error wording, up to the names)."""
    real = real_clusters["c"]
    await real.admin.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web", "namespace": namespace}}
    )
    pod = await real.admin.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": namespace},
            "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "x.invalid/app"}]},
        }
    )
    fake_pod = fake.create(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": namespace}, "spec": {}}
    )
    bound = (pod["metadata"]["name"], pod["metadata"]["uid"])
    tokens = {
        "real": {
            "pod-bound": await real.admin.service_account_token(namespace, "web", "isthmus", 600, bound),
            "another audience": await real.admin.service_account_token(namespace, "web", "elsewhere", 600),
            "garbage": "not-a-token",
        },
        "fake": {
            "pod-bound": fake.issue_token(namespace, "web", pod=("web-1", fake_pod["metadata"]["uid"])),
            "another audience": fake.issue_token(namespace, "web", audiences=("elsewhere",)),
            "garbage": "not-a-token",
        },
    }
    urls = {"real": (real.url, real.admin_token), "fake": (fake.url, fake.token)}
    context = ssl.create_default_context(cafile=str(real.pki.ca_cert))
    answers: dict[str, dict[str, Any]] = {"real": {}, "fake": {}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for side, (url, admin) in urls.items():
            for what, token in tokens[side].items():
                body = {
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenReview",
                    "spec": {"token": token, "audiences": ["isthmus"]},
                }
                async with session.post(
                    f"{url}/apis/authentication.k8s.io/v1/tokenreviews",
                    json=body,
                    headers={"Authorization": f"Bearer {admin}"},
                    ssl=context if side == "real" else False,
                ) as resp:
                    answers[side][what] = (resp.status, await resp.json())
    for what in tokens["real"]:
        real_status, real_doc = answers["real"][what]
        fake_status, fake_doc = answers["fake"][what]
        assert fake_status == real_status, what
        real_shape, fake_shape = shape(real_doc["status"]), shape(fake_doc["status"])
        assert fake_shape.keys() == real_shape.keys(), (what, real_doc, fake_doc)
        # The fake's user has what discovery reads; the real one may say more (the node of the pod).
        assert fake_shape["user"].keys() <= real_shape["user"].keys(), what
    real_user = answers["real"]["pod-bound"][1]["status"]["user"]
    fake_user = answers["fake"]["pod-bound"][1]["status"]["user"]
    assert fake_user["username"] == real_user["username"]
    assert set(fake_user["groups"]) == set(real_user["groups"])
    for key in ("authentication.kubernetes.io/pod-name", "authentication.kubernetes.io/pod-uid"):
        assert key in real_user["extra"], key
        assert key in fake_user["extra"], key
    assert "is invalid for the target audiences" in answers["real"]["another audience"][1]["status"]["error"]
    assert "is invalid for the target audiences" in answers["fake"]["another audience"][1]["status"]["error"]
