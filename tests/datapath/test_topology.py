"""The data-path harness itself: clusters are isolated except for their transit (gateway) addresses,
agents serve and send traffic inside their namespaces, a real Envoy in a namespace gets its
configuration over the control plane's Unix socket and routes through its outbound listener, and
nothing is left behind (not after a failure, a Ctrl-C, or a SIGKILL followed by the next run)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from datapath.harness import AgentError, DataPath, eventually
from datapath.netns import PREFIX, Topology, cleanup_stale, list_namespaces, namespace_pids

pytestmark = pytest.mark.datapath

HERE = Path(__file__).resolve().parent
SIGNALS = {"ctrl-c": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}


def _alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _our_namespaces(run_id: str) -> list[str]:
    return [n for n in list_namespaces() if n.startswith(run_id)]


def _root_links() -> list[str]:
    done = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return sorted(line.split(":")[1].strip() for line in done.stdout.splitlines())


# ---- (a) isolation -----------------------------------------------------------------------------


async def test_only_transit_addresses_are_reachable_across_clusters(dp: DataPath) -> None:
    if not dp.isolated:
        pytest.skip(f"loopback mode ({dp.topology.fallback_reason}): clusters are not isolated")
    east, west = dp["east"], dp["west"]
    pod_app = await dp.app("west", "web-west")
    transit_app = await dp.agent("west").start_app("gw-west", west.transit_address, port=15443)

    # Inside west, its own pod address answers: the address exists and something listens on it.
    assert (await dp.agent("west").connect(pod_app.address, pod_app.port)).ok

    # From east, west's pod address has no route at all; west's transit address answers.
    blocked = await dp.agent("east").connect(pod_app.address, pod_app.port)
    assert not blocked.ok, blocked
    assert blocked.errno == errno.ENETUNREACH, blocked
    reached = await dp.agent("east").connect(transit_app.address, transit_app.port)
    assert reached.ok, reached
    assert reached.local is not None
    assert reached.local.startswith(east.transit_address + ":"), reached

    answer = await dp.agent("east").get(f"http://{transit_app.hostport}/probe")
    assert (answer.status, answer.app, answer.cluster) == (200, "gw-west", "west"), answer
    assert answer.body is not None
    assert answer.body["peer"] == east.transit_address

    # A pod address of east's own range is local to east: refused there, not unreachable.
    own = await dp.agent("east").connect(east.pod(200), 9)
    assert own.errno == errno.ECONNREFUSED, own


# ---- (b) an upstream answers in its own cluster ------------------------------------------------


async def test_app_answers_inside_its_cluster(dp: DataPath) -> None:
    app = await dp.app("east", "web-east")
    assert app.address.startswith(dp["east"].pod_net + "."), app

    got = await dp.agent("east").requests(
        f"http://{app.hostport}/hello?x=1", count=3, headers={"X-Probe": "yes"}, concurrency=3
    )
    assert got.all_ok, got.summary()
    assert got.by_app == {"web-east": 3}, got.summary()
    first = got.results[0]
    assert first.cluster == "east"
    assert first.body is not None
    assert first.body["path"] == "/hello"
    assert first.body["query"] == "x=1"
    assert first.request_header("x-probe") == "yes"
    assert (await dp.agent("east").apps())["web-east"]["hits"] == 3

    # Requests and connects can come from a given local (pod) address.
    source = dp["east"].pod(3)
    via = await dp.agent("east").get(f"http://{app.hostport}/", source=source)
    assert via.body is not None
    assert via.body["peer"] == source, via.body
    connected = await dp.agent("east").connect(app.address, app.port, source=source)
    assert connected.local is not None
    assert connected.local.startswith(source + ":"), connected

    # An app can be stopped; then its address refuses connections.
    await dp.agent("east").stop_app("web-east")
    gone = await dp.agent("east").get(f"http://{app.hostport}/", timeout=2)
    assert gone.status is None, gone
    assert gone.errno == errno.ECONNREFUSED, gone


async def test_loopback_mode_refuses_non_loopback_addresses(make_datapath) -> None:
    with pytest.warns(UserWarning, match=r"loopback mode \(requested\): NOT isolated"):
        fallback = await make_datapath("east", "west", mode="loopback")
    assert not fallback.isolated
    app = await fallback.app("west", "web-west")
    assert app.address.startswith("127.2.0."), app
    got = await fallback.agent("east").get(f"http://{app.hostport}/")  # nothing is isolated here
    assert (got.status, got.cluster) == (200, "west"), got.describe()
    for host in ("10.2.0.10", "192.0.2.1", "0.0.0.0"):
        with pytest.raises(AgentError, match="not a loopback address"):
            await fallback.agent("east").connect(host, 80)
    with pytest.raises(AgentError, match="not a loopback address"):
        await fallback.agent("east").get("http://10.2.0.10:8080/")
    with pytest.raises(AgentError, match="not a loopback address"):
        await fallback.app("east", "web", address="0.0.0.0")


# ---- (c) a real Envoy, xDS over the Unix socket ------------------------------------------------


@pytest.mark.envoy
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_sidecar_in_namespace_routes_to_app(dp: DataPath, delta: bool) -> None:
    app = await dp.app("east", "web-east")
    cp = await dp.control_plane(dp.mesh.service("web", app))
    proxy = await dp.sidecar("east", "client", delta=delta)
    assert proxy.listen_address.startswith(dp["east"].pod_net + ".")

    await proxy.wait_listeners("outbound_http_15001")

    async def routed() -> None:
        got = await proxy.request("web.shop", "/via-sidecar", count=2)
        assert got.by_app == {"web-east": 2}, got.summary()
        first = got.results[0]
        assert first.body is not None
        assert first.body["path"] == "/via-sidecar"
        assert "x-envoy-upstream-service-time" in first.headers, first.headers  # Envoy answered
        assert first.request_header("x-request-id"), first.body  # ... and forwarded it

    await eventually(routed, what="the sidecar routes web.shop to the app in east", within=15)

    # The xDS connection is the Unix socket: Envoy's isthmus_xds cluster has it open.
    stats = await proxy.admin.stats(r"^cluster\.isthmus_xds\.upstream_cx_active$")
    assert stats == {"cluster.isthmus_xds.upstream_cx_active": 1}, stats
    await cp.wait_proxies(1)


@pytest.mark.envoy
@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
async def test_envoy_reconnects_after_control_plane_restart(dp: DataPath, kill: bool) -> None:
    """The Unix socket survives a restart of the control plane, even a SIGKILL (stale socket file)."""
    app = await dp.app("east", "web-east")
    await dp.control_plane(dp.mesh.service("web", app))
    proxy = await dp.sidecar("east", "client", wait="live")
    assert dp.cp is not None
    await dp.cp.wait_proxies(1)
    cp = await dp.restart_control_plane(kill=kill)
    await cp.wait_proxies(1, within=15)
    got = await proxy.request("web.shop")
    assert got.by_app == {"web-east": 1}, got.summary()


@pytest.mark.envoy
async def test_gateway_in_namespace_connects(dp: DataPath) -> None:
    await dp.control_plane()
    gateways = [await dp.gateway("east", wait="live"), await dp.gateway("west", wait="live")]
    assert [g.listen_address for g in gateways] == [dp["east"].transit_address, dp["west"].transit_address]
    assert dp.cp is not None
    await dp.cp.wait_proxies(2)


# ---- (d) cleanup -------------------------------------------------------------------------------


async def test_close_removes_namespaces_processes_and_files(tmp_path: Path, envoy_bin: str | None) -> None:
    links_before = _root_links()
    made = await DataPath.start(("east", "west", "north"), workdir=tmp_path, envoy_bin=envoy_bin)
    try:
        topo = made.topology
        app = await made.app("north", "web")
        await made.control_plane(made.mesh.service("web", app))
        if envoy_bin is not None:
            await made.sidecar("north", "client")
        pids = [p.pid for p in topo.processes]
        namespaces = _our_namespaces(topo.run_id)
        if topo.isolated:
            assert len(namespaces) == 4, namespaces  # transit + 3 clusters
            assert set(namespace_pids(topo["north"].netns or "")) >= {
                p.pid for p in topo.processes if p.where == topo["north"].netns
            }
        assert all(_alive(pid) for pid in pids)
        assert topo.rundir.is_dir()
    finally:
        made.close()
    made.close()  # idempotent
    assert _our_namespaces(topo.run_id) == []
    assert not [pid for pid in pids if _alive(pid)]
    assert not topo.rundir.exists()
    assert _root_links() == links_before  # nothing ever touched the root namespace's links


def test_failure_inside_the_topology_still_cleans_up() -> None:
    with pytest.raises(RuntimeError, match="boom"), Topology(["east"]) as topo:  # noqa: PT012
        proc = topo.run("east", ["sleep", "30"], name="sleeper")
        raise RuntimeError("boom")
    assert _our_namespaces(topo.run_id) == []
    assert not _alive(proc.pid)
    assert not topo.rundir.exists()


def test_leftovers_of_a_crashed_run_are_removed() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_id = f"{PREFIX}-{dead.pid}-abcdef"  # owned by a process that no longer exists
    netns, rundir = f"{run_id}-east", Path(tempfile.gettempdir()) / run_id
    with Topology(["east"], mode="netns") as live:  # a live run's namespaces must survive the sweep
        subprocess.run(["ip", "netns", "add", netns], check=True)
        rundir.mkdir()
        sleeper = subprocess.Popen(["ip", "netns", "exec", netns, "sleep", "30"], start_new_session=True)
        try:
            deadline = time.monotonic() + 5
            while sleeper.pid not in namespace_pids(netns) and time.monotonic() < deadline:
                time.sleep(0.02)
            removed = cleanup_stale()
            assert netns in removed
            assert str(rundir) in removed
            assert sleeper.wait(timeout=5) == -signal.SIGKILL
            assert netns not in list_namespaces()
            assert not rundir.exists()
            assert len(_our_namespaces(live.run_id)) == 2, "cleanup_stale removed a live run's namespaces"
            assert live.rundir.is_dir()
        finally:
            if sleeper.poll() is None:
                os.killpg(sleeper.pid, signal.SIGKILL)
                sleeper.wait()
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
            if rundir.exists():
                rundir.rmdir()


@pytest.mark.parametrize("how", list(SIGNALS))
def test_interrupted_run_leaves_nothing(tmp_path: Path, how: str) -> None:
    """A child pytest builds a data path and is interrupted: on Ctrl-C or SIGTERM it removes everything
    itself; on SIGKILL its processes die with it (parent-death signal) and the next run sweeps the rest."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    out = tmp_path / "created.json"
    log = tmp_path / "child.log"
    pytest_argv = [
        sys.executable, "-m", "pytest", str(HERE / "interrupt_probe.py"),
        "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "child"),
    ]  # fmt: skip
    # As from a terminal: SIGINT handled by default, even if this pytest runs with SIGINT ignored (as
    # `cmd &` does in a non-interactive shell; an ignored signal stays ignored across exec).
    shim = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    argv = [sys.executable, "-c", shim, *pytest_argv]
    with log.open("wb") as sink:
        child = subprocess.Popen(
            argv,
            cwd=HERE.parent.parent,
            env={**os.environ, "DATAPATH_PROBE_OUT": str(out)},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 25
        while not out.exists():
            assert child.poll() is None, f"child pytest exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"child pytest did not get ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        created = json.loads(out.read_text())
        assert all(n in list_namespaces() for n in created["namespaces"])
        assert all(_alive(pid) for pid in created["pids"])

        child.send_signal(SIGNALS[how])
        child.wait(timeout=20)

        deadline = time.monotonic() + 5
        while [p for p in created["pids"] if _alive(p)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in created["pids"] if _alive(p)], "processes survived their pytest"
        if how == "sigkill":
            assert all(n in list_namespaces() for n in created["namespaces"])  # nobody could clean up
            removed = cleanup_stale()  # what the next run does first
            assert set(created["namespaces"]) <= set(removed)
        assert not [n for n in created["namespaces"] if n in list_namespaces()]
        assert not Path(created["rundir"]).exists()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        cleanup_stale()
