"""The Gateway API's mesh conformance scenarios (kubernetes-sigs/gateway-api conformance/tests/mesh),
re-expressed in this data-path harness with real Envoys (our own tests of the same behavior; no
code or manifest of theirs). One test per scenario, named after it; docs/routing.md ("Mesh
conformance scenarios") lists which pass and why the others cannot.

The scenarios' world, here: namespace ``shop`` holds the Services ``echo`` (selecting both pods),
``echo-v1`` and ``echo-v2``, each with the HTTP ports 80 (to 8080) and 8080; the echo-v1 pod runs in
member cluster east, the echo-v2 pod in west (reached through west's east-west gateway: the mesh is
multi-cluster, so every split below crosses clusters). The caller is a sidecar in east in ``shop``
(``consumer`` for the consumer route). Each case is retried until it holds or 15 s pass, as the
suite's "eventually consistent" requests are.

Where the conformance topology's pod belongs to several Services (echo and echo-vN), the pod's
sidecar serves one of them (``isthmus bootstrap --service``): echo-vN, which is what every
scenario's backendRefs name.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from datapath.harness import AgentClient, App, DataPath, NsEnvoy, Responses, eventually
from datapath.netns import NsProcess, ProcessDied
from datapath.scenario import Pod, answered_by, meshed, start_sidecars

pytestmark = [pytest.mark.envoy, pytest.mark.datapath]

NS = "shop"
CONSUMER_NS = "consumer"
WITHIN = 15.0  # each case: until it holds, at most this long
REQUESTS = 400
TOLERANCE = 0.07  # observed share within 7 points of the weight (binomial sd at n=400, p=0.3: 2.3)
HTTP_PORTS = (
    {"name": "http", "port": 80, "target_port": 8080, "protocol": "http"},
    {"name": "http-alt", "port": 8080, "protocol": "http"},
)


# The echo app of the scenarios: the agent's apps answer like it, but report a header sent twice
# (an "add" to a header the request has) by one of its values; a backend sees the header's value
# as the list of them, joined by commas, as the conformance suite's echo server reports it.
ECHO = """
import sys
from aiohttp import web
name, cluster, address, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
async def answer(request):
    headers = {}
    for key, value in request.headers.items():
        key = key.lower()
        headers[key] = headers[key] + "," + value if key in headers else value
    body = {"app": name, "cluster": cluster, "method": request.method, "path": request.path,
            "query": request.query_string, "host": request.host, "headers": headers}
    print("request", request.method, request.path_qs, flush=True)
    return web.json_response(body)
server = web.Application()
server.router.add_route("*", "/{tail:.*}", answer)
print("listening", flush=True)
web.run_app(server, host=address, port=port, print=None, access_log=None)
"""


async def echo_app(dp: DataPath, cluster: str, name: str) -> tuple[App, NsProcess]:
    address = dp.topology.new_pod(cluster)
    port = 8080 if dp.isolated else dp.topology.port(cluster, address)
    process = dp.topology.run(
        cluster, [sys.executable, "-c", ECHO, name, cluster, address, str(port)], name=name
    )
    app = App(name, cluster, address, port)

    async def up() -> None:
        process.ensure_running()
        connected = await dp.agent(cluster).connect(address, port)
        assert connected.ok, connected.error

    await eventually(up, what=f"{name} listens", within=20)
    return app, process


# gRPC: the same answer as a unary method /isthmus.test.Echo/Echo (raw bytes: JSON), request
# metadata as headers; every call is logged ("call {json}"), which shows the mirrored ones.
GRPC_ECHO = """
import json, sys
from concurrent import futures
import grpc
name, cluster, address = sys.argv[1], sys.argv[2], sys.argv[3]
def echo(request, context):
    headers = {}
    for key, value in context.invocation_metadata():
        headers[key] = headers[key] + "," + value if key in headers else value
    body = json.dumps({"app": name, "cluster": cluster, "headers": headers})
    print("call", body, flush=True)
    return body.encode()
handler = grpc.method_handlers_generic_handler(
    "isthmus.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
server = grpc.server(futures.ThreadPoolExecutor(4))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(address + ":7070")
server.start()
print("listening", flush=True)
server.wait_for_termination()
"""

# The gRPC client, through the caller's sidecar (its outbound listener, h2c), with :authority
# ``host``: one "result {json}" line per call.
GRPC_CALLS = """
import json, sys
import grpc
target, authority, count, metadata = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
options = [("grpc.default_authority", authority), ("grpc.enable_http_proxy", 0)]
call = grpc.insecure_channel(target, options=options).unary_unary("/isthmus.test.Echo/Echo")
for _ in range(count):
    try:
        body = json.loads(call(b"{}", metadata=tuple(metadata.items()), timeout=5))
        print("result", json.dumps({"ok": True, "app": body["app"], "body": body}), flush=True)
    except grpc.RpcError as exc:
        failed = {"ok": False, "code": str(exc.code()), "details": exc.details()}
        print("result", json.dumps(failed), flush=True)
"""


async def grpc_echo(dp: DataPath, app: App) -> NsProcess:
    process = dp.topology.run(
        app.cluster,
        [sys.executable, "-c", GRPC_ECHO, app.name, app.cluster, app.address],
        name=f"grpc-{app.name}",
    )

    async def up() -> None:
        process.ensure_running()
        assert "listening" in process.log_text()

    await eventually(up, what=f"gRPC {app.name} listens", within=20)
    return process


async def grpc_calls(
    dp: DataPath, client: NsEnvoy, host: str, count: int = 1, metadata: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """``count`` unary calls from the client's cluster through its sidecar."""
    process = dp.topology.run(
        client.cluster,
        [sys.executable, "-c", GRPC_CALLS, f"{client.listen_address}:{client.bootstrap.outbound_port}",
         host, str(count), json.dumps(dict(metadata or {}))],
        name="grpc-calls",
    )  # fmt: skip
    code = await asyncio.to_thread(process.proc.wait, 60 + 5 * count)
    text = process.log_text()
    results = [json.loads(line.split(" ", 1)[1]) for line in text.splitlines() if line.startswith("result ")]
    assert code == 0, text[-2000:]
    assert len(results) == count, text[-2000:]
    return results


# ---- the scenarios' world -----------------------------------------------------------------------


GRPC_PORT = {"name": "grpc", "port": 7070, "protocol": "grpc"}


def echo_service(name: str, *endpoints: dict[str, Any], grpc: bool = False) -> dict[str, Any]:
    ports = [dict(p) for p in HTTP_PORTS] + ([dict(GRPC_PORT)] if grpc else [])
    return {"name": name, "namespace": NS, "ports": ports, "endpoints": list(endpoints)}


def route(
    name: str,
    *rules: dict[str, Any],
    parent: str = "echo",
    port: int | None = 80,
    namespace: str = NS,
    kind: str = "HTTPRoute",
) -> dict[str, Any]:
    """A route on the Service ``parent`` of ``shop`` (``port`` None: no port in the parentRef)."""
    ref: dict[str, Any] = {"group": "", "kind": "Service", "name": parent}
    if namespace != NS:
        ref["namespace"] = NS
    if port is not None:
        ref["port"] = port
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"parentRefs": [ref], "rules": list(rules)},
    }


def to(name: str, port: int = 8080, **extra: Any) -> dict[str, Any]:
    return {"name": name, "port": port, **extra}


def prefix(path: str) -> dict[str, Any]:
    return {"path": {"type": "PathPrefix", "value": path}}


def set_response_header(value: str) -> dict[str, Any]:
    return {
        "type": "ResponseHeaderModifier",
        "responseHeaderModifier": {"set": [{"name": "X-Header-Set", "value": value}]},
    }


def redirect(**spec: Any) -> dict[str, Any]:
    return {"type": "RequestRedirect", "requestRedirect": spec}


@dataclass
class World:
    client: NsEnvoy
    pods: dict[str, Pod]
    clients: dict[str, NsEnvoy] = field(default_factory=dict)  # by namespace
    grpc_servers: dict[str, NsProcess] = field(default_factory=dict)  # by app


async def echo_world(
    dp: DataPath, *routes: dict[str, Any], client_namespaces: Sequence[str] = (NS,), grpc: bool = False
) -> World:
    """echo-v1 (east) and echo-v2 (west) with their sidecars, the Services echo, echo-v1 and
    echo-v2, the routes, west's gateway and a client sidecar in east per namespace; returns once
    both versions answer the (first) client by name. ``grpc``: each pod also serves gRPC on 7070
    (GRPC_ECHO), a port of each Service (and echo-v3 exists, without endpoints)."""
    for obj in routes:
        dp.mesh.route(obj)
    p, servers = {}, {}
    for cluster, name in (("east", "echo-v1"), ("west", "echo-v2")):
        p[name] = Pod((await echo_app(dp, cluster, name))[0])
        if grpc:
            servers[name] = await grpc_echo(dp, p[name].app)
    v1, v2 = meshed(dp, p["echo-v1"], "echo-v1"), meshed(dp, p["echo-v2"], "echo-v2")
    if grpc:
        for endpoint in (v1, v2):
            endpoint["ports"] = {"http": 8080, "http-alt": 8080, "grpc": 7070}
    services = [
        echo_service("echo", v1, v2, grpc=grpc),
        echo_service("echo-v1", v1, grpc=grpc),
        echo_service("echo-v2", v2, grpc=grpc),
    ]
    await dp.control_plane(*services, *([echo_service("echo-v3", grpc=True)] if grpc else []))
    await start_sidecars(dp, {"echo-v1": "echo-v1", "echo-v2": "echo-v2"}, p)
    await dp.gateway("west")
    clients = {ns: await dp.sidecar("east", "client", namespace=ns) for ns in client_namespaces}
    first = clients[client_namespaces[0]]

    async def ready() -> None:
        assert await answered_by(first, f"echo-v1.{NS}:8080", count=2) == {"echo-v1": 2}
        assert await answered_by(first, f"echo-v2.{NS}:8080", count=2) == {"echo-v2": 2}

    await eventually(ready, what="echo-v1 and echo-v2 answer", within=30)
    return World(first, p, clients, servers)


# ---- one expected exchange ------------------------------------------------------------------------


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted), None)


@dataclass(frozen=True)
class Case:
    """A request and what must come of it (as a conformance ExpectedResponse says it)."""

    path: str = "/"
    host: str = "echo"
    headers: Mapping[str, str] = field(default_factory=dict)
    status: int = 200
    backend: str | tuple[str, ...] | None = None  # the app(s) that may answer (None: no app)
    response_headers: Mapping[str, str] = field(default_factory=dict)
    absent_response_headers: tuple[str, ...] = ()
    request_headers: Mapping[str, str] = field(default_factory=dict)  # as the backend received them
    absent_request_headers: tuple[str, ...] = ()
    received_path: str | None = None  # the path the backend received
    location: str | None = None  # a redirect's Location

    def check(self, got: Responses) -> None:
        for r in got.results:
            where = f"{self.host}{self.path} {self.headers or ''}: {r.describe()}"
            assert r.status == self.status, where
            allowed = self.backend if isinstance(self.backend, tuple) else (self.backend,)
            assert r.app in allowed, where
            for name, value in self.response_headers.items():
                assert _header(r.headers, name) == value, f"{where}: response header {name}: {r.headers}"
            for name in self.absent_response_headers:
                assert _header(r.headers, name) is None, f"{where}: response header {name}: {r.headers}"
            for name, value in self.request_headers.items():
                assert r.request_header(name) == value, f"{where}: request header {name}: {r.body}"
            for name in self.absent_request_headers:
                assert r.request_header(name) is None, f"{where}: request header {name}: {r.body}"
            if self.received_path is not None:
                assert r.body is not None, where
                assert r.body["path"] == self.received_path, f"{where}: {r.body}"
            if self.location is not None:
                assert _header(r.headers, "Location") == self.location, f"{where}: {r.headers}"


async def expect(client: NsEnvoy, *cases: Case, count: int = 3) -> None:
    """Each case holds for ``count`` requests in a row, within WITHIN seconds."""
    for case in cases:

        async def holds(case: Case = case) -> None:
            got = await client.request(
                case.host, case.path, count=count, headers=dict(case.headers), follow_redirects=False
            )
            case.check(got)

        await eventually(holds, what=f"{case.host}{case.path} {dict(case.headers)}", within=WITHIN)


async def weights(client: NsEnvoy, host: str, want: Mapping[str, float]) -> None:
    got = await client.request(host, "/", count=REQUESTS, concurrency=4)
    assert got.all_ok, got.summary()
    print(f"\n{host}: observed {got.by_app} over {REQUESTS} requests, want {dict(want)}")
    assert set(got.by_app) <= set(want), got.by_app
    for app, share in want.items():
        assert abs(got.by_app.get(app, 0) / REQUESTS - share) <= TOLERANCE, (app, got.by_app)
    assert {r.cluster for r in got.results if r.app == "echo-v2"} <= {"west"}, got.summary()


# ---- MeshBasic, MeshTrafficSplit, MeshPorts, MeshConsumerRoute -------------------------------------


ONE_SERVICE_PER_SIDECAR = (
    "a pod selected by two Services is reachable with mTLS through one: its sidecar's inbound "
    "listener has filter chains (by SNI) for its own Service only (isthmus bootstrap --service "
    "echo-v1), so a connection for the Service echo to the same pod matches none and is closed: "
    "503 'remote connection failure' (xds/generate/listeners.py inbound_listener)"
)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=ONE_SERVICE_PER_SIDECAR)
async def test_mesh_basic(dp: DataPath) -> None:
    """No route: a mesh client reaches the Service echo (both pods, one per cluster)."""
    world = await echo_world(dp)
    await expect(world.client, Case(host="echo", backend=("echo-v1", "echo-v2")))


async def test_mesh_split(dp: DataPath) -> None:
    """Exact paths split the Service echo between its versions (v2 in the other cluster)."""
    exact = [
        {"matches": [{"path": {"type": "Exact", "value": f"/{v}"}}], "backendRefs": [to(f"echo-{v}", 80)]}
        for v in ("v1", "v2")
    ]
    world = await echo_world(dp, route("mesh-split", *exact, port=None))
    await expect(world.client, Case(path="/v1", backend="echo-v1"), Case(path="/v2", backend="echo-v2"))


async def test_mesh_ports(dp: DataPath) -> None:
    """A parentRef's port scopes the route to that port of the Service; without one, every port."""
    world = await echo_world(
        dp,
        route("mesh-ports-v1", {"filters": [set_response_header("v1")], "backendRefs": [to("echo-v1", 80)]},
              parent="echo-v1", port=80),
        route("mesh-ports-v2", {"filters": [set_response_header("v2")], "backendRefs": [to("echo-v2", 80)]},
              parent="echo-v2", port=None),
    )  # fmt: skip
    await expect(
        world.client,
        Case(host="echo-v1", backend="echo-v1", response_headers={"X-Header-Set": "v1"}),
        Case(host="echo-v1:8080", backend="echo-v1", absent_response_headers=("X-Header-Set",)),
        Case(host="echo-v2", backend="echo-v2", response_headers={"X-Header-Set": "v2"}),
        Case(host="echo-v2:8080", backend="echo-v2", response_headers={"X-Header-Set": "v2"}),
    )


async def test_mesh_consumer_route(dp: DataPath) -> None:
    """A route in the caller's namespace on a Service of another applies to that namespace's
    callers only; the producer namespace's callers are untouched."""
    consumer = route(
        "mesh-echo-add-header",
        {"filters": [set_response_header("set")], "backendRefs": [to("echo-v1", 80, namespace=NS)]},
        parent="echo-v1",
        port=None,
        namespace=CONSUMER_NS,
    )
    world = await echo_world(dp, consumer, client_namespaces=(NS, CONSUMER_NS))
    await expect(
        world.clients[NS],
        Case(host=f"echo-v1.{NS}", backend="echo-v1", absent_response_headers=("X-Header-Set",)),
    )
    await expect(
        world.clients[CONSUMER_NS],
        Case(host=f"echo-v1.{NS}", backend="echo-v1", response_headers={"X-Header-Set": "set"}),
    )


# ---- MeshFrontend, MeshFrontendHostname: a captured caller --------------------------------------

CLUSTER_IPS = {"echo": "10.96.0.10", "echo-v1": "10.96.0.11", "echo-v2": "10.96.0.12"}


async def captured_world(dp: DataPath) -> tuple[AgentClient, dict[str, App]]:
    """The Services with ClusterIPs in east, both pods in east (their sidecars as the proxy user,
    not captured), the mesh-frontend route (on echo-v2: a response header), and east's namespace as
    one captured pod (the injector's nftables rules) with its sidecar: the agent's requests to a
    ClusterIP are captured by that sidecar, as an application's are. Returns (east's agent, apps)."""
    from datapath.test_capture import PROXY_UID, SERVICE_RANGE, capture
    from isthmus.inject.capture import Capture

    if not dp.isolated or shutil.which("nft") is None:
        pytest.skip("needs network namespaces (root) and nft")
    dp.mesh.route(
        route("mesh-frontend", {"filters": [set_response_header("set")], "backendRefs": [to("echo-v2", 80)]},
              parent="echo-v2", port=None)
    )  # fmt: skip
    apps = {name: (await echo_app(dp, "east", name))[0] for name in ("echo-v1", "echo-v2")}
    v1, v2 = meshed(dp, Pod(apps["echo-v1"]), "echo-v1"), meshed(dp, Pod(apps["echo-v2"]), "echo-v2")
    services = [echo_service("echo", v1, v2), echo_service("echo-v1", v1), echo_service("echo-v2", v2)]
    for service in services:
        service["cluster_ips"] = {"east": [CLUSTER_IPS[service["name"]]]}
    assert all(ip.startswith(SERVICE_RANGE.split(".0.0/")[0]) for ip in CLUSTER_IPS.values())
    await dp.control_plane(*services)
    capture(dp["east"], Capture())
    for name, app in apps.items():
        await dp.sidecar("east", name, app=app, uid=PROXY_UID)
    sidecar = await dp.sidecar(
        "east",
        "client",
        listen_address="0.0.0.0",
        app_address="127.0.0.1",
        capture="allow-any",
        uid=PROXY_UID,
    )
    await sidecar.wait_live()
    return dp.agent("east"), apps


async def expect_captured(agent: AgentClient, url: str, case: Case) -> None:
    async def holds() -> None:
        case.check(await agent.requests(url, count=3, headers={"Host": case.host}))

    await eventually(holds, what=f"{url} as Host {case.host}", within=WITHIN)


@pytest.mark.parametrize("dp", ["transit"], indirect=True)
async def test_mesh_frontend(dp: DataPath) -> None:
    """A route on echo-v2 applies to calls to the Service echo-v2, not to calls to its pod."""
    agent, apps = await captured_world(dp)
    v2 = apps["echo-v2"]
    await expect_captured(
        agent,
        f"http://{CLUSTER_IPS['echo-v2']}/",
        Case(host="echo-v2", backend="echo-v2", response_headers={"X-Header-Set": "set"}),
    )
    # (A pod address is local to its cluster's namespace here, so this call is not captured at all;
    # in a pod it is, and passes through the sidecar to the pod: either way the route does not apply.)
    await expect_captured(
        agent,
        f"http://{v2.hostport}/",
        Case(host=v2.hostport, backend="echo-v2", absent_response_headers=("X-Header-Set",)),
    )


ROUTED_BY_HOST = (
    "captured HTTP traffic is routed by its Host header, not by the ClusterIP it was sent to: the "
    "captured listener's filter chain for port 80 (all HTTP ClusterIPs of that port) leads to the "
    "one route table whose virtual hosts match Host (xds/generate/listeners.py, routes.py), so a "
    "call to echo-v2's ClusterIP with Host echo-v1 is answered by echo-v1 without the route's header"
)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=ROUTED_BY_HOST)
@pytest.mark.parametrize("dp", ["transit"], indirect=True)
async def test_mesh_frontend_hostname(dp: DataPath) -> None:
    """The Service is the one whose ClusterIP was called, whatever the Host header says."""
    agent, _ = await captured_world(dp)
    await expect_captured(
        agent,
        f"http://{CLUSTER_IPS['echo-v2']}/",
        Case(host="echo-v1", backend="echo-v2", response_headers={"X-Header-Set": "set"}),
    )
    await expect_captured(
        agent,
        f"http://{CLUSTER_IPS['echo-v1']}/",
        Case(host="echo-v2", backend="echo-v1", absent_response_headers=("X-Header-Set",)),
    )


# ---- MeshHTTPRoute* ------------------------------------------------------------------------------


async def test_httproute_matching(dp: DataPath) -> None:
    """Path prefixes and header matches, each rule ORing a path match and a header match."""
    world = await echo_world(
        dp,
        route(
            "mesh-matching",
            {"matches": [prefix("/"), {"headers": [{"name": "version", "value": "one"}]}],
             "backendRefs": [to("echo-v1")]},
            {"matches": [prefix("/v2"), {"headers": [{"name": "version", "value": "two"}]}],
             "backendRefs": [to("echo-v2")]},
        ),
    )  # fmt: skip
    v1, v2 = "echo-v1", "echo-v2"
    await expect(
        world.client,
        Case(path="/", backend=v1),
        Case(path="/example", backend=v1),
        Case(path="/", headers={"Version": "one"}, backend=v1),
        Case(path="/v2", backend=v2),
        Case(path="/v2/example", backend=v2),
        Case(path="/", headers={"Version": "two"}, backend=v2),
        Case(path="/v2/", backend=v2),
        Case(path="/v2example", backend=v1),
        Case(path="/foo/v2/example", backend=v1),
    )


def query(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


async def test_httproute_query_param_matching(dp: DataPath) -> None:
    """Query parameter matches, alone and with path and header matches, and their precedence."""
    world = await echo_world(
        dp,
        route(
            "mesh-query-param-matching",
            {"matches": [{"queryParams": [query("animal", "whale")]}], "backendRefs": [to("echo-v1")]},
            {"matches": [{"queryParams": [query("animal", "dolphin")]}], "backendRefs": [to("echo-v2")]},
            {"matches": [{**prefix("/path1"), "queryParams": [query("animal", "whale")]}],
             "backendRefs": [to("echo-v1")]},
            {"matches": [{"headers": [query("version", "one")], "queryParams": [query("animal", "whale")]}],
             "backendRefs": [to("echo-v2")]},
            {"matches": [
                {**prefix("/path3"), "queryParams": [query("animal", "shark")]},
                {**prefix("/path4"), "headers": [query("version", "three")],
                 "queryParams": [query("animal", "kraken")]},
             ], "backendRefs": [to("echo-v1")]},
            {"matches": [prefix("/path5")], "backendRefs": [to("echo-v1")]},
            {"matches": [{"queryParams": [query("animal", "hydra")]}], "backendRefs": [to("echo-v2")]},
        ),
    )  # fmt: skip
    v1, v2 = "echo-v1", "echo-v2"
    await expect(
        world.client,
        Case(path="/?animal=whale", backend=v1),
        Case(path="/?animal=dolphin", backend=v2),
        Case(path="/?animal=whale&otherparam=irrelevant", backend=v1),
        Case(path="/?animal=dolphin&color=yellow", backend=v2),
        Case(path="/?color=blue", status=404),
        Case(path="/?animal=dog", status=404),
        Case(path="/?animal=whaledolphin", status=404),
        Case(path="/", status=404),
        Case(path="/path1?animal=whale", backend=v1),
        Case(path="/?animal=whale", headers={"version": "one"}, backend=v2),
        Case(path="/path3?animal=shark", backend=v1),
        Case(path="/path4?animal=kraken", headers={"version": "three"}, backend=v1),
        Case(path="/?animal=shark", status=404),
        Case(path="/path4?animal=kraken", status=404),
        Case(path="/path5?animal=hydra", backend=v1),
    )


async def test_httproute_weight(dp: DataPath) -> None:
    """70/30 between the versions, across clusters, within tolerance."""
    weighted = {"backendRefs": [to("echo-v1", weight=70), to("echo-v2", weight=30)]}
    world = await echo_world(dp, route("mesh-weighted-backends", weighted))
    await expect(world.client, Case(backend=("echo-v1", "echo-v2")))
    await weights(world.client, "echo", {"echo-v1": 0.7, "echo-v2": 0.3})


def header_edits(**spec: Any) -> dict[str, Any]:
    return {"type": "RequestHeaderModifier", "requestHeaderModifier": spec}


def pairs(**values: str) -> list[dict[str, str]]:
    return [{"name": k.replace("_", "-"), "value": v} for k, v in values.items()]


HEADER_EDITS = {
    "/set": {"set": pairs(X_Header_Set="set-overwrites-values")},
    "/add": {"add": pairs(X_Header_Add="add-appends-values")},
    "/remove": {"remove": ["X-Header-Remove"]},
    "/multiple": {
        "set": pairs(X_Header_Set_1="header-set-1", X_Header_Set_2="header-set-2"),
        "add": pairs(
            X_Header_Add_1="header-add-1", X_Header_Add_2="header-add-2", X_Header_Add_3="header-add-3"
        ),
        "remove": ["X-Header-Remove-1", "X-Header-Remove-2"],
    },
    "/case-insensitivity": {
        "set": pairs(X_Header_Set="header-set"),
        "add": pairs(X_Header_Add="header-add"),
        "remove": ["X-Header-Remove"],
    },
}

HEADER_CASES = (
    Case(path="/set", headers={"Some-Other-Header": "val"}, backend="echo-v1",
         request_headers={"Some-Other-Header": "val", "X-Header-Set": "set-overwrites-values"}),
    Case(path="/set", headers={"Some-Other-Header": "val", "X-Header-Set": "some-other-value"},
         backend="echo-v1",
         request_headers={"Some-Other-Header": "val", "X-Header-Set": "set-overwrites-values"}),
    Case(path="/add", headers={"Some-Other-Header": "val"}, backend="echo-v1",
         request_headers={"Some-Other-Header": "val", "X-Header-Add": "add-appends-values"}),
    Case(path="/add", headers={"Some-Other-Header": "val", "X-Header-Add": "some-other-value"},
         backend="echo-v1",
         request_headers={"Some-Other-Header": "val", "X-Header-Add": "some-other-value,add-appends-values"}),
    Case(path="/remove", headers={"X-Header-Remove": "val"}, backend="echo-v1",
         absent_request_headers=("X-Header-Remove",)),
    Case(path="/multiple",
         headers={"X-Header-Set-2": "set-val-2", "X-Header-Add-2": "add-val-2",
                  "X-Header-Remove-2": "remove-val-2", "Another-Header": "another-header-val"},
         backend="echo-v1",
         request_headers={"X-Header-Set-1": "header-set-1", "X-Header-Set-2": "header-set-2",
                          "X-Header-Add-1": "header-add-1", "X-Header-Add-2": "add-val-2,header-add-2",
                          "X-Header-Add-3": "header-add-3", "Another-Header": "another-header-val"},
         absent_request_headers=("X-Header-Remove-1", "X-Header-Remove-2")),
    Case(path="/case-insensitivity",
         headers={"x-header-set": "original-val-set", "x-header-add": "original-val-add",
                  "x-header-remove": "original-val-remove", "Another-Header": "another-header-val"},
         backend="echo-v1",
         request_headers={"X-Header-Set": "header-set", "X-Header-Add": "original-val-add,header-add",
                          "Another-Header": "another-header-val"},
         absent_request_headers=("X-Header-Remove",)),
)  # fmt: skip


async def test_httproute_request_header_modifier(dp: DataPath) -> None:
    """RequestHeaderModifier on a rule: set overwrites, add appends, remove removes, names are
    case-insensitive."""
    rules = [
        {"matches": [prefix(path)], "filters": [header_edits(**spec)], "backendRefs": [to("echo-v1")]}
        for path, spec in HEADER_EDITS.items()
    ]
    world = await echo_world(dp, route("mesh-request-header-modifier", *rules))
    await expect(world.client, *HEADER_CASES)


BACKEND_FILTERS = (
    "filters in backendRefs[] are not implemented: the route is not Accepted (UnsupportedValue, "
    "discovery/gamma.py _rule); from a mesh file, as here, the whole file is refused and isthmus "
    "serve exits ('spec.rules[0].backendRefs[0].filters are not supported'), from a member cluster "
    "the route is left out (no edit is made)"
)


@pytest.mark.xfail(strict=True, raises=ProcessDied, reason=BACKEND_FILTERS)
async def test_httproute_backend_request_header_modifier(dp: DataPath) -> None:
    """The same edits as filters of the backendRef instead of the rule."""
    rules = [
        {"matches": [prefix(path)], "backendRefs": [to("echo-v1", filters=[header_edits(**spec)])]}
        for path, spec in HEADER_EDITS.items()
    ]
    world = await echo_world(dp, route("mesh-request-header-modifier", *rules))
    await expect(world.client, *HEADER_CASES)


def rewrite(kind: str, value: str) -> dict[str, Any]:
    key = "replacePrefixMatch" if kind == "ReplacePrefixMatch" else "replaceFullPath"
    return {"type": "URLRewrite", "urlRewrite": {"path": {"type": kind, key: value}}}


async def test_httproute_rewrite_path(dp: DataPath) -> None:
    """URLRewrite: prefix and full path replacement, with and without header edits."""
    edits = header_edits(
        set=pairs(X_Header_Set="set-overwrites-values"),
        add=pairs(X_Header_Add="header-val-1", X_Header_Add_Append="header-val-2"),
        remove=["X-Header-Remove"],
    )
    world = await echo_world(
        dp,
        route(
            "mesh-rewrite-path",
            {"matches": [prefix("/prefix/one")], "filters": [rewrite("ReplacePrefixMatch", "/one")],
             "backendRefs": [to("echo-v1", 80)]},
            {"matches": [prefix("/strip-prefix")], "filters": [rewrite("ReplacePrefixMatch", "/")],
             "backendRefs": [to("echo-v1", 80)]},
            {"matches": [prefix("/full/one")], "filters": [rewrite("ReplaceFullPath", "/one")],
             "backendRefs": [to("echo-v1", 80)]},
            {"matches": [prefix("/full/rewrite-path-and-modify-headers")],
             "filters": [rewrite("ReplaceFullPath", "/test"), edits], "backendRefs": [to("echo-v1", 80)]},
            {"matches": [prefix("/prefix/rewrite-path-and-modify-headers")],
             "filters": [rewrite("ReplacePrefixMatch", "/prefix"), edits],
             "backendRefs": [to("echo-v1", 80)]},
        ),
    )  # fmt: skip
    sent = {"X-Header-Remove": "remove-val", "X-Header-Add-Append": "append-val-1", "X-Header-Set": "set-val"}
    edited = {
        "X-Header-Add": "header-val-1",
        "X-Header-Add-Append": "append-val-1,header-val-2",
        "X-Header-Set": "set-overwrites-values",
    }
    v1 = "echo-v1"
    await expect(
        world.client,
        Case(path="/prefix/one/two", backend=v1, received_path="/one/two"),
        Case(path="/strip-prefix/three", backend=v1, received_path="/three"),
        Case(path="/strip-prefix", backend=v1, received_path="/"),
        Case(path="/full/one/two", backend=v1, received_path="/one"),
        Case(path="/full/rewrite-path-and-modify-headers/test", headers=sent, backend=v1,
             received_path="/test", request_headers=edited, absent_request_headers=("X-Header-Remove",)),
        Case(path="/prefix/rewrite-path-and-modify-headers/one", headers=sent, backend=v1,
             received_path="/prefix/one", request_headers=edited,
             absent_request_headers=("X-Header-Remove",)),
    )  # fmt: skip


async def test_httproute_named_rule(dp: DataPath) -> None:
    """A rule's name changes nothing of its routing."""
    world = await echo_world(
        dp,
        route(
            "mesh-http-named-rules",
            {"name": "named-rule", "matches": [prefix("/named")], "backendRefs": [to("echo-v1")]},
            {"matches": [prefix("/unnamed")], "backendRefs": [to("echo-v2")]},
        ),
    )
    # (The scenario expects "/named" at the backend for /unnamed too; the backend gets what was sent.)
    await expect(
        world.client,
        Case(path="/named", backend="echo-v1", received_path="/named"),
        Case(path="/unnamed", backend="echo-v2", received_path="/unnamed"),
    )


async def test_httproute_simple_same_namespace(dp: DataPath) -> None:
    """A route in the Service's own namespace sends echo's requests to echo-v1."""
    world = await echo_world(dp, route("gateway-conformance-mesh-test", {"backendRefs": [to("echo-v1")]}))
    await expect(world.client, Case(backend="echo-v1"), count=10)


# ---- redirects -----------------------------------------------------------------------------------


def redirect_rule(match: str, **spec: Any) -> dict[str, Any]:
    return {"matches": [prefix(match)], "filters": [redirect(**spec)]}


def replace(kind: str, value: str) -> dict[str, Any]:
    key = "replacePrefixMatch" if kind == "ReplacePrefixMatch" else "replaceFullPath"
    return {"type": kind, key: value}


async def test_httproute_redirect_path(dp: DataPath) -> None:
    world = await echo_world(
        dp,
        route(
            "mesh-redirect-path",
            redirect_rule("/original-prefix", path=replace("ReplacePrefixMatch", "/replacement-prefix")),
            redirect_rule("/full", path=replace("ReplaceFullPath", "/full-path-replacement")),
            redirect_rule("/path-and-host", hostname="example.org",
                          path=replace("ReplacePrefixMatch", "/replacement-prefix")),
            redirect_rule("/path-and-status", statusCode=301,
                          path=replace("ReplacePrefixMatch", "/replacement-prefix")),
            redirect_rule("/full-path-and-host", hostname="example.org",
                          path=replace("ReplaceFullPath", "/replacement-full")),
            redirect_rule("/full-path-and-status", statusCode=301,
                          path=replace("ReplaceFullPath", "/replacement-full")),
        ),
    )  # fmt: skip
    await expect(
        world.client,
        Case(path="/original-prefix/lemon", status=302, location="http://echo/replacement-prefix/lemon"),
        Case(path="/full/path/original", status=302, location="http://echo/full-path-replacement"),
        Case(path="/path-and-host", status=302, location="http://example.org/replacement-prefix"),
        Case(path="/path-and-status", status=301, location="http://echo/replacement-prefix"),
        Case(path="/full-path-and-host", status=302, location="http://example.org/replacement-full"),
        Case(path="/full-path-and-status", status=301, location="http://echo/replacement-full"),
    )


async def test_httproute_redirect_port(dp: DataPath) -> None:
    world = await echo_world(
        dp,
        route(
            "mesh-redirect-port",
            redirect_rule("/port", port=8083),
            redirect_rule("/port-and-host", hostname="example.org", port=8083),
            redirect_rule("/port-and-status", port=8083, statusCode=301),
            redirect_rule("/port-and-host-and-status", port=8083, hostname="example.org", statusCode=302),
        ),
    )
    await expect(
        world.client,
        Case(path="/port", status=302, location="http://echo:8083/port"),
        Case(path="/port-and-host", status=302, location="http://example.org:8083/port-and-host"),
        Case(path="/port-and-status", status=301, location="http://echo:8083/port-and-status"),
        Case(
            path="/port-and-host-and-status",
            status=302,
            location="http://example.org:8083/port-and-host-and-status",
        ),
    )


async def test_httproute_redirect_scheme(dp: DataPath) -> None:
    world = await echo_world(
        dp,
        route(
            "mesh-redirect-scheme",
            redirect_rule("/scheme", scheme="https"),
            redirect_rule("/scheme-and-host", hostname="example.org", scheme="https"),
            redirect_rule("/scheme-and-status", scheme="https", statusCode=301),
            redirect_rule(
                "/scheme-and-host-and-status", scheme="https", statusCode=302, hostname="example.org"
            ),
        ),
    )
    await expect(
        world.client,
        Case(path="/scheme", status=302, location="https://echo/scheme"),
        Case(path="/scheme-and-host", status=302, location="https://example.org/scheme-and-host"),
        Case(path="/scheme-and-status", status=301, location="https://echo/scheme-and-status"),
        Case(
            path="/scheme-and-host-and-status",
            status=302,
            location="https://example.org/scheme-and-host-and-status",
        ),
    )


async def test_httproute_redirect_host_and_status(dp: DataPath) -> None:
    world = await echo_world(
        dp,
        route(
            "mesh-redirect-host-and-status",
            redirect_rule("/hostname-redirect", hostname="example.org"),
            redirect_rule("/host-and-status", statusCode=301, hostname="example.org"),
        ),
    )
    await expect(
        world.client,
        Case(path="/hostname-redirect", status=302, location="http://example.org/hostname-redirect"),
        Case(path="/host-and-status", status=301, location="http://example.org/host-and-status"),
    )


@pytest.mark.parametrize("status", [303, 307, 308])
async def test_httproute_30x_redirect(dp: DataPath, status: int) -> None:
    """httproute-303/307/308-redirect: the status code alone; and, as their earlier
    *-redirect-host-and-status versions (and httproute-additional-redirect-host-and-status) did,
    with a hostname."""
    path = {303: "/redirect", 307: "/temporary", 308: "/permanent"}[status]
    world = await echo_world(
        dp,
        route(
            f"mesh-{status}-redirect",
            redirect_rule(path, statusCode=status),
            redirect_rule("/host-and-status", statusCode=status, hostname="example.org"),
        ),
    )
    await expect(
        world.client,
        Case(path=path, status=status, location=f"http://echo{path}"),
        Case(path="/host-and-status", status=status, location="http://example.org/host-and-status"),
    )


# ---- MeshGRPCRoute* ------------------------------------------------------------------------------


def grpc_route(name: str, *rules: dict[str, Any]) -> dict[str, Any]:
    return route(name, *rules, port=7070, kind="GRPCRoute")


def grpc_to(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "port": 7070, **extra}


async def grpc_ready(dp: DataPath, world: World, metadata: dict[str, str] | None = None) -> None:
    """Until gRPC calls to echo:7070 (with ``metadata``, for routes that match on it) are answered."""

    async def answered() -> None:
        got = await grpc_calls(dp, world.client, "echo:7070", count=2, metadata=metadata or {})
        sidecar = world.pods["echo-v1"].sidecar
        assert sidecar is not None
        codecs = await sidecar.admin.stats("downstream_cx_http")
        inbound = {k: v for k, v in codecs.items() if "inbound_7070" in k and v}
        assert all(r["ok"] for r in got), f"{got}; echo-v1's sidecar, inbound 7070: {inbound}"

    await eventually(answered, what="gRPC calls to echo:7070 answered", within=WITHIN)


async def test_grpcroute_weight(dp: DataPath) -> None:
    """70/30 between the versions over gRPC (and echo-v3, weight 0, never)."""
    weighted = {"backendRefs": [grpc_to("echo-v1", weight=70), grpc_to("echo-v2", weight=30),
                                grpc_to("echo-v3", weight=0)]}  # fmt: skip
    world = await echo_world(dp, grpc_route("mesh-grpc-weighted-backends", weighted), grpc=True)
    await grpc_ready(dp, world)
    got = await grpc_calls(dp, world.client, "echo:7070", count=REQUESTS // 2)
    assert all(r["ok"] for r in got), [r for r in got if not r["ok"]][:3]
    apps = Counter(r["app"] for r in got)
    print(f"\nGRPCRoute 70/30: observed {dict(apps)} over {len(got)} calls")
    assert set(apps) <= {"echo-v1", "echo-v2"}, apps
    assert abs(apps["echo-v2"] / len(got) - 0.3) <= 0.09, apps  # binomial sd at n=200: 3.2 points


GRPC_EDITS = {
    "set": {"set": pairs(x_header_set="set-overwrites-values")},
    "add": {"add": pairs(x_header_add="add-appends-values")},
    "remove": {"remove": ["x-header-remove"]},
    "multi": {
        "set": pairs(x_header_set_1="header-set-1", x_header_set_2="header-set-2"),
        "add": pairs(x_header_add_1="header-add-1", x_header_add_2="header-add-2"),
        "remove": ["x-header-remove-1", "x-header-remove-2"],
    },
}


async def test_grpcroute_request_header_modifier(dp: DataPath) -> None:
    """RequestHeaderModifier on GRPCRoute rules chosen by a header match."""
    rules = [
        {"matches": [{"headers": [query("x-test-case", case)]}], "filters": [header_edits(**spec)],
         "backendRefs": [grpc_to("echo-v2" if case == "multi" else "echo-v1")]}
        for case, spec in GRPC_EDITS.items()
    ]  # fmt: skip
    world = await echo_world(dp, grpc_route("grpc-request-header-modifier", *rules), grpc=True)
    await grpc_ready(dp, world, {"x-test-case": "set"})  # no rule matches a call without it
    cases = [
        ("set", {"some-other-header": "this-header-should-be-set", "x-header-set": "overwritten"}, "echo-v1",
         {"some-other-header": "this-header-should-be-set", "x-header-set": "set-overwrites-values"}, ()),
        ("add", {"x-header-add": "this-value-should-be-appended"}, "echo-v1",
         {"x-header-add": "this-value-should-be-appended,add-appends-values"}, ()),
        ("remove", {"x-header-remove": "this-should-be-removed"}, "echo-v1", {}, ("x-header-remove",)),
        ("multi", {"x-header-set-2": "set-header-2", "x-header-add-2": "add-header-2",
                   "x-header-remove-2": "should-be-removed-2"}, "echo-v2",
         {"x-header-set-1": "header-set-1", "x-header-set-2": "header-set-2",
          "x-header-add-1": "header-add-1", "x-header-add-2": "add-header-2,header-add-2"},
         ("x-header-remove-1", "x-header-remove-2")),
    ]  # fmt: skip
    for case, sent, backend, want, absent in cases:
        (got,) = await grpc_calls(dp, world.client, "echo:7070", metadata={"x-test-case": case, **sent})
        assert got["ok"], (case, got)
        seen = got["body"]["headers"]
        assert got["app"] == backend, (case, got)
        assert seen["x-test-case"] == case, (case, seen)
        for name, value in want.items():
            assert seen.get(name) == value, (case, name, seen)
        for name in absent:
            assert name not in seen, (case, name, seen)


async def test_grpcroute_request_mirror(dp: DataPath) -> None:
    """RequestMirror: echo-v1 answers, echo-v2 (the other cluster) gets a copy, with the rule's
    header edits when the rule has them."""
    mirror = {"type": "RequestMirror", "requestMirror": {"backendRef": grpc_to("echo-v2")}}
    edits = header_edits(
        set=pairs(X_Header_Set="set-overwrites-values"),
        add=pairs(X_Header_Add="header-val-1", X_Header_Add_Append="header-val-2"),
        remove=["X-Header-Remove"],
    )
    world = await echo_world(
        dp,
        grpc_route(
            "mesh-grpc-request-mirror",
            {"matches": [{"headers": [query("x-mirror-only", "true")]}], "filters": [mirror],
             "backendRefs": [grpc_to("echo-v1")]},
            {"matches": [{"headers": [query("x-mirror-and-modify", "true")]}], "filters": [edits, mirror],
             "backendRefs": [grpc_to("echo-v1")]},
        ),
        grpc=True,
    )  # fmt: skip
    mirrored = world.grpc_servers["echo-v2"]

    async def seen_by_v2(header: str) -> dict[str, str]:
        calls = [json.loads(line.split(" ", 1)[1]) for line in mirrored.log_text().splitlines()
                 if line.startswith("call ")]  # fmt: skip
        found = [c["headers"] for c in calls if header in c["headers"]]
        assert found, f"echo-v2 got no mirrored call with {header}"
        return found[-1]

    async def answered(metadata: dict[str, str]) -> dict[str, Any]:
        (got,) = await grpc_calls(dp, world.client, "echo:7070", metadata=metadata)
        assert got["ok"], got
        assert got["app"] == "echo-v1", got
        return got

    await eventually(lambda: answered({"x-mirror-only": "true"}), what="the mirror-only rule", within=WITHIN)
    await eventually(lambda: seen_by_v2("x-mirror-only"), what="echo-v2 sees the copy", within=WITHIN)
    sent = {
        "x-mirror-and-modify": "true",
        "x-header-remove": "remove-val",
        "x-header-add-append": "append-val-1",
    }
    got = await eventually(lambda: answered(sent), what="the mirror-and-modify rule", within=WITHIN)
    edited = {
        "x-header-set": "set-overwrites-values",
        "x-header-add": "header-val-1",
        "x-header-add-append": "append-val-1,header-val-2",
    }
    for headers in (got["body"]["headers"], await eventually(lambda: seen_by_v2("x-mirror-and-modify"),
                                                               what="echo-v2 sees the edited copy",
                                                               within=WITHIN)):  # fmt: skip
        for name, value in edited.items():
            assert headers.get(name) == value, (name, headers)
        assert "x-header-remove" not in headers, headers
