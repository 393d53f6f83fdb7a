"""Building blocks of data-path scenarios: pods (an app and its sidecar), their mesh entries, and a
steady request stream measured at the client (failures, which app answered, when)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from datapath.harness import App, ControlPlane, DataPath, NsEnvoy

SIDECAR_PORT = 15006


@dataclass
class Pod:
    app: App
    sidecar: NsEnvoy | None = None


async def pods(dp: DataPath, *specs: tuple[str, str]) -> dict[str, Pod]:
    """Start one app per (cluster, name); sidecars come later, once the control plane runs."""
    out = {}
    for cluster, name in specs:
        out[name] = Pod(await dp.app(cluster, name))
    return out


def meshed(dp: DataPath, pod: Pod, account: str, **kw: Any) -> dict[str, Any]:
    """The pod as a mesh endpoint with a sidecar, running as service account ``account``."""
    return dp.mesh.endpoint(pod.app, service_account=account, sidecar_port=SIDECAR_PORT, **kw)


async def start_sidecars(dp: DataPath, service_of: dict[str, str], all_pods: dict[str, Pod]) -> None:
    async def one(name: str) -> None:
        pod = all_pods[name]
        pod.sidecar = await dp.sidecar(pod.app.cluster, service_of[name], app=pod.app)

    await asyncio.gather(*(one(name) for name in service_of))


@dataclass
class WebEastWest:
    """web in east and in west, each pod with its sidecar; the control plane, gateways and a client."""

    endpoints: list[dict[str, Any]]  # the mesh entries of web-east and web-west, in that order
    control_plane: ControlPlane
    gateways: dict[str, NsEnvoy]
    client: NsEnvoy


async def web_east_and_west(
    dp: DataPath,
    client_in: str = "east",
    gateways: tuple[str, ...] = ("west",),
    extra_args: tuple[str, ...] = (),
) -> WebEastWest:
    """The scenario most failover tests start from: web in two clusters, a client sidecar in one."""
    p = await pods(dp, ("east", "web-east"), ("west", "web-west"))
    both = [meshed(dp, p["web-east"], "web"), meshed(dp, p["web-west"], "web")]
    cp = await dp.control_plane(dp.mesh.service("web", *both), extra_args=extra_args)
    await start_sidecars(dp, {"web-east": "web", "web-west": "web"}, p)
    started = {cluster: await dp.gateway(cluster) for cluster in gateways}
    return WebEastWest(both, cp, started, await dp.sidecar(client_in, "client"))


async def answered_by(client: NsEnvoy, host: str, count: int = 20) -> dict[str, int]:
    got = await client.request(host, "/", count=count)
    assert got.all_ok, got.summary()
    return got.by_app


@dataclass
class Sample:
    at: float  # time.monotonic() when the request completed
    ok: bool
    app: str | None
    error: str


@dataclass
class Stream:
    """A steady request stream through a sidecar, in the background (batches of ``batch``)."""

    client: NsEnvoy
    host: str
    batch: int = 5
    pause: float = 0.05
    samples: list[Sample] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            got = await self.client.request(self.host, "/", count=self.batch, concurrency=1)
            now = time.monotonic()
            self.samples += [Sample(now, r.ok, r.app, "" if r.ok else r.describe()) for r in got.results]
            await asyncio.sleep(self.pause)

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    @property
    def total(self) -> int:
        return len(self.samples)

    @property
    def failures(self) -> list[str]:
        return [s.error for s in self.samples if not s.ok]

    @property
    def apps(self) -> set[str]:
        return {s.app for s in self.samples if s.app}

    def after(self, t: float) -> list[Sample]:
        return [s for s in self.samples if s.at >= t]

    def failed_after(self, t: float) -> list[Sample]:
        return [s for s in self.after(t) if not s.ok]

    def recovered_at(self, t: float, app: str) -> float | None:
        """When, after ``t``, ``app`` began to answer every request (None: it never did)."""
        later = self.after(t)
        for i, sample in enumerate(later):
            if all(s.ok and s.app == app for s in later[i:]):
                return sample.at
        return None


async def stream_around(
    client: NsEnvoy, host: str, event: Callable[[], Awaitable[object]], lead: float = 1.0, settle: float = 3.0
) -> tuple[Stream, float]:
    """A steady stream to ``host`` for ``lead`` seconds, then ``event()``, then ``settle`` seconds more;
    returns the stopped stream and the time the event started (time.monotonic())."""
    stream = Stream(client, host)
    stream.start()
    await asyncio.sleep(lead)
    started = time.monotonic()
    await event()
    await asyncio.sleep(settle)
    await stream.stop()
    return stream, started
