"""Generation and serialization cost of a large mesh, and the cost of framing shared bytes per stream.

Workload W1 of docs/benchmarks.md: 3 clusters x 1,000 services x 10 endpoints. Measures, for one
proxy key: generating and serializing every type (cold), a regeneration after one endpoint change,
and building one full SotW CDS / EDS response from the shared bytes (what each extra stream costs).
Usage: python -m bench.serialize [--services N] [--endpoints N] [--clusters N]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

from isthmus.discovery.model import (
    Endpoint,
    Locality,
    MemberCluster,
    MeshView,
    Service,
    ServiceKey,
    ServicePort,
)
from isthmus.xds import types
from isthmus.xds.cache import ConfigCache
from isthmus.xds.proxy import Proxy, Role
from isthmus.xds.resources import sotw_response


def build_mesh(clusters: int, services: int, endpoints: int, bump: int = 0) -> MeshView:
    members = [MemberCluster(f"c{c}", region=f"r{c % 2}", zone=f"z{c}") for c in range(clusters)]
    svcs = []
    for s in range(services):
        eps = []
        for c in range(clusters):
            for e in range(endpoints):
                host = (s * endpoints + e + (bump if s == 0 and e == 0 and c == 0 else 0)) % 65000
                eps.append(
                    Endpoint(f"127.{c}.{host // 256}.{host % 256}", Locality(f"r{c % 2}", f"z{c}", f"c{c}"))
                )
        svcs.append(Service(ServiceKey("bench", f"svc-{s}"), (ServicePort("http", 80, 8080),), tuple(eps)))
    return MeshView.build(svcs, members)


def timed(fn: Callable[[], object], repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clusters", type=int, default=3)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    args = parser.parse_args()
    proxy = Proxy("bench", Role.SIDECAR, "bench", "client", "client", Locality("r0", "z0", "c0"))
    view = build_mesh(args.clusters, args.services, args.endpoints)
    print(f"# isthmus serialize bench on {platform.machine()} python {platform.python_version()}")
    print(f"mesh: {args.clusters} clusters x {args.services} services x {args.endpoints} endpoints")

    def cold() -> None:
        cache = ConfigCache(view)
        for t in types.PUSH_ORDER:
            cache.resources(t, proxy)

    print(f"cold generate+serialize, all types, one proxy key: {timed(cold, 3) * 1000:.1f} ms")
    cache = ConfigCache(view)
    for t in types.PUSH_ORDER:
        cache.resources(t, proxy)
    changed = build_mesh(args.clusters, args.services, args.endpoints, bump=7)

    def one_change() -> None:
        cache.set_view(changed if cache.view is view else view)
        cache.resources(types.ENDPOINT, proxy)

    print(f"regenerate EDS after one endpoint change (whole type): {timed(one_change, 3) * 1000:.1f} ms")
    cds = list(cache.resources(types.CLUSTER, proxy).values())
    eds = list(cache.resources(types.ENDPOINT, proxy).values())
    t_cds = timed(lambda: sotw_response(types.CLUSTER, "v", "1", cds), 20)
    t_eds = timed(lambda: sotw_response(types.ENDPOINT, "v", "1", eds), 20)
    size = len(sotw_response(types.ENDPOINT, "v", "1", eds))
    print(f"frame full CDS response from shared bytes ({len(cds)} clusters): {t_cds * 1e6:.0f} us")
    print(
        f"frame full EDS response from shared bytes ({len(eds)} CLAs, {size / 1e6:.1f} MB): "
        f"{t_eds * 1e6:.0f} us"
    )


if __name__ == "__main__":
    main()
