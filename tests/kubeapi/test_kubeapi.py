"""FakeKubeApi against the real kubernetes_asyncio client: REST, watch, bookmarks, 410, auth and faults.

Behaviours of kubernetes_asyncio 36.1 (``watch.Watch``) that these tests pin and the product's
watcher relies on:

* Watch mode. ``Watch.stream(func, ...)`` is "watch forever" when ``timeout_seconds`` is NOT passed
  to ``stream``: a clean end of the HTTP stream (server timeout, ``drop_watches(abrupt=False)``) or a
  client read timeout (``asyncio.TimeoutError`` from ``readline``) makes it silently reconnect with
  the last resourceVersion it saw (event or bookmark). With ``timeout_seconds`` the iteration just
  ends (``StopAsyncIteration``) when the server closes the stream, and a read timeout is raised.
* BOOKMARK events are yielded to the caller: ``{"type": "BOOKMARK", "object": <raw dict>,
  "raw_object": <same dict>}`` (never deserialized into a model); ``Watch.resource_version`` is
  updated from ``object.metadata.resourceVersion``. Other events' ``object`` is the model
  (``V1Service``...), or a dict for CustomObjectsApi.
* An ``ERROR`` event is raised as ``ApiException(status=<object.code>, reason="<reason>: <message>")``
  with ``body=None``: 410 gives ``status=410, reason="Expired: too old resource version: X (Y)"``.
  Watching forever it first reconnects once with the same resourceVersion (a second request, which
  gets 410 again) and then raises; with ``timeout_seconds`` it raises at once. The Watch closes itself.
* The watch request is made with ``_preload_content=False``, so an HTTP error status does not raise
  by itself: the Status body is read as a line and, having ``code`` but no ``type``/``object``, is
  raised as ``ApiException(status=code, reason="<reason>: <message>")`` (401, 403, 404, 500...).
  Plain list/get calls raise ``ApiException`` with ``status``, ``reason`` (HTTP phrase) and ``body``
  (the Status JSON).
* Transport failures are not wrapped: connection refused is ``aiohttp.ClientConnectorError``; a
  stream cut mid-way (server killed, ``drop_watches()``) is ``aiohttp.ClientPayloadError`` out of the
  watch iteration even when watching forever; ``_request_timeout=<number>`` is a TOTAL timeout
  (``TimeoutError``, also for a watch: it cuts long streams) while ``_request_timeout=(connect, read)``
  sets ``sock_read`` (``aiohttp.SocketTimeoutError``, a ``TimeoutError``). When watching forever a read
  timeout reconnects, and if that reconnect request itself times out the error is raised.
* Without ``_request_timeout`` nothing times out: a hung server blocks the caller forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from .kubeconfig import write_kubeconfig
from .server import FakeKubeApi, KubeApiError

pytestmark = pytest.mark.timeout(30)

MCS = ("multicluster.x-k8s.io", "v1alpha1")


def service(
    name: str, namespace: str = "default", labels: dict[str, str] | None = None, port: int = 80
) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {"ports": [{"name": "http", "port": port, "protocol": "TCP"}], "type": "ClusterIP"},
    }


def pod(name: str, namespace: str = "default", node: str = "n1") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.1"},
    }


def endpoint_slice(name: str, service_name: str, addresses: list[str], namespace: str = "default") -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}, "zone": "z1"} for a in addresses],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def service_export(name: str, namespace: str = "default") -> dict:
    return {
        "apiVersion": "multicluster.x-k8s.io/v1alpha1",
        "kind": "ServiceExport",
        "metadata": {"name": name, "namespace": namespace},
    }


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Cluster:
    """Starts FakeKubeApi instances and real clients for them; stops and closes all at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.servers: list[FakeKubeApi] = []
        self.clients: list[client.ApiClient] = []

    async def server(self, **kwargs: Any) -> FakeKubeApi:
        api = FakeKubeApi(**kwargs)
        self.servers.append(api)
        await api.start()
        return api

    async def client(
        self, api: FakeKubeApi, token: str | None = None, name: str = "east", exec_plugin: bool = False
    ) -> client.ApiClient:
        path = write_kubeconfig(
            self.tmp_path / f"{name}-{len(self.clients)}.yaml", api.url, token or api.token, name, exec_plugin
        )
        cfg = client.Configuration()
        await config.load_kube_config(config_file=str(path), client_configuration=cfg, persist_config=False)
        api_client = client.ApiClient(configuration=cfg)
        self.clients.append(api_client)
        return api_client

    async def close(self) -> None:
        for api_client in self.clients:
            await api_client.close()
        for api in self.servers:
            await api.stop()


@pytest.fixture
async def kube(tmp_path: Path) -> AsyncIterator[Cluster]:
    cluster = Cluster(tmp_path)
    try:
        yield cluster
    finally:
        await cluster.close()


class Consumer:
    """Runs a watch stream in a task and records what it yields and how it ended."""

    def __init__(self, func: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> None:
        self.events: list[dict] = []
        self.error: BaseException | None = None
        self.ended = asyncio.Event()
        self.watch = watch.Watch()
        self.task = asyncio.create_task(self._run(func, args, kwargs))

    async def _run(self, func: Callable[..., Awaitable[Any]], args: tuple, kwargs: dict) -> None:
        try:
            async with self.watch:
                async for event in self.watch.stream(func, *args, **kwargs):
                    self.events.append(event)
        except Exception as exc:
            self.error = exc
        finally:
            self.ended.set()

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def names(self) -> list[tuple[str, str]]:
        return [(e["type"], e["raw_object"]["metadata"].get("name", "")) for e in self.events]

    async def wait_ended(self, within: float = 5.0) -> None:
        await asyncio.wait_for(self.ended.wait(), within)

    async def cancel(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def consumers() -> AsyncIterator[Callable[..., Consumer]]:
    started: list[Consumer] = []

    def start(func: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Consumer:
        consumer = Consumer(func, *args, **kwargs)
        started.append(consumer)
        return consumer

    yield start
    for consumer in started:
        await consumer.cancel()


async def drain(func: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> list[dict]:
    """Run one Watch over ``func`` to its end and return every event it yielded."""
    async with watch.Watch() as w:
        return [event async for event in w.stream(func, *args, **kwargs)]


def watch_requests(api: FakeKubeApi) -> list[dict[str, str]]:
    return [dict(r.query) for r in api.requests if r.watch]


# --- list and watch -------------------------------------------------------------------------------


async def test_list_then_watch_from_its_resource_version_sees_changes_in_order(
    kube: Cluster, consumers
) -> None:
    api = await kube.server()
    api.create(service("a", "shop"))
    api.create(service("b", "shop"))
    api.create(service("c", "blog"))
    v1 = client.CoreV1Api(await kube.client(api))

    listed = await v1.list_service_for_all_namespaces()
    assert listed.metadata.resource_version == api.resource_version == "4"
    assert [(s.metadata.namespace, s.metadata.name) for s in listed.items] == [
        ("blog", "c"),
        ("shop", "a"),
        ("shop", "b"),
    ]
    assert [s.metadata.resource_version for s in listed.items] == ["4", "2", "3"]
    assert all(s.metadata.uid for s in listed.items)
    assert all(s.metadata.creation_timestamp for s in listed.items)

    stream = consumers(
        v1.list_service_for_all_namespaces,
        resource_version=listed.metadata.resource_version,
        timeout_seconds=10,
    )
    await until(lambda: api.open_watches == 1)
    api.create(service("d", "shop"))
    updated = api.update({**api.get("services", "shop", "a"), "spec": {"ports": [{"port": 81}]}})
    deleted = api.delete("services", "shop", "b")
    await until(lambda: len(stream.events) == 3)

    assert stream.names() == [("ADDED", "d"), ("MODIFIED", "a"), ("DELETED", "b")]
    versions = [int(e["object"].metadata.resource_version) for e in stream.events]
    assert versions == [5, 6, 7] == sorted(versions)
    assert stream.events[1]["object"].spec.ports[0].port == 81
    assert updated["metadata"]["uid"] == stream.events[1]["object"].metadata.uid
    # DELETED carries the last state with the deletion's resourceVersion.
    assert deleted["metadata"]["resourceVersion"] == "7"
    assert stream.watch.resource_version == "7"
    # Namespaced list and list of one namespace.
    shop = await v1.list_namespaced_service("shop")
    assert [s.metadata.name for s in shop.items] == ["a", "d"]
    assert shop.metadata.resource_version == "7"


async def test_watch_from_history_replays_missed_events(kube: Cluster) -> None:
    api = await kube.server()
    api.create(service("a"))
    v1 = client.CoreV1Api(await kube.client(api))
    rv = (await v1.list_namespaced_service("default")).metadata.resource_version
    # Changes while nobody watches are replayed from the watch history.
    api.create(service("b"))
    api.delete("services", "default", "a")
    api.create(pod("p"))  # other kinds share the RV counter but not the stream
    events = await drain(v1.list_namespaced_service, "default", resource_version=rv, timeout_seconds=1)
    seen = [(e["type"], e["object"].metadata.name) for e in events]
    assert seen == [("ADDED", "b"), ("DELETED", "a")]


async def test_watch_without_resource_version_starts_with_synthetic_added(kube: Cluster, consumers) -> None:
    api = await kube.server()
    api.create(service("b"))
    api.create(service("a"))
    v1 = client.CoreV1Api(await kube.client(api))
    for rv in (None, "0"):
        kwargs = {} if rv is None else {"resource_version": rv}
        stream = consumers(v1.list_service_for_all_namespaces, timeout_seconds=10, **kwargs)
        await until(lambda s=stream: len(s.events) == 2)
        # Current objects as ADDED (key order, each with its own resourceVersion), then live changes.
        assert stream.names() == [("ADDED", "a"), ("ADDED", "b")]
        own = [api.get("services", "default", n)["metadata"]["resourceVersion"] for n in ("a", "b")]
        assert [e["object"].metadata.resource_version for e in stream.events] == own
        api.update(service("a", port=90 if rv is None else 91))
        await until(lambda s=stream: len(s.events) == 3)
        assert stream.types()[-1] == "MODIFIED"
        await stream.cancel()


async def test_send_initial_events_ends_with_annotated_bookmark(kube: Cluster) -> None:
    api = await kube.server()
    api.create(service("a"))
    v1 = client.CoreV1Api(await kube.client(api))
    async with watch.Watch() as w:
        events = []
        async for event in w.stream(
            v1.list_service_for_all_namespaces,
            send_initial_events=True,
            resource_version_match="NotOlderThan",
            allow_watch_bookmarks=True,
            timeout_seconds=1,
        ):
            events.append(event)
            if event["type"] == "BOOKMARK":
                break
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


# --- bookmarks, timeouts, 410 -----------------------------------------------------------------------


async def test_bookmarks_carry_the_servers_current_resource_version(kube: Cluster, consumers) -> None:
    api = await kube.server(bookmark_interval=0.2)
    api.create(service("a"))
    v1 = client.CoreV1Api(await kube.client(api))
    rv = (await v1.list_service_for_all_namespaces()).metadata.resource_version
    stream = consumers(
        v1.list_service_for_all_namespaces,
        resource_version=rv,
        allow_watch_bookmarks=True,
        timeout_seconds=10,
    )
    await until(lambda: "BOOKMARK" in stream.types())
    bookmark = stream.events[0]
    assert bookmark["type"] == "BOOKMARK"
    # Yielded as a raw dict, not a V1Service; Watch.resource_version follows it.
    assert (
        bookmark["object"]
        == bookmark["raw_object"]
        == {
            "kind": "Service",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": "2"},
        }
    )
    # A write to another kind moves the global RV; the next bookmark carries it, so a watcher
    # resuming from it skips nothing of its own kind.
    created = api.create(pod("p"))
    count = len(stream.events)
    await until(lambda: len(stream.events) > count)
    assert stream.events[-1]["type"] == "BOOKMARK"
    assert (
        stream.events[-1]["object"]["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    )
    assert stream.watch.resource_version == "3"

    quiet = consumers(v1.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=1)
    await quiet.wait_ended()
    assert quiet.events == []  # no bookmarks unless asked for
    assert quiet.error is None


async def test_timeout_seconds_ends_the_stream_cleanly(kube: Cluster) -> None:
    api = await kube.server()
    v1 = client.CoreV1Api(await kube.client(api))
    started = time.monotonic()
    events = await drain(v1.list_service_for_all_namespaces, timeout_seconds=1)
    elapsed = time.monotonic() - started
    assert events == []
    assert 0.9 <= elapsed < 3
    assert watch_requests(api)[0]["timeoutSeconds"] == "1"


async def test_watch_forever_reconnects_from_last_resource_version(kube: Cluster, consumers) -> None:
    # No timeout_seconds: the server ends the stream after default_watch_timeout and the client
    # reconnects by itself, resuming from the last resourceVersion it saw.
    api = await kube.server(default_watch_timeout=0.5)
    v1 = client.CoreV1Api(await kube.client(api))
    rv = (await v1.list_service_for_all_namespaces()).metadata.resource_version
    stream = consumers(v1.list_service_for_all_namespaces, resource_version=rv)
    await until(lambda: api.open_watches == 1)
    api.create(service("a"))
    await until(lambda: len(stream.events) == 1)
    await until(lambda: len(watch_requests(api)) >= 2)
    api.create(service("b"))
    await until(lambda: len(stream.events) == 2)
    assert stream.names() == [("ADDED", "a"), ("ADDED", "b")]
    requests = watch_requests(api)
    assert requests[0]["resourceVersion"] == rv
    assert requests[1]["resourceVersion"] == "2"  # the ADDED a event's RV
    assert stream.error is None


async def test_expired_resource_version_is_410_after_compaction(kube: Cluster) -> None:
    api = await kube.server()
    api.create(service("a"))
    api.create(service("b"))
    v1 = client.CoreV1Api(await kube.client(api))
    old = (await v1.list_service_for_all_namespaces()).metadata.resource_version  # "3"
    api.delete("services", "default", "b")
    api.compact()

    # With timeout_seconds: raised at once.
    with pytest.raises(ApiException) as info:
        await drain(v1.list_service_for_all_namespaces, resource_version=old, timeout_seconds=5)
    assert info.value.status == 410
    assert info.value.reason == "Expired: too old resource version: 3 (4)"
    assert info.value.body is None
    assert len(watch_requests(api)) == 1

    # Watching forever: one silent retry with the same RV, then raised.
    with pytest.raises(ApiException) as info:
        await drain(v1.list_service_for_all_namespaces, resource_version=old)
    assert info.value.status == 410
    assert [q["resourceVersion"] for q in watch_requests(api)[1:]] == ["3", "3"]

    # After compaction the deletion is no longer replayable: the client must relist and infer it.
    relisted = await v1.list_service_for_all_namespaces()
    assert [s.metadata.name for s in relisted.items] == ["a"]
    assert relisted.metadata.resource_version == "4"
    # A list with an old RV and NotOlderThan serves the current state; Exact needs the history.
    current = await v1.list_service_for_all_namespaces(
        resource_version=old, resource_version_match="NotOlderThan"
    )
    assert [s.metadata.name for s in current.items] == ["a"]
    with pytest.raises(ApiException) as info:
        await v1.list_service_for_all_namespaces(resource_version=old, resource_version_match="Exact")
    assert info.value.status == 410


async def test_expired_watch_on_the_wire_is_200_then_one_error_event(kube: Cluster) -> None:
    api = await kube.server()
    api.create(service("a"))
    api.compact()
    headers = {"Authorization": f"Bearer {api.token}"}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.get(f"{api.url}/api/v1/services?watch=true&resourceVersion=1") as response,
    ):
        assert response.status == 200
        assert response.headers["Transfer-Encoding"] == "chunked"
        lines = [line async for line in response.content]
    assert len(lines) == 1
    event = yaml.safe_load(lines[0])
    assert event == {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "too old resource version: 1 (2)",
            "reason": "Expired",
            "code": 410,
        },
    }


async def test_history_window_bounds_replay_and_exact_lists(kube: Cluster) -> None:
    api = await kube.server(history=2)
    for name in ("a", "b", "c"):
        api.create(service(name))  # RVs 2, 3, 4; the window keeps 3 and 4
    api.delete("services", "default", "c")  # RV 5; the window keeps 4 and 5
    v1 = client.CoreV1Api(await kube.client(api))
    with pytest.raises(ApiException) as info:
        await drain(v1.list_service_for_all_namespaces, resource_version="2", timeout_seconds=1)
    assert info.value.reason == "Expired: too old resource version: 2 (3)"
    events = await drain(v1.list_service_for_all_namespaces, resource_version="3", timeout_seconds=1)
    seen = [(e["type"], e["object"].metadata.name) for e in events]
    assert seen == [("ADDED", "c"), ("DELETED", "c")]
    # An Exact list inside the window is the state at that RV.
    at4 = await v1.list_service_for_all_namespaces(resource_version="4", resource_version_match="Exact")
    assert [s.metadata.name for s in at4.items] == ["a", "b", "c"]
    assert at4.metadata.resource_version == "4"


async def test_resource_version_ahead_of_the_server_is_504(kube: Cluster) -> None:
    api = await kube.server(too_large_rv_wait=0.2)
    v1 = client.CoreV1Api(await kube.client(api))
    with pytest.raises(ApiException) as info:
        await v1.list_service_for_all_namespaces(resource_version="100")
    assert info.value.status == 504
    assert "Too large resource version: 100, current: 1" in info.value.body
    with pytest.raises(ApiException) as info:
        await drain(v1.list_service_for_all_namespaces, resource_version="100", timeout_seconds=1)
    assert info.value.status == 504


# --- selectors, get, paging, discovery --------------------------------------------------------------


async def test_label_and_field_selectors(kube: Cluster) -> None:
    api = await kube.server()
    api.create(service("web", "shop", {"app": "web", "tier": "front"}))
    api.create(service("api", "shop", {"app": "api", "tier": "back", "canary": "yes"}))
    api.create(service("db", "data", {"app": "db"}))
    v1 = client.CoreV1Api(await kube.client(api))

    async def names(**kwargs: Any) -> list[str]:
        return [s.metadata.name for s in (await v1.list_service_for_all_namespaces(**kwargs)).items]

    assert await names(label_selector="app=web") == ["web"]
    assert await names(label_selector="app==web") == ["web"]
    assert await names(label_selector="app!=web") == ["db", "api"]
    assert await names(label_selector="tier") == ["api", "web"]
    assert await names(label_selector="!tier") == ["db"]
    assert await names(label_selector="tier in (front, back),!canary") == ["web"]
    assert await names(label_selector="app notin (web,db)") == ["api"]
    assert await names(field_selector="metadata.name=db") == ["db"]
    assert await names(field_selector="metadata.namespace!=shop") == ["db"]
    assert await names(field_selector="metadata.namespace=shop", label_selector="tier=back") == ["api"]
    with pytest.raises(ApiException) as info:
        await names(field_selector="spec.type=ClusterIP")
    assert info.value.status == 400
    assert "field label not supported: spec.type" in info.value.body
    with pytest.raises(ApiException) as info:
        await names(label_selector="app in web")
    assert info.value.status == 400
    api.create(pod("p1", node="n1"))
    api.create(pod("p2", node="n2"))
    pods = await v1.list_pod_for_all_namespaces(field_selector="spec.nodeName=n2")
    assert [p.metadata.name for p in pods.items] == ["p2"]


async def test_filtered_watch_turns_selector_transitions_into_added_and_deleted(
    kube: Cluster, consumers
) -> None:
    api = await kube.server()
    api.create(service("a", labels={"mesh": "on"}))
    v1 = client.CoreV1Api(await kube.client(api))
    rv = (await v1.list_service_for_all_namespaces(label_selector="mesh=on")).metadata.resource_version
    stream = consumers(
        v1.list_service_for_all_namespaces, label_selector="mesh=on", resource_version=rv, timeout_seconds=10
    )
    await until(lambda: api.open_watches == 1)
    api.update(service("a", labels={"mesh": "off"}))
    api.create(service("b", labels={"mesh": "off"}))
    api.update(service("b", labels={"mesh": "on"}))
    api.update(service("b", labels={"mesh": "on"}, port=81))
    await until(lambda: len(stream.events) == 3)
    assert stream.names() == [("DELETED", "a"), ("ADDED", "b"), ("MODIFIED", "b")]


async def test_get_one_object_and_not_found(kube: Cluster) -> None:
    api = await kube.server()
    api.create(service("web", "shop"))
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"x": "y"}}})
    api.create(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/region": "r1"}},
        }
    )
    api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s", "namespace": "shop"},
            "type": "Opaque",
        }
    )
    v1 = client.CoreV1Api(await kube.client(api))
    assert (await v1.read_namespaced_service("web", "shop")).metadata.name == "web"
    assert (await v1.read_namespace("shop")).metadata.labels == {"x": "y"}
    assert (await v1.read_node("n1")).metadata.labels["topology.kubernetes.io/region"] == "r1"
    assert (await v1.read_namespaced_secret("s", "shop")).type == "Opaque"
    assert [n.metadata.name for n in (await v1.list_namespace()).items] == ["shop"]
    assert (await v1.list_namespaced_secret("shop", field_selector="type=Opaque")).items
    with pytest.raises(ApiException) as info:
        await v1.read_namespaced_service("nope", "shop")
    assert info.value.status == 404
    assert yaml.safe_load(info.value.body) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'services "nope" not found',
        "reason": "NotFound",
        "details": {"name": "nope", "kind": "services"},
        "code": 404,
    }
    with pytest.raises(ApiException) as info:
        await v1.delete_namespaced_service("web", "shop")
    assert info.value.status == 405  # writes go through the Python API only


async def test_limit_and_continue_page_one_snapshot(kube: Cluster) -> None:
    api = await kube.server()
    for name in ("a", "b", "c", "d", "e"):
        api.create(service(name))
    v1 = client.CoreV1Api(await kube.client(api))
    first = await v1.list_namespaced_service("default", limit=2)
    assert [s.metadata.name for s in first.items] == ["a", "b"]
    assert first.metadata.remaining_item_count == 3
    api.delete("services", "default", "d")  # not visible to the paged snapshot
    second = await v1.list_namespaced_service("default", limit=2, _continue=first.metadata._continue)
    third = await v1.list_namespaced_service("default", limit=2, _continue=second.metadata._continue)
    assert [s.metadata.name for s in second.items + third.items] == ["c", "d", "e"]
    assert third.metadata._continue is None
    assert first.metadata.resource_version == third.metadata.resource_version == "6"
    api.compact()
    with pytest.raises(ApiException) as info:
        await v1.list_namespaced_service("default", limit=2, _continue=first.metadata._continue)
    assert info.value.status == 410


async def test_discovery_and_version(kube: Cluster) -> None:
    api = await kube.server(git_version="v1.30.2")
    api_client = await kube.client(api)
    version = await client.VersionApi(api_client).get_code()
    assert (version.major, version.minor, version.git_version) == ("1", "30", "v1.30.2")
    assert (await client.CoreApi(api_client).get_api_versions()).versions == ["v1"]
    groups = {g.name for g in (await client.ApisApi(api_client).get_api_versions()).groups}
    assert groups == {"discovery.k8s.io", "multicluster.x-k8s.io"}
    core = {r.name for r in (await client.CoreV1Api(api_client).get_api_resources()).resources}
    assert core == {"namespaces", "nodes", "services", "pods", "secrets", "serviceaccounts"}
    slices = (await client.DiscoveryV1Api(api_client).get_api_resources()).resources
    assert [(r.name, r.kind, r.namespaced) for r in slices] == [("endpointslices", "EndpointSlice", True)]


# --- EndpointSlices and ServiceExports --------------------------------------------------------------


async def test_endpointslices_list_and_watch(kube: Cluster, consumers) -> None:
    api = await kube.server()
    api.create(endpoint_slice("web-abc", "web", ["10.0.0.1"]))
    api.create(endpoint_slice("db-xyz", "db", ["10.0.0.9"]))
    discovery = client.DiscoveryV1Api(await kube.client(api))
    listed = await discovery.list_endpoint_slice_for_all_namespaces(
        label_selector="kubernetes.io/service-name=web"
    )
    assert [s.metadata.name for s in listed.items] == ["web-abc"]
    assert listed.items[0].endpoints[0].addresses == ["10.0.0.1"]
    stream = consumers(
        discovery.list_namespaced_endpoint_slice,
        "default",
        label_selector="kubernetes.io/service-name=web",
        resource_version=listed.metadata.resource_version,
        timeout_seconds=10,
    )
    await until(lambda: api.open_watches == 1)
    api.update(endpoint_slice("web-abc", "web", ["10.0.0.1", "10.0.0.2"]))
    api.update(endpoint_slice("db-xyz", "db", ["10.0.0.8"]))
    api.delete("endpointslices", "default", "web-abc")
    await until(lambda: len(stream.events) == 2)
    assert stream.names() == [("MODIFIED", "web-abc"), ("DELETED", "web-abc")]
    assert [e.addresses[0] for e in stream.events[0]["object"].endpoints] == ["10.0.0.1", "10.0.0.2"]


async def test_serviceexports_installed_list_and_watch(kube: Cluster, consumers) -> None:
    api = await kube.server()
    api.create(service_export("web", "shop"))
    custom = client.CustomObjectsApi(await kube.client(api))
    listed = await custom.list_cluster_custom_object(*MCS, "serviceexports")
    assert listed["kind"] == "ServiceExportList"
    # Custom resources keep kind/apiVersion in list items (built-in kinds do not).
    assert [(i["kind"], i["metadata"]["name"]) for i in listed["items"]] == [("ServiceExport", "web")]
    one = await custom.get_namespaced_custom_object(*MCS, "shop", "serviceexports", "web")
    assert one["metadata"]["namespace"] == "shop"
    stream = consumers(
        custom.list_cluster_custom_object,
        *MCS,
        "serviceexports",
        resource_version=listed["metadata"]["resourceVersion"],
        timeout_seconds=10,
    )
    await until(lambda: api.open_watches == 1)
    api.create(service_export("api", "shop"))
    api.delete("serviceexports", "shop", "web")
    await until(lambda: len(stream.events) == 2)
    assert stream.names() == [("ADDED", "api"), ("DELETED", "web")]
    assert isinstance(stream.events[0]["object"], dict)  # CustomObjectsApi: plain dicts

    # Removing the CRD: its objects are deleted (DELETED events), then its watches end cleanly.
    api.set_installed("serviceexports", False)
    await stream.wait_ended()
    assert stream.names()[-1] == ("DELETED", "api")
    assert stream.error is None
    with pytest.raises(ApiException) as info:
        await custom.list_cluster_custom_object(*MCS, "serviceexports")
    assert info.value.status == 404


async def test_serviceexports_not_installed_is_404(kube: Cluster) -> None:
    api = await kube.server(serviceexports_installed=False)
    api_client = await kube.client(api)
    custom = client.CustomObjectsApi(api_client)
    with pytest.raises(ApiException) as info:
        await custom.list_cluster_custom_object(*MCS, "serviceexports")
    assert info.value.status == 404
    assert info.value.body == "404 page not found\n"  # plain text, as kube-apiserver's mux answers
    with pytest.raises(ApiException) as info:
        await custom.list_namespaced_custom_object(*MCS, "shop", "serviceexports")
    assert info.value.status == 404
    # A watch gets the same plain 404 (kubernetes_asyncio's Watch helper cannot parse it and retries
    # forever, against a real server too; isthmus's reflector reads the raw response).
    with pytest.raises(ApiException) as info:
        await custom.list_cluster_custom_object(*MCS, "serviceexports", watch=True)
    assert info.value.status == 404
    assert info.value.body == "404 page not found\n"
    groups = {g.name for g in (await client.ApisApi(api_client).get_api_versions()).groups}
    assert groups == {"discovery.k8s.io"}
    with pytest.raises(KubeApiError):
        api.create(service_export("web"))
    api.set_installed("serviceexports", True)
    api.create(service_export("web"))
    assert len((await custom.list_cluster_custom_object(*MCS, "serviceexports"))["items"]) == 1


# --- auth -------------------------------------------------------------------------------------------


async def test_token_rotation_makes_the_old_token_401(kube: Cluster, consumers) -> None:
    api = await kube.server(tokens=["old"])
    api.create(service("a"))
    v1 = client.CoreV1Api(await kube.client(api))
    rv = (await v1.list_service_for_all_namespaces()).metadata.resource_version
    stream = consumers(v1.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=10)
    await until(lambda: api.open_watches == 1)

    api.rotate_token("new")
    with pytest.raises(ApiException) as info:
        await v1.list_service_for_all_namespaces()
    assert info.value.status == 401
    assert yaml.safe_load(info.value.body) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Unauthorized",
        "reason": "Unauthorized",
        "code": 401,
    }
    with pytest.raises(ApiException) as info:
        await drain(v1.list_service_for_all_namespaces)
    assert (info.value.status, info.value.reason) == (401, "Unauthorized: Unauthorized")
    # An already open watch keeps streaming (authentication happens per request).
    api.create(service("b"))
    await until(lambda: len(stream.events) == 1)
    fresh = client.CoreV1Api(await kube.client(api, token="new"))
    assert len((await fresh.list_service_for_all_namespaces()).items) == 2
    assert [r.authorized for r in api.requests][-3:] == [False, False, True]


async def test_forbidden_kind_is_403(kube: Cluster) -> None:
    api = await kube.server()
    v1 = client.CoreV1Api(await kube.client(api))
    api.forbid("pods")
    with pytest.raises(ApiException) as info:
        await v1.list_pod_for_all_namespaces()
    body = yaml.safe_load(info.value.body)
    assert info.value.status == 403
    assert body["reason"] == "Forbidden"
    assert 'cannot list resource "pods" in API group "" at the cluster scope' in body["message"]
    with pytest.raises(ApiException) as info:
        await drain(v1.list_namespaced_pod, "shop", timeout_seconds=1)
    assert info.value.status == 403
    assert 'in the namespace "shop"' in info.value.reason
    await v1.list_service_for_all_namespaces()
    api.allow("pods")
    await v1.list_pod_for_all_namespaces()


async def test_exec_plugin_kubeconfig(kube: Cluster, tmp_path: Path) -> None:
    api = await kube.server()
    path = write_kubeconfig(tmp_path / "exec.yaml", api.url, api.token, "west", exec_plugin=True)
    data = yaml.safe_load(path.read_text())
    user = data["users"][0]["user"]
    assert "token" not in user
    assert user["exec"]["apiVersion"] == "client.authentication.k8s.io/v1"
    assert data["current-context"] == "west"
    assert data["clusters"][0]["cluster"]["server"] == api.url
    # The plugin works, so refusing it is a policy, not an accident.
    v1 = client.CoreV1Api(await kube.client(api, name="west", exec_plugin=True))
    assert (await v1.list_service_for_all_namespaces()).items == []


# --- faults -----------------------------------------------------------------------------------------


async def test_fail_with_500_on_list_and_watch(kube: Cluster) -> None:
    api = await kube.server()
    v1 = client.CoreV1Api(await kube.client(api))
    api.fail_with(500)
    with pytest.raises(ApiException) as info:
        await v1.list_service_for_all_namespaces()
    assert info.value.status == 500
    assert yaml.safe_load(info.value.body)["reason"] == "InternalError"
    for kwargs in ({"timeout_seconds": 1}, {}):
        with pytest.raises(ApiException) as info:
            await drain(v1.list_service_for_all_namespaces, **kwargs)
        assert info.value.status == 500
    api.fail_with(503, "etcdserver: leader changed")
    with pytest.raises(ApiException) as info:
        await v1.list_service_for_all_namespaces()
    assert info.value.status == 503
    assert "leader changed" in info.value.body
    api.fail_with(None)
    await v1.list_service_for_all_namespaces()


async def test_hang_times_out_bounded_calls_and_freezes_open_watches(kube: Cluster, consumers) -> None:
    api = await kube.server(bookmark_interval=0.1)
    v1 = client.CoreV1Api(await kube.client(api))
    stream = consumers(v1.list_service_for_all_namespaces, timeout_seconds=20)
    await until(lambda: api.open_watches == 1)

    api.hang(True)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await v1.list_service_for_all_namespaces(_request_timeout=0.3)
    with pytest.raises(aiohttp.SocketTimeoutError):
        await v1.list_service_for_all_namespaces(_request_timeout=(0.3, 0.3))
    assert time.monotonic() - started < 2
    api.create(service("a"))
    await asyncio.sleep(0.3)
    assert stream.events == []  # frozen
    api.hang(False)
    await until(lambda: len(stream.events) == 1)
    assert stream.names() == [("ADDED", "a")]


async def test_hang_during_watch_forever_with_read_timeout(kube: Cluster, consumers) -> None:
    # Bookmarks keep a healthy stream under the read timeout; on a hang the read times out, the Watch
    # reconnects by itself, and the reconnect's own timeout is raised to the caller.
    api = await kube.server(bookmark_interval=0.1)
    v1 = client.CoreV1Api(await kube.client(api))
    stream = consumers(
        v1.list_service_for_all_namespaces, allow_watch_bookmarks=True, _request_timeout=(1, 0.5)
    )
    await until(lambda: "BOOKMARK" in stream.types())
    api.hang(True)
    await stream.wait_ended()
    assert isinstance(stream.error, TimeoutError)
    assert len(watch_requests(api)) == 2
    api.hang(False)


async def test_slow_delays_every_response(kube: Cluster) -> None:
    api = await kube.server()
    v1 = client.CoreV1Api(await kube.client(api))
    api.slow(0.4)
    started = time.monotonic()
    await v1.list_service_for_all_namespaces()
    assert time.monotonic() - started >= 0.4
    with pytest.raises(TimeoutError):
        await v1.list_service_for_all_namespaces(_request_timeout=0.1)
    api.slow(0)


async def test_stop_refuses_connections_and_restart_keeps_port_and_state(kube: Cluster, consumers) -> None:
    api = await kube.server()
    api.create(service("a"))
    v1 = client.CoreV1Api(await kube.client(api))
    rv = (await v1.list_service_for_all_namespaces()).metadata.resource_version
    stream = consumers(v1.list_service_for_all_namespaces, resource_version=rv)
    await until(lambda: api.open_watches == 1)
    url = api.url

    await api.stop()
    await stream.wait_ended()
    assert isinstance(stream.error, aiohttp.ClientPayloadError)  # cut mid-stream, even watching forever
    with pytest.raises(aiohttp.ClientConnectorError):
        await v1.list_service_for_all_namespaces(_request_timeout=1)

    api.create(service("b"))  # the store (etcd) lives on while the API server is down
    assert await api.start() == url
    listed = await v1.list_service_for_all_namespaces()
    assert [s.metadata.name for s in listed.items] == ["a", "b"]
    assert listed.metadata.resource_version == "3"
    # The watch cache was rebuilt: resuming from before the restart is 410, as on a real restart.
    with pytest.raises(ApiException) as info:
        await drain(v1.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=1)
    assert info.value.status == 410


async def test_restart_can_keep_history(kube: Cluster) -> None:
    api = await kube.server(keep_history_on_restart=True)
    v1 = client.CoreV1Api(await kube.client(api))
    rv = (await v1.list_service_for_all_namespaces()).metadata.resource_version
    await api.stop()
    api.create(service("a"))
    await api.start()
    events = await drain(v1.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=1)
    assert [e["type"] for e in events] == ["ADDED"]


async def test_drop_watches_abrupt_and_clean(kube: Cluster, consumers) -> None:
    api = await kube.server()
    v1 = client.CoreV1Api(await kube.client(api))
    abrupt = consumers(v1.list_service_for_all_namespaces)
    bounded = consumers(v1.list_service_for_all_namespaces, timeout_seconds=20)
    await until(lambda: api.open_watches == 2)
    assert api.drop_watches() == 2
    await abrupt.wait_ended()
    await bounded.wait_ended()
    assert isinstance(abrupt.error, aiohttp.ClientPayloadError)
    assert isinstance(bounded.error, aiohttp.ClientPayloadError)

    forever = consumers(v1.list_service_for_all_namespaces)
    bounded = consumers(v1.list_service_for_all_namespaces, timeout_seconds=20)
    await until(lambda: api.open_watches == 2)
    api.create(service("a"))
    await until(lambda: len(forever.events) == 1 and len(bounded.events) == 1)
    before = len(watch_requests(api))
    api.drop_watches(abrupt=False)
    await bounded.wait_ended()
    assert bounded.error is None  # a clean end just ends a bounded watch
    # ...while a forever watch reconnects from the last RV it saw.
    await until(lambda: len(watch_requests(api)) == before + 1 and api.open_watches == 1)
    assert watch_requests(api)[-1]["resourceVersion"] == "2"
    api.create(service("b"))
    await until(lambda: len(forever.events) == 2)
    assert forever.error is None


async def test_two_instances_are_independent(kube: Cluster, consumers) -> None:
    east = await kube.server(tokens=["east-token"])
    west = await kube.server(tokens=["west-token"], serviceexports_installed=False)
    assert east.port != west.port
    east.create(service("web", "shop"))
    east.create(service("api", "shop"))
    west.create(service("web", "shop"))
    east_v1 = client.CoreV1Api(await kube.client(east, name="east"))
    west_v1 = client.CoreV1Api(await kube.client(west, name="west"))
    assert len((await east_v1.list_service_for_all_namespaces()).items) == 2
    assert len((await west_v1.list_service_for_all_namespaces()).items) == 1
    assert (east.resource_version, west.resource_version) == ("3", "2")

    west_stream = consumers(west_v1.list_service_for_all_namespaces, resource_version="2", timeout_seconds=10)
    await until(lambda: west.open_watches == 1)
    east.fail_with(500)
    east.compact()
    await east.stop()
    west.create(service("db", "data"))
    await until(lambda: len(west_stream.events) == 1)
    assert west_stream.error is None
    assert west_stream.names() == [("ADDED", "db")]
    assert (await west_v1.list_service_for_all_namespaces()).metadata.resource_version == "3"

    # A token of one cluster is not valid on the other.
    cross = client.CoreV1Api(await kube.client(west, token="east-token", name="cross"))
    with pytest.raises(ApiException) as info:
        await cross.list_service_for_all_namespaces()
    assert info.value.status == 401


async def test_python_api_write_semantics(kube: Cluster) -> None:
    api = await kube.server()
    created = api.create(service("a"))
    assert created["metadata"]["resourceVersion"] == "2"
    assert created["metadata"]["uid"]
    # A no-op update writes nothing: same RV, no event.
    assert api.update(created)["metadata"]["resourceVersion"] == "2"
    assert api.resource_version == "2"
    changed = api.update({**created, "spec": {"ports": [{"port": 9}]}})
    assert changed["metadata"]["resourceVersion"] == "3"
    assert changed["metadata"]["uid"] == created["metadata"]["uid"]
    with pytest.raises(KubeApiError) as info:
        api.update({**created, "spec": {"ports": [{"port": 10}]}})  # stale resourceVersion
    assert info.value.code == 409
    with pytest.raises(KubeApiError) as info:
        api.create(service("a"))
    assert info.value.code == 409
    with pytest.raises(KubeApiError) as info:
        api.delete("Service", "default", "zzz")
    assert info.value.code == 404
    assert api.apply(service("a", port=11))["metadata"]["resourceVersion"] == "4"
    assert api.delete("v1/Service", "default", "a")["metadata"]["resourceVersion"] == "5"
    assert api.objects("svc") == []
