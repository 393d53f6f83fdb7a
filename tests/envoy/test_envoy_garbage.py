"""1,000 connections to the xDS port that send garbage or nothing, against `isthmus serve` with TLS
and token authentication (issue 12): the process stays up, its memory stays bounded, and honest
Envoys keep being served (one connected before gets changes made while the garbage is open, one
started meanwhile is served).

The garbage is opened from this process, in two waves of 1,000 (``KINDS``): TCP connections that
send nothing; random bytes; TLS handshakes (verified with the mesh root) followed by nothing,
random bytes, a bogus HTTP/2 preface, or the real preface and a frame no client may send first;
gRPC ADS streams with no token or an unknown one, each on its own HTTP/2 connection. What the
server must do with each: close what sent garbage; refuse the streams with UNAUTHENTICATED (and
count them, by reason, and keep no state for them); keep serving while the silent ones are held.
The silent ones are held while the wave is measured; the server closes them once they have not
finished their handshake (TLS and HTTP/2 SETTINGS) in 10 s, and an HTTP/2 connection that holds no
stream (like the refused streams' connections) after 60 s idle (isthmus's limits; gRPC's
defaults were 120 s and never: measured before they were set). The second test checks the 10 s.
Once this process drops its ends, the server's descriptors go back to what they were.

The file-descriptor limit is this test's business, not the shell's: it raises its soft
RLIMIT_NOFILE (the server inherits it) to what 1,000 connections at both ends need, and checks
that the server has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import ssl
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from conftest import LOOPBACK
from isthmus.xds.ca import CERT_FILE

pytestmark = pytest.mark.envoy

GOOD, LATE = "tok-garbage-good-0123456789", "tok-garbage-late-0123456789"

# How many connections of each kind one wave opens (1,000 in all).
KINDS = {
    "tcp-silent": 200,  # connect, send nothing
    "tcp-random": 200,  # random bytes where a TLS ClientHello should be
    "tls-silent": 100,  # a TLS handshake, then nothing (no HTTP/2 preface)
    "tls-random": 150,  # TLS, then random bytes
    "tls-bad-preface": 100,  # TLS, then something that starts like the HTTP/2 preface and is not
    "tls-bad-frame": 50,  # TLS, the real preface, then a DATA frame on stream 0
    "grpc-no-token": 100,  # an ADS stream without credentials
    "grpc-bad-token": 100,  # an ADS stream with an unknown bearer token
}
WAVE = sum(KINDS.values())
SILENT = {"tcp-silent", "tls-silent"}  # closed by the server after 10 s (see above)
GRPC = {"grpc-no-token", "grpc-bad-token"}  # refused streams; their connections stay up (idle)
GARBAGE = set(KINDS) - SILENT - GRPC  # the server must close these
HELD = sum(n for kind, n in KINDS.items() if kind not in GARBAGE)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# The server's RSS with one wave held open, over its RSS before (after the first Envoy was
# served). Measured on this machine (2 cores, grpcio 1.85, glibc malloc, Python 3.11): +23 to +25
# MiB (eight runs), a change and a second Envoy's stream included. Separately, 1,000 of one kind
# held open cost: silent TCP +20 MiB, silent TLS +44 MiB, gRPC connections with a refused stream
# +55 MiB; garbage the server closes +5 to +10 MiB. Twice the measured growth: a server that kept
# per-connection state of a connection's size after refusing it would exceed it. The same bound
# holds for the second wave over the RSS once the first was dropped (measured +5 to +12 MiB).
# Nothing sharper is asserted: two waves cannot tell a leak from the allocator. glibc does not
# give a wave's memory back (RSS even rises ~9 MiB while 1,000 connections are torn down) and
# reuses most of it, so repeated waves add less and less. 1,000 gRPC connections 25 times over:
# +75 MiB after the first wave, +115 MiB more over the next 24 (1 to 10 MiB each, tapering);
# with MALLOC_ARENA_MAX=2, +74, then +17 over the next three waves and +13 over the last 21.
WAVE_RSS_BOUND = 48 * 2**20


@pytest.fixture
def descriptors() -> Iterator[int]:
    """Raise this process's soft RLIMIT_NOFILE (inherited by the server it starts) for one wave
    at both ends plus what Envoy, gRPC and pytest hold; restore it afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * WAVE + 1024
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.fail(f"the hard limit on open files is {hard}; this test needs {need}")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        yield need
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def rss(pid: int) -> int:
    """VmRSS of /proc/PID/status, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open-files limit in /proc/{pid}/limits")


def random_bytes(n: int) -> bytes:
    """Random bytes whose second byte is not 0x03. Bytes X, 0x03, ... read as the header of a TLS
    record (version 3.x) with a random length the rest does not fill, and the server rightly
    waits for the rest of the record, as for a silent connection (until its handshake timeout;
    seen: about 1 in 256 connections otherwise)."""
    data = bytearray(os.urandom(n))
    if len(data) > 1 and data[1] == 0x03:
        data[1] = 0x00
    return bytes(data)


# ---- the garbage -------------------------------------------------------------------------------


@dataclass
class Junk:
    """One garbage connection: whether the server closed it; for the gRPC kinds, the stream's
    final status and whether it received anything."""

    kind: str
    writer: asyncio.StreamWriter | None = None
    channel: grpc.aio.Channel | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    code: grpc.StatusCode | None = None
    error: str = ""

    @property
    def state(self) -> str:
        if self.error:
            return "error"
        if self.code is not None:
            return self.code.name
        return "closed" if self.closed.is_set() else "open"


class Garbage:
    """Opens and holds one wave of garbage connections to the xDS port."""

    def __init__(self, port: int, root: Path) -> None:
        self.port = port
        self.tls = ssl.create_default_context(cafile=str(root))
        self.tls.set_alpn_protocols(["h2"])
        self.credentials = grpc.ssl_channel_credentials(root.read_bytes())
        self.junk = [Junk(kind) for kind, n in KINDS.items() for _ in range(n)]
        self._readers: list[asyncio.Task[None]] = []

    async def open(self, concurrency: int = 50) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one(junk: Junk) -> None:
            async with gate:
                try:
                    await (self._grpc(junk) if junk.kind in GRPC else self._raw(junk))
                except (OSError, ssl.SSLError, TimeoutError) as exc:
                    junk.error = f"{type(exc).__name__}: {exc}"

        await asyncio.gather(*(one(j) for j in self.junk))

    async def _raw(self, junk: Junk) -> None:
        tls = self.tls if junk.kind.startswith("tls-") else None
        connect = asyncio.open_connection(
            LOOPBACK, self.port, ssl=tls, server_hostname="localhost" if tls else None
        )
        reader, writer = await asyncio.wait_for(connect, 10)
        junk.writer = writer
        if junk.kind.endswith("-random"):
            writer.write(random_bytes(4096))
        elif junk.kind == "tls-bad-preface":
            writer.write(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + random_bytes(256))
        elif junk.kind == "tls-bad-frame":
            # DATA (type 0) on stream 0, where the client's SETTINGS must come: a connection error.
            writer.write(PREFACE + b"\x00\x00\x08\x00\x00\x00\x00\x00\x00" + random_bytes(8))
        with contextlib.suppress(OSError):
            await writer.drain()
        self._readers.append(asyncio.create_task(self._until_closed(junk, reader)))

    async def _until_closed(self, junk: Junk, reader: asyncio.StreamReader) -> None:
        """Read (and drop) what the server sends until it closes the connection."""
        with contextlib.suppress(OSError, ssl.SSLError):
            while await reader.read(65536):
                pass
        junk.closed.set()

    async def _grpc(self, junk: Junk) -> None:
        metadata = [("isthmus-cluster", "east")]
        if junk.kind == "grpc-bad-token":
            metadata.append(("authorization", "Bearer " + os.urandom(16).hex()))
        # A local subchannel pool: each channel is its own HTTP/2 connection.
        junk.channel = grpc.aio.secure_channel(
            f"{LOOPBACK}:{self.port}",
            self.credentials,
            options=[("grpc.ssl_target_name_override", "localhost"), ("grpc.use_local_subchannel_pool", 1)],
        )
        call = junk.channel.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=None,
        )(metadata=metadata, timeout=10)
        # The server refuses on the metadata alone, before any request, so this sends none. (A
        # request written at once races the refusal: grpcio's client then sometimes ends the call
        # with INTERNAL "Internal error from Core" instead of the status the server sent and counted.)
        try:
            answer = await call.read()
            junk.error = f"the stream was answered: {answer!r:.80}"
        except grpc.aio.AioRpcError:
            pass
        junk.code = await call.code()

    def states(self) -> dict[str, Counter[str]]:
        out: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
        for j in self.junk:
            out[j.kind][j.state] += 1
        return out

    async def garbage_closed(self, within: float) -> None:
        """Wait (bounded) until the server closed every connection that sent garbage."""
        with contextlib.suppress(TimeoutError):
            waits = [j.closed.wait() for j in self.junk if j.kind in GARBAGE and not j.error]
            await asyncio.wait_for(asyncio.gather(*waits), within)

    async def close(self) -> None:
        """Drop every connection at once (no TLS close_notify: garbage clients just vanish)."""
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        for j in self.junk:
            if j.writer is not None:
                j.writer.transport.abort()
        await asyncio.gather(*(j.channel.close(None) for j in self.junk if j.channel is not None))


# ---- the test ----------------------------------------------------------------------------------


async def test_garbage_connections_leave_the_server_up_bounded_and_serving(
    procs, mesh, upstreams, eventually, tmp_path, descriptors
) -> None:
    upstream = [await upstreams.start(f"web-{i}", f"127.0.0.{i}") for i in (1, 2, 3)]
    mesh.write(mesh.service("web", upstream[0], port=80))
    tokens = write(tmp_path / "tokens.csv", f"{GOOD},shop,default,east\n{LATE},shop,default,east\n")
    ca_dir = tmp_path / "ca"
    cp = await procs.control_plane(
        mesh.path, ["--xds-san", "localhost", "--ca-dir", str(ca_dir), "--xds-token-file", str(tokens)]
    )
    assert cp.proc is not None
    pid = cp.proc.pid
    assert soft_nofile(pid) >= descriptors, "the server does not have the raised open-files limit"
    root = ca_dir / CERT_FILE
    tls = ["--xds-root-ca", str(root), "--xds-server-name", "localhost"]

    def credentials(name: str, token: str) -> list[str]:
        return [*tls, "--token-file", str(write(tmp_path / f"{name}.token", token))]

    cluster = mesh.cluster("web", 80)

    def serves(proxy, count: int):  # type: ignore[no-untyped-def]
        """A check: the proxy has the first ``count`` upstreams of web, and nothing died."""

        async def check() -> None:
            proxy.ensure_running()
            cp.ensure_running()
            hosts = await proxy.admin.cluster_hosts()
            assert set(hosts.get(cluster, {})) == {u.address for u in upstream[:count]}, hosts

        return check

    honest = await procs.envoy(
        procs.bootstrap(xds_port=cp.xds_port, delta=True, extra=credentials("a", GOOD))
    )
    await eventually(serves(honest, 1), what="the honest Envoy is served")
    await asyncio.sleep(1.0)  # the first push's transient gone before the baseline
    rss0, fds0 = rss(pid), open_files(pid)
    refused0 = Counter((await cp.readyz())["xds"]["refused_streams"])

    # ---- wave 1: a change reaches the Envoy connected before; an Envoy started meanwhile is served
    wave = Garbage(cp.xds_port, root)
    try:
        await wave.open()
        fds1 = open_files(pid)
        mesh.write(mesh.service("web", *upstream[:2], port=80))
        await eventually(serves(honest, 2), what="the honest Envoy gets a change made meanwhile")
        late = await procs.envoy(
            procs.bootstrap(xds_port=cp.xds_port, delta=False, service="late", extra=credentials("b", LATE))
        )
        await eventually(serves(late, 2), what="an Envoy started meanwhile is served")
        await wave.garbage_closed(within=10)
        states1, rss1 = wave.states(), rss(pid)
        proxies1 = (await cp.readyz())["proxies"]
    finally:
        await wave.close()
    refused = Counter((await cp.readyz())["xds"]["refused_streams"]) - refused0

    assert all(j.state != "error" for j in wave.junk), [j.error for j in wave.junk if j.error][:5]
    for kind in GARBAGE:
        assert states1[kind] == {"closed": KINDS[kind]}, f"{kind}: {states1[kind]} (server did not close)"
    for kind in GRPC:
        assert states1[kind] == {"UNAUTHENTICATED": KINDS[kind]}, f"{kind}: {states1[kind]}"
    assert refused == {"no-credentials": KINDS["grpc-no-token"], "bad-token": KINDS["grpc-bad-token"]}
    assert proxies1 == 2, f"{proxies1} proxies with state on the server; only the 2 Envoys may have any"
    # The server held what was not garbage (else this test loaded nothing).
    assert fds1 >= fds0 + HELD, f"server descriptors {fds0} -> {fds1}, {HELD} connections held"

    async def descriptors_back() -> None:
        # + 1: the late Envoy's connection
        assert open_files(pid) <= fds0 + 1, f"server descriptors {open_files(pid)}, {fds0} before"

    await eventually(descriptors_back, what="the server closed its ends of the dropped garbage", within=15)
    rss_dropped = rss(pid)

    # ---- wave 2: the same again, after the first was dropped
    wave = Garbage(cp.xds_port, root)
    try:
        await wave.open()
        mesh.write(mesh.service("web", *upstream[:3], port=80))
        await eventually(serves(honest, 3), what="the honest Envoy gets a second change")
        await eventually(serves(late, 3), what="the late Envoy gets it too")
        await wave.garbage_closed(within=10)
        states2, rss2 = wave.states(), rss(pid)
    finally:
        await wave.close()
    # Silent connections may be open or already closed (the 10 s handshake limit), by timing.
    assert {k: v for k, v in states2.items() if k not in SILENT} == {
        k: v for k, v in states1.items() if k not in SILENT
    }, "the second wave was not treated like the first"
    await eventually(descriptors_back, what="the server closed its ends of the second wave", within=15)
    cp.ensure_running()
    print(
        f"\nserver RSS {rss0 / 2**20:.1f} MiB, with wave 1 {rss1 / 2**20:.1f}, wave 1 dropped "
        f"{rss_dropped / 2**20:.1f}, with wave 2 {rss2 / 2**20:.1f}, after {rss(pid) / 2**20:.1f}; "
        f"descriptors {fds0}, with wave 1 {fds1}"
    )
    assert rss1 - rss0 < WAVE_RSS_BOUND, f"RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB with a wave"
    assert rss2 - rss_dropped < WAVE_RSS_BOUND, (
        f"RSS {rss_dropped / 2**20:.1f} MiB -> {rss2 / 2**20:.1f} with the second wave"
    )


async def test_connections_that_never_finish_their_handshake_are_closed(
    procs, mesh, upstreams, tmp_path
) -> None:
    """100 connections that connect (50 also finish TLS) and then say nothing are closed by the
    server, not held: the handshake limit (10 s) bounds what silent clients can pile up."""
    web = await upstreams.start("web-1", "127.0.0.1")
    mesh.write(mesh.service("web", web, port=80))
    ca_dir = tmp_path / "ca"
    cp = await procs.control_plane(mesh.path, ["--xds-san", "localhost", "--ca-dir", str(ca_dir)])
    tls = ssl.create_default_context(cafile=str(ca_dir / CERT_FILE))
    tls.set_alpn_protocols(["h2"])

    async def silent(secure: bool) -> bool:
        """True once the server closed the connection (within 30 s)."""
        reader, writer = await asyncio.open_connection(
            LOOPBACK,
            cp.xds_port,
            ssl=tls if secure else None,
            server_hostname="localhost" if secure else None,
        )
        try:
            async with asyncio.timeout(30):
                with contextlib.suppress(OSError, ssl.SSLError):
                    while await reader.read(65536):
                        pass
            return True
        except TimeoutError:
            return False
        finally:
            writer.transport.abort()

    closed = await asyncio.gather(*(silent(i % 2 == 0) for i in range(100)))
    assert all(closed), f"{closed.count(False)} of 100 silent connections were still open after 30 s"
