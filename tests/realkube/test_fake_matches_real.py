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
