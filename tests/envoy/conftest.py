"""Harness for the real-Envoy tier: free loopback ports, Envoy and `isthmus serve` processes, Envoy's
admin API, test meshes and aiohttp upstreams, and bounded polling.

Test modules get everything through fixtures, never by importing this file. (Do not add an
``__init__.py`` here: pytest would then import this directory as a package named ``envoy``, shadowing
the ``envoy`` protobuf package.)

* ``delta``: parametrizes a test over SotW (False) and Delta (True) xDS.
* ``procs``: starts bootstraps (``isthmus bootstrap`` CLI), ``isthmus serve`` subprocesses and Envoys;
  stops all of them at teardown (even on failure) and attaches their log tails to a failure report.
* ``mesh``: a mesh file on disk, written atomically, and builders for its services.
* ``upstreams``: small aiohttp servers on 127.0.0.x that answer with their own name.
* ``eventually`` / ``holds``: poll a check until it passes (bounded), or check it keeps passing.

Every address used is loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from aiohttp import web

T = TypeVar("T")

BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
MEMBER_CLUSTER = "east"
REGION, ZONE = "r1", "r1-a"
CLIENT_NAMESPACE, CLIENT_SERVICE = "shop", "client"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=5)


# ---- binaries and ports ------------------------------------------------------------------------


def envoy_binary() -> str | None:
    candidate = BIN / "envoy"
    return str(candidate) if candidate.exists() else shutil.which("envoy")


def isthmus_command() -> list[str]:
    script = BIN / "isthmus"
    return [str(script)] if script.exists() else [sys.executable, "-m", "isthmus.cli"]


_handed_out: set[int] = set()


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on right now, never the same one twice in a session."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:]) or "<empty>"


# ---- polling -----------------------------------------------------------------------------------

RETRYABLE: tuple[type[BaseException], ...] = (
    AssertionError,
    aiohttp.ClientError,
    OSError,
    TimeoutError,
    ValueError,  # a half-written JSON body while Envoy starts
)


class ProcessDied(Exception):
    """A process the test depends on exited; polling stops at once."""


async def _eventually(
    check: Callable[[], Awaitable[T]], *, what: str, within: float = 20.0, interval: float = 0.2
) -> T:
    """Await ``check()`` until it returns without raising (an assertion or a connection error),
    for at most ``within`` seconds; then fail with the last error, which shows what was observed."""
    deadline = time.monotonic() + within
    attempts = 0
    while True:
        attempts += 1
        try:
            return await check()
        except RETRYABLE as exc:
            last: BaseException = exc
        if time.monotonic() >= deadline:
            detail = str(last) or repr(last)
            raise AssertionError(
                f"timed out after {within:.0f}s ({attempts} checks) waiting until {what}; "
                f"the last check said:\n{detail}"
            ) from last
        await asyncio.sleep(interval)


async def _holds(
    check: Callable[[], Awaitable[Any]], *, what: str, duration: float, interval: float = 0.25
) -> None:
    """Check repeatedly for ``duration`` seconds that ``check()`` keeps passing."""
    deadline = time.monotonic() + duration
    while True:
        try:
            await check()
        except AssertionError as exc:
            raise AssertionError(f"expected {what} to hold for {duration:.0f}s, but:\n{exc}") from exc
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(interval)


@pytest.fixture
def eventually() -> Callable[..., Awaitable[Any]]:
    return _eventually


@pytest.fixture
def holds() -> Callable[..., Awaitable[None]]:
    return _holds


# ---- Envoy's admin API -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer received through Envoy; ``upstream`` is the test upstream that answered."""

    status: int
    upstream: str | None
    body: str


class EnvoyAdmin:
    """Reads Envoy's admin endpoints on loopback. Each call opens its own short-lived session."""

    def __init__(self, port: int) -> None:
        self.base = f"http://{LOOPBACK}:{port}"

    async def get(self, path: str) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session,
            session.get(self.base + path) as resp,
        ):
            return resp.status, await resp.text()

    async def text(self, path: str) -> str:
        status, body = await self.get(path)
        assert status == 200, f"GET {path}: HTTP {status}: {body[:500]}"
        return body

    async def json(self, path: str) -> Any:
        return json.loads(await self.text(path))

    async def config_dump(self, resource: str) -> list[dict[str, Any]]:
        """The entries of one config_dump resource type ([] when Envoy has none of that type)."""
        path = f"/config_dump?resource={resource}"
        status, body = await self.get(path)
        if status == 404 and "not found in config dump" in body:
            return []
        assert status == 200, f"GET {path}: HTTP {status}: {body[:500]}"
        configs: list[dict[str, Any]] = json.loads(body).get("configs", [])
        return configs

    async def active_clusters(self) -> dict[str, dict[str, Any]]:
        """Dynamic active clusters by name: {"version_info": ..., "cluster": {...}}."""
        return {c["cluster"]["name"]: c for c in await self.config_dump("dynamic_active_clusters")}

    async def warming_clusters(self) -> list[str]:
        return [c["cluster"]["name"] for c in await self.config_dump("dynamic_warming_clusters")]

    async def listeners(self) -> dict[str, dict[str, Any]]:
        """Dynamic listeners by name: {"active_state": ..., "warming_state": ..., ...}."""
        return {entry["name"]: entry for entry in await self.config_dump("dynamic_listeners")}

    async def route_configs(self) -> dict[str, dict[str, Any]]:
        """Dynamic route configurations by name (the RouteConfiguration itself)."""
        dump = await self.config_dump("dynamic_route_configs")
        return {entry["route_config"]["name"]: entry["route_config"] for entry in dump}

    async def cluster_hosts(self) -> dict[str, dict[str, dict[str, Any]]]:
        """/clusters for the clusters added by xDS: {cluster: {"ADDR:PORT": host status}}."""
        data = await self.json("/clusters?format=json")
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for status in data.get("cluster_statuses", []):
            if not status.get("added_via_api"):
                continue
            hosts = {}
            for host in status.get("host_statuses", []):
                sock = host["address"]["socket_address"]
                hosts[f"{sock['address']}:{sock['port_value']}"] = host
            out[status["name"]] = hosts
        return out

    async def stats(self, pattern: str) -> dict[str, Any]:
        """Counters, gauges and text readouts whose name matches the regex ``pattern`` (0 included)."""
        data = await self.json(f"/stats?format=json&filter={pattern}")
        return {s["name"]: s.get("value", 0) for s in data.get("stats", []) if "name" in s}

    async def rejections(self) -> dict[str, int]:
        """How many CDS and LDS updates Envoy rejected."""
        return await self.stats(
            r"^cluster_manager\.cds\.update_rejected$|^listener_manager\.lds\.update_rejected$"
        )


# ---- processes ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """A bootstrap written by `isthmus bootstrap`, and the loopback ports it gives the Envoy."""

    path: Path
    role: str
    delta: bool
    node_id: str
    xds_port: int
    admin_port: int
    outbound_port: int
    inbound_port: int


class ManagedProcess:
    """A subprocess with its output in a log file; stopped by pid only."""

    name = "process"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str]) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"---- started: {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ProcessDied(
                f"{self.name} exited with status {self.proc.returncode}; log tail:\n{self.log_tail()}"
            )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)

    def kill(self) -> None:
        """SIGKILL, then reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; always reaps. Returns the exit status
        (negative: killed by that signal), or None if it was never started."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
        return proc.returncode


class EnvoyProcess(ManagedProcess):
    """A real Envoy started from a bootstrap; ``admin`` reads its admin API."""

    def __init__(self, binary: str, bootstrap: Bootstrap, log_path: Path) -> None:
        super().__init__(log_path)
        self.name = f"envoy {bootstrap.node_id} ({'delta' if bootstrap.delta else 'sotw'})"
        self.binary = binary
        self.bootstrap = bootstrap
        self.admin = EnvoyAdmin(bootstrap.admin_port)

    def start(self) -> None:
        self._spawn(
            [self.binary, "-c", str(self.bootstrap.path), "--disable-hot-restart", "--log-level", "warn"]
        )

    async def wait_admin(self, within: float = 20.0) -> None:
        async def admin_up() -> None:
            self.ensure_running()
            info = await self.admin.json("/server_info")
            assert info.get("state") in ("LIVE", "PRE_INITIALIZING", "INITIALIZING"), info.get("state")

        await _eventually(admin_up, what=f"{self.name} serves its admin API", within=within)

    async def request(self, host: str, path: str = "/") -> Reply:
        """GET through the outbound listener with the given Host header."""
        url = f"http://{LOOPBACK}:{self.bootstrap.outbound_port}{path}"
        async with (
            aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session,
            session.get(url, headers={"Host": host}) as resp,
        ):
            body = await resp.text()
            upstream = None
            if resp.status == 200 and resp.content_type == "application/json":
                upstream = json.loads(body).get("upstream")
            return Reply(resp.status, upstream, body)


class ControlPlaneProcess(ManagedProcess):
    """`isthmus serve --mesh FILE` on fixed loopback ports (so that a restart reuses them)."""

    def __init__(self, mesh_path: Path, log_path: Path, extra_args: Sequence[str] = ()) -> None:
        super().__init__(log_path)
        self.name = "isthmus serve"
        self.mesh_path = mesh_path
        self.xds_port = free_port()
        self.admin_port = free_port()
        self.extra_args = list(extra_args)

    def start(self) -> None:
        self._spawn(
            [
                *isthmus_command(),
                "--log-level",
                "info",
                "serve",
                "--mesh",
                str(self.mesh_path),
                "--xds-address",
                f"{LOOPBACK}:{self.xds_port}",
                "--admin-address",
                f"{LOOPBACK}:{self.admin_port}",
                *self.extra_args,
            ]
        )

    async def readyz(self) -> dict[str, Any]:
        url = f"http://{LOOPBACK}:{self.admin_port}/readyz"
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session, session.get(url) as resp:
            body: dict[str, Any] = await resp.json()
            assert resp.status == 200, f"/readyz: HTTP {resp.status}: {body}"
            return body

    async def wait_ready(self, within: float = 20.0) -> dict[str, Any]:
        async def ready() -> dict[str, Any]:
            self.ensure_running()
            return await self.readyz()

        result: dict[str, Any] = await _eventually(ready, what="isthmus serve is ready", within=within)
        return result


class Processes:
    """Everything one test starts. Teardown stops them in reverse order of start."""

    def __init__(self, directory: Path, envoy: str) -> None:
        self.directory = directory
        self.envoy_binary = envoy
        self.started: list[ManagedProcess] = []

    def bootstrap(
        self,
        *,
        xds_port: int,
        delta: bool,
        role: str = "sidecar",
        fmt: str = "json",
        service: str = CLIENT_SERVICE,
        namespace: str = CLIENT_NAMESPACE,
        extra: Sequence[str] = (),
    ) -> Bootstrap:
        """Write a bootstrap with the `isthmus bootstrap` CLI, on fresh loopback ports."""
        mode = "delta" if delta else "sotw"
        node_id = f"{role}~{service}-{mode}.{namespace}~{MEMBER_CLUSTER}"
        path = self.directory / f"bootstrap-{role}-{service}-{mode}-{len(extra)}.{fmt}"
        admin_port, outbound_port, inbound_port = free_port(), free_port(), free_port()
        argv = [
            *isthmus_command(),
            "bootstrap",
            "--role", role,
            "--cluster", MEMBER_CLUSTER,
            "--namespace", namespace,
            "--service", service,
            "--node-id", node_id,
            "--region", REGION,
            "--zone", ZONE,
            "--xds-address", f"{LOOPBACK}:{xds_port}",
            "--admin-port", str(admin_port),
            "--listen-address", LOOPBACK,
            "--outbound-port", str(outbound_port),
            "--inbound-port", str(inbound_port),
            "-o", str(path),
            *(["--delta"] if delta else []),
            *extra,
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"isthmus bootstrap failed ({done.returncode}): {done.stderr}"
        return Bootstrap(path, role, delta, node_id, xds_port, admin_port, outbound_port, inbound_port)

    def validate(self, path: Path) -> subprocess.CompletedProcess[str]:
        """`envoy --mode validate -c FILE`."""
        return subprocess.run(
            [self.envoy_binary, "--mode", "validate", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    async def control_plane(self, mesh_path: Path, extra_args: Sequence[str] = ()) -> ControlPlaneProcess:
        """Start `isthmus serve` (``extra_args`` after its own) and wait until /readyz says it serves."""
        cp = ControlPlaneProcess(mesh_path, self.directory / f"isthmus-{len(self.started)}.log", extra_args)
        self.started.append(cp)
        cp.start()
        await cp.wait_ready()
        return cp

    async def envoy(self, bootstrap: Bootstrap) -> EnvoyProcess:
        """Start an Envoy and wait until its admin API answers."""
        proxy = EnvoyProcess(self.envoy_binary, bootstrap, self.directory / f"envoy-{len(self.started)}.log")
        self.started.append(proxy)
        proxy.start()
        await proxy.wait_admin()
        return proxy

    def stop_all(self) -> None:
        errors = []
        for proc in reversed(self.started):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(f"{proc.name}: {exc!r}")
        assert not errors, f"could not stop: {errors}"

    def report_sections(self) -> list[tuple[str, str]]:
        return [(f"{p.name} log tail ({p.log_path})", p.log_tail()) for p in self.started]


@pytest.fixture(scope="session")
def envoy_bin() -> str:
    binary = envoy_binary()
    if binary is None:
        pytest.skip("no envoy binary (install isthmus[envoy])")
    return binary


@pytest.fixture
def procs(tmp_path: Path, envoy_bin: str) -> Iterator[Processes]:
    processes = Processes(tmp_path, envoy_bin)
    try:
        yield processes
    finally:
        processes.stop_all()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On a failure, show the tail of every process log the test started."""
    report = yield
    if report.failed and report.when in ("setup", "call"):
        processes = getattr(item, "funcargs", {}).get("procs")
        if isinstance(processes, Processes):
            for title, text in processes.report_sections():
                report.sections.append((title, text))
    return report


@pytest.fixture(params=[False, True], ids=["sotw", "delta"])
def delta(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


# ---- upstreams ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Upstream:
    """A test HTTP server on loopback; answers every GET with {"upstream": name, ...}."""

    name: str
    host: str
    port: int
    hosts_seen: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class Upstreams:
    def __init__(self) -> None:
        self._runners: list[web.AppRunner] = []

    async def start(self, name: str, host: str = LOOPBACK) -> Upstream:
        assert host.startswith("127."), "test upstreams listen on loopback only"
        upstream = Upstream(name, host, 0)

        async def answer(request: web.Request) -> web.Response:
            upstream.hosts_seen.append(request.host)
            return web.json_response({"upstream": name, "host": request.host, "path": request.path})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, host, 0)
        await site.start()
        upstream.port = int(runner.addresses[0][1])
        return upstream

    async def close(self) -> None:
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    servers = Upstreams()
    try:
        yield servers
    finally:
        await servers.close()


# ---- meshes ------------------------------------------------------------------------------------


class MeshFile:
    """A mesh file in the format of src/isthmus/examples/mesh.yaml. One member cluster ("east", where
    the test proxies run) unless more are added; endpoints are in "east" unless placed elsewhere."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.members: list[dict[str, str]] = [{"name": MEMBER_CLUSTER, "region": REGION, "zone": ZONE}]

    def add_member(self, name: str, region: str, zone: str) -> None:
        self.members.append({"name": name, "region": region, "zone": zone})

    @staticmethod
    def endpoint(
        ep: Upstream | tuple[str, int], *, member: str = MEMBER_CLUSTER, health: str = "healthy"
    ) -> dict[str, Any]:
        host, number = (ep.host, ep.port) if isinstance(ep, Upstream) else ep
        assert host.startswith("127."), "test meshes use loopback endpoints only"
        return {"cluster": member, "address": host, "port": number, "health": health}

    @classmethod
    def service(
        cls,
        name: str,
        *endpoints: Upstream | tuple[str, int] | dict[str, Any],
        port: int = 80,
        protocol: str = "http",
        namespace: str = CLIENT_NAMESPACE,
    ) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": namespace,
            "ports": [{"name": protocol, "port": port, "protocol": protocol}],
            "endpoints": [ep if isinstance(ep, dict) else cls.endpoint(ep) for ep in endpoints],
        }

    @staticmethod
    def cluster(name: str, port: int = 80, namespace: str = CLIENT_NAMESPACE) -> str:
        """The documented Envoy cluster name of a service port."""
        return f"outbound|{port}||{name}.{namespace}.svc.cluster.local"

    def text(self, *services: dict[str, Any]) -> str:
        return yaml.safe_dump({"clusters": self.members, "services": list(services)}, sort_keys=False)

    def write(self, *services: dict[str, Any]) -> None:
        """Replace the file atomically, so the control plane never reads half of it."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(self.text(*services))
        os.replace(tmp, self.path)


@pytest.fixture
def mesh(tmp_path: Path) -> MeshFile:
    return MeshFile(tmp_path / "mesh.yaml")
