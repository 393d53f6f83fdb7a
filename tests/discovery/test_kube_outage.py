"""One member cluster's API server down (or hung) for longer than several watch timeouts while the
other member clusters change.

Three member clusters (a, b, c) on fake API servers, synced through Members with a short Timing
(watch_timeout=1 s). Cluster b goes down -- a real stop of its listening server, or a hang that
accepts connections and answers nothing -- for 4 watch timeouts. Meanwhile a and c add, change and
delete endpoints and services, and b's own store changes behind its back (FakeKubeApi's object API
works while the server is stopped: objects and the resourceVersion counter live "in etcd"). The
tests check that a's and c's changes reach the aggregated MeshView while b is down, that b is
reported unreachable and keeps its last known endpoints the whole time, and that once b is back its
endpoints are reconciled (deletions included, no ghost, no duplicate) and it is synced again.

Helpers are local on purpose: tests/discovery has no ``__init__.py``, so importing
``discovery.test_kube_members`` would load that module a second time under another name.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from test_kube_members import endpoint_slice, service

from isthmus.discovery.aggregate import Aggregator
from isthmus.discovery.kube.members import Members
from isthmus.discovery.kube.reflector import Timing
from isthmus.discovery.model import ClusterState, MeshView, ServiceKey
from kubeapi.kubeconfig import write_kubeconfig
from kubeapi.server import FakeKubeApi

WEB = ServiceKey("shop", "web")
API = ServiceKey("shop", "api")
WATCH_TIMEOUT = 1  # seconds; the server ends every watch after this and the reflector resumes
TIMING = Timing(
    watch_timeout=WATCH_TIMEOUT,
    idle_timeout=2.0,  # bookmarks come every 0.3 s, so only a hung server trips this
    request_timeout=1.0,
    backoff_initial=0.05,
    backoff_max=0.3,
)
OUTAGE = 4.0 * WATCH_TIMEOUT
# A change in a healthy cluster travels one open watch and the debounce: well under a second. The
# bound is loose for slow machines but shorter than what is left of b's outage when it is checked.
PROPAGATION = 1.5

# Endpoints per cluster, by phase. "b0" is what b had when it went down; "b1" is b's store after the
# changes made while it was down (web-b2 deleted, web-b1 changed).
A0, A1, A2 = {"127.0.1.1", "127.0.1.2"}, {"127.0.1.1", "127.0.1.2", "127.0.1.3"}, {"127.0.1.3"}
B0, B1, B2 = {"127.0.2.1", "127.0.2.2", "127.0.2.3"}, {"127.0.2.1", "127.0.2.4"}, {"127.0.2.4", "127.0.2.5"}
C0, C1 = {"127.0.3.1", "127.0.3.2"}, {"127.0.3.1"}
C_API1, C_API2 = {"127.0.3.10"}, {"127.0.3.10", "127.0.3.11"}
B_GHOSTS = B0 - B1


# ---- objects --------------------------------------------------------------------------------------


# ---- reading views -------------------------------------------------------------------------------


def endpoints(view: MeshView, key: ServiceKey = WEB) -> Counter[tuple[str, str]]:
    """(cluster, address) -> how many times the view lists it (more than once is a duplicate)."""
    svc = view.services.get(key)
    return Counter((e.locality.cluster, e.address) for e in svc.endpoints) if svc else Counter()


def of(view: MeshView, cluster: str, key: ServiceKey = WEB) -> set[str]:
    return {address for c, address in endpoints(view, key) if c == cluster}


def no_duplicates(view: MeshView) -> bool:
    return all(n == 1 for key in view.services for n in endpoints(view, key).values())


def state(view: MeshView, cluster: str) -> ClusterState | None:
    member = view.clusters.get(cluster)
    return member.state if member else None


def b_down_with_last_known(view: MeshView) -> bool:
    return state(view, "b") is ClusterState.UNREACHABLE and of(view, "b") == B0


def describe(view: MeshView) -> dict[str, object]:
    """A short summary of a view for failure messages: each cluster's state and endpoints."""
    return {
        name: (member.state.value, {str(key): sorted(of(view, name, key)) for key in view.services})
        for name, member in view.clusters.items()
    }


class Views:
    """Records every MeshView the aggregator publishes and waits for conditions on the latest."""

    def __init__(self) -> None:
        self.all: list[MeshView] = []
        self.view = MeshView.build((), ())
        self._changed = asyncio.Event()

    def on_view(self, view: MeshView) -> None:
        self.all.append(view)
        self.view = view
        self._changed.set()

    def mark(self) -> int:
        """Index of the next view to be published (to check every view from now on)."""
        return len(self.all)

    async def until(self, check: Callable[[MeshView], bool], what: str, timeout: float) -> MeshView:
        async def wait() -> MeshView:
            while not check(self.view):
                self._changed.clear()
                await self._changed.wait()
            return self.view

        try:
            return await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"within {timeout}s: {what}; last view: {describe(self.view)}") from None


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def kubeconfigs(tmp_path: Path) -> Path:
    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    return directory


@contextlib.asynccontextmanager
async def member_clusters(**options: Any) -> AsyncIterator[dict[str, FakeKubeApi]]:
    apis = {name: FakeKubeApi(bookmark_interval=0.3, **options) for name in "abc"}
    try:
        for api in apis.values():
            await api.start()
        yield apis
    finally:
        for api in apis.values():
            await api.stop()


@contextlib.asynccontextmanager
async def running_mesh(apis: dict[str, FakeKubeApi], directory: Path) -> AsyncIterator[tuple[Views, Members]]:
    """Seed the three clusters, run an Aggregator and Members over them, wait for the first sync."""
    apis["a"].create(service("web"))
    apis["a"].create(endpoint_slice("web-a", A0))
    apis["b"].create(service("web"))
    apis["b"].create(endpoint_slice("web-b1", {"127.0.2.1", "127.0.2.2"}))
    apis["b"].create(endpoint_slice("web-b2", {"127.0.2.3"}))
    apis["c"].create(service("web"))
    apis["c"].create(endpoint_slice("web-c1", {"127.0.3.1"}))
    apis["c"].create(endpoint_slice("web-c2", {"127.0.3.2"}))
    for name, api in apis.items():
        write_kubeconfig(directory / f"{name}.yaml", api.url, api.token, name)

    views = Views()
    aggregator = Aggregator(views.on_view, quiet=0.02, max_delay=0.2)
    members = Members(aggregator, directory=directory, timing=TIMING, poll_interval=0.1)
    tasks = [asyncio.create_task(aggregator.run()), asyncio.create_task(members.run())]
    try:
        view = await views.until(
            lambda v: (
                (of(v, "a"), of(v, "b"), of(v, "c")) == (A0, B0, C0)
                and all(state(v, n) is ClusterState.SYNCED for n in "abc")
            ),
            "all three clusters synced with their seeded endpoints",
            timeout=10,
        )
        assert no_duplicates(view), describe(view)
        yield views, members
    finally:
        for task in reversed(tasks):  # Members first: it stops its watchers on the way out
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def watches_since(api: FakeKubeApi, start: int, plural: str = "endpointslices") -> int:
    return sum(1 for r in api.requests[start:] if r.watch and r.path.endswith(f"/{plural}"))


def change_b_behind_its_back(b: FakeKubeApi) -> None:
    """b's store changes while nothing can watch it: one slice deleted, one changed."""
    b.delete("endpointslices", "shop", "web-b2")
    b.update(endpoint_slice("web-b1", B1))


async def wait_for_b_back(views: Views, members: Members) -> MeshView:
    """b reconciled: exactly the endpoints its store has now, no ghost, no duplicate, synced."""
    view = await views.until(
        lambda v: state(v, "b") is ClusterState.SYNCED and of(v, "b") == B1,
        "b synced again with the endpoints its store has now (b1)",
        timeout=8,
    )
    assert of(view, "b") == B1
    assert not (of(view, "b") & B_GHOSTS), "no ghost of b's deleted endpoints"
    assert no_duplicates(view), describe(view)
    status = members.status()["b"]
    assert (status["state"], status["detail"]) == ("synced", ""), status
    return view


async def live_change_on_b(views: Views, b: FakeKubeApi, since: int) -> MeshView:
    """After the recovery b is watched live again, and no later view brings a ghost back."""
    b.update(endpoint_slice("web-b1", B2))
    view = await views.until(lambda v: of(v, "b") == B2, "a live change on b after its recovery", PROPAGATION)
    for later in views.all[since:]:
        assert not (of(later, "b") & B_GHOSTS), f"a deleted endpoint of b came back: {describe(later)}"
        assert no_duplicates(later), f"duplicate endpoints: {describe(later)}"
        assert state(later, "b") is ClusterState.SYNCED
    return view


# ---- tests ---------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("keep_history", [False, True], ids=["history-compacted", "history-kept"])
async def test_stopped_api_server_does_not_block_others_and_reconciles_after_restart(
    kubeconfigs: Path, keep_history: bool
) -> None:
    loop = asyncio.get_running_loop()
    async with (
        member_clusters(keep_history_on_restart=keep_history) as apis,
        running_mesh(apis, kubeconfigs) as (views, members),
    ):
        a, b, c = apis["a"], apis["b"], apis["c"]

        # b's API server goes away: connections reset, new ones refused.
        await b.stop()
        down_at = loop.time()
        a_requests, c_requests = len(a.requests), len(c.requests)
        view = await views.until(
            lambda v: state(v, "b") is ClusterState.UNREACHABLE, "b reported unreachable", timeout=5
        )
        outage_views = views.mark() - 1
        assert of(view, "b") == B0, "b's last known endpoints are kept"
        status = members.status()["b"]
        assert status["state"] == "unreachable", status
        assert status["detail"], "the reason is reported"

        # Changes while b is down. FakeKubeApi's store can be changed while it is stopped.
        assert not b.running
        change_b_behind_its_back(b)
        a.update(endpoint_slice("web-a", A1))  # a gains an endpoint
        c.delete("endpointslices", "shop", "web-c2")  # c loses one
        c.create(service("api"))  # and gains a service
        c.create(endpoint_slice("api-c", C_API1, svc="api"))
        view = await views.until(
            lambda v: (
                of(v, "a") == A1
                and of(v, "c") == C1
                and of(v, "c", API) == C_API1
                and b_down_with_last_known(v)
            ),
            "a's and c's first changes visible while b is still down",
            PROPAGATION,
        )
        assert set(endpoints(view, API)) == {("c", ip) for ip in C_API1}
        assert no_duplicates(view), describe(view)

        # More than two watch timeouts into the outage: a's and c's watches have been renewed since.
        await asyncio.sleep(max(0.0, down_at + 2.5 * WATCH_TIMEOUT - loop.time()))
        a.update(endpoint_slice("web-a", A2))  # a loses its two original endpoints
        c.update(endpoint_slice("api-c", C_API2, svc="api"))
        view = await views.until(
            lambda v: of(v, "a") == A2 and of(v, "c", API) == C_API2 and b_down_with_last_known(v),
            "a's and c's second changes visible while b is still down",
            PROPAGATION,
        )
        assert set(endpoints(view)) == {("a", ip) for ip in A2} | {("b", ip) for ip in B0} | {
            ("c", ip) for ip in C1
        }

        # The outage lasts several watch timeouts.
        await asyncio.sleep(max(0.0, down_at + OUTAGE - loop.time()))
        assert not b.running
        # The scenario held: a's and c's watches ended and resumed several times during the outage.
        assert watches_since(a, a_requests) >= 3
        assert watches_since(c, c_requests) >= 3
        # Through the whole outage b stayed reported unreachable and kept its last known endpoints.
        during = views.all[outage_views:]
        assert during
        assert all(b_down_with_last_known(v) for v in during), [describe(v)["b"] for v in during]
        assert members.status()["b"]["state"] == "unreachable"

        # b comes back on the same port. Without kept history the resumed watch gets 410 and b relists.
        b_requests = len(b.requests)
        await b.start()
        back = views.mark()
        view = await wait_for_b_back(views, members)
        synced = views.mark() - 1
        assert (of(view, "a"), of(view, "c"), of(view, "c", API)) == (A2, C1, C_API2)
        slices = [r for r in b.requests[b_requests:] if r.path.endswith("/endpointslices")]
        assert slices
        # b's endpointslices reflector first resumes its watch from its last resourceVersion.
        assert slices[0].watch
        assert int(slices[0].query.get("resourceVersion") or "0") > 0
        if not keep_history:
            assert any(not r.watch for r in slices), "the 410 after the restart led to a relist"
        # No view after b's return lost a's or c's endpoints.
        for later in views.all[back:]:
            assert (of(later, "a"), of(later, "c"), of(later, "c", API)) == (A2, C1, C_API2), describe(later)

        await live_change_on_b(views, b, synced)


@pytest.mark.timeout(30)
async def test_hung_api_server_does_not_block_others_and_reconciles_after_it_answers(
    kubeconfigs: Path,
) -> None:
    loop = asyncio.get_running_loop()
    async with (
        member_clusters() as apis,
        running_mesh(apis, kubeconfigs) as (views, members),
    ):
        a, b, c = apis["a"], apis["b"], apis["c"]

        # b accepts connections and answers nothing; its open watches freeze (no bookmarks either).
        b.hang(True)
        hung_at = loop.time()
        # a's change arrives before b is even found hung (idle_timeout is 2 s): nothing waits for b.
        a.update(endpoint_slice("web-a", A1))
        view = await views.until(lambda v: of(v, "a") == A1, "a's change while b hangs", PROPAGATION)
        assert of(view, "b") == B0

        view = await views.until(
            lambda v: state(v, "b") is ClusterState.UNREACHABLE,
            "b reported unreachable once its watches go silent past idle_timeout",
            timeout=TIMING.idle_timeout + 3,
        )
        outage_views = views.mark() - 1
        assert of(view, "b") == B0
        assert of(view, "a") == A1
        status = members.status()["b"]
        assert status["state"] == "unreachable", status
        assert status["detail"], "the reason is reported"

        change_b_behind_its_back(b)
        c.delete("endpointslices", "shop", "web-c2")
        a.update(endpoint_slice("web-a", A2))
        view = await views.until(
            lambda v: of(v, "a") == A2 and of(v, "c") == C1 and b_down_with_last_known(v),
            "a's and c's changes visible while b hangs",
            PROPAGATION,
        )
        assert no_duplicates(view), describe(view)

        await asyncio.sleep(max(0.0, hung_at + OUTAGE - loop.time()))
        during = views.all[outage_views:]
        assert during
        assert all(b_down_with_last_known(v) for v in during), [describe(v)["b"] for v in during]
        assert members.status()["b"]["state"] == "unreachable"

        # b answers again (history intact: the resumed watches replay the deletion).
        b.hang(False)
        view = await wait_for_b_back(views, members)
        synced = views.mark() - 1
        assert (of(view, "a"), of(view, "c")) == (A2, C1)
        await live_change_on_b(views, b, synced)
