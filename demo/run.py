"""`make demo`: a two-cluster mesh on this machine, with real Envoys, shown failing over and back.

Two member clusters, east and west, each in its own network namespace (as root; on loopback
addresses otherwise), joined only through their east-west gateways. isthmus serves every Envoy.
The demo sends requests from a client in east, prints who answered, kills east's copy of a service
and shows the traffic moving to west, then brings it back. Everything it started is removed on
exit or Ctrl-C. It reuses the data-path test harness (tests/datapath), the same code the tests run.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from datapath.harness import DataPath, NsEnvoy, envoy_binary
from datapath.scenario import meshed, pods, start_sidecars, stream_around


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def show(client: NsEnvoy, host: str, count: int = 20) -> dict[str, int]:
    got = await client.request(host, "/", count=count)
    answered = ", ".join(f"{n} by {app}" for app, n in sorted(got.by_app.items())) or "none"
    failed = len(got.results) - got.ok
    print(f"   {count} requests to {host}: {answered}" + (f"; {failed} failed" if failed else ""), flush=True)
    return dict(got.by_app)


async def until_served(client: NsEnvoy, host: str, app: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got = await client.request(host, "/", count=5)
        if got.by_app == {app: 5}:
            return
        await asyncio.sleep(0.5)
    raise SystemExit(f"demo: {host} was not served by {app} within {within:.0f} s")


async def demo(workdir: Path) -> None:
    say("Creating two member clusters, east and west (one network namespace each where possible)")
    dp = await DataPath.start(("east", "west"), workdir=workdir, envoy_bin=envoy_binary())
    try:
        print(
            f"   mode: {dp.topology.mode}" + (f" ({dp.topology.fallback_reason})" if not dp.isolated else "")
        )
        for net in dp.topology:
            print(f"   {net.name}: pods in {net.pod_cidr}, east-west gateway at {net.gateway_address}:15443")

        say("Starting sample apps: web in both clusters, api only in west")
        p = await pods(dp, ("east", "web-east"), ("west", "web-west"), ("west", "api-west"))
        services = (
            dp.mesh.service("web", meshed(dp, p["web-east"], "web"), meshed(dp, p["web-west"], "web")),
            dp.mesh.service("api", meshed(dp, p["api-west"], "api")),
        )
        say("Starting isthmus (mesh CA, xDS on a Unix socket), a sidecar per app, gateways, a client")
        await dp.control_plane(*services, extra_args=("--ca-dir", str(workdir / "ca")))
        await start_sidecars(dp, {"web-east": "web", "web-west": "web", "api-west": "api"}, p)
        await dp.gateway("east")
        await dp.gateway("west")
        client = await dp.sidecar("east", "client")
        await until_served(client, "web.shop", "web-east")
        await until_served(client, "api.shop", "api-west")

        say("A client in east calls web (in both clusters): east answers, it is closer")
        await show(client, "web.shop")
        say("It calls api (only in west): west answers, through west's gateway, over mTLS")
        await show(client, "api.shop", 10)

        say("Killing web in east (its process stops; nothing tells the control plane)")
        stream, killed = await stream_around(
            client, "web.shop", lambda: dp.agent("east").stop_app("web-east")
        )
        after, failed = stream.after(killed), len(stream.failed_after(killed))
        moved = stream.recovered_at(killed, "web-west")
        print(f"   a steady stream of {len(after)} requests since the kill: {failed} failed", flush=True)
        if moved is not None:
            print(f"   all answered by west from {1000 * (moved - killed):.0f} ms after the kill", flush=True)
        await show(client, "web.shop")

        say("Bringing web in east back")
        await dp.agent("east").start_app("web-east", p["web-east"].app.address, p["web-east"].app.port)
        print("   (outlier detection lets east back in after its ejection time, about 10 s)", flush=True)
        await until_served(client, "web.shop", "web-east", within=40)
        await show(client, "web.shop")
        say("Done: cleaning up (namespaces, Envoys, apps, control plane)")
    finally:
        dp.close()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="isthmus-demo-") as tmp:
        try:
            asyncio.run(demo(Path(tmp)))
        except KeyboardInterrupt:
            print("\ninterrupted: cleaned up", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
