"""The cache: memoized generation per proxy key, interning of identical bytes, change notification."""

from __future__ import annotations

import asyncio

from isthmus.discovery.file import example_mesh_text, parse_mesh
from isthmus.discovery.model import Locality
from isthmus.xds import types
from isthmus.xds.cache import ConfigCache
from isthmus.xds.proxy import Proxy, Role


def proxy(node_id: str, cluster: str = "east", region: str = "us-east1") -> Proxy:
    return Proxy(node_id, Role.SIDECAR, "shop", "web", "web", Locality(region, "z", cluster))


def test_same_key_shares_one_generation() -> None:
    cache = ConfigCache(parse_mesh(example_mesh_text()))
    first = cache.resources(types.CLUSTER, proxy("a"))
    count = cache.serializations
    second = cache.resources(types.CLUSTER, proxy("b"))  # different node, same key
    assert second is first
    assert cache.serializations == count


def test_identical_resources_share_bytes_across_keys() -> None:
    cache = ConfigCache(parse_mesh(example_mesh_text()))
    east = cache.resources(types.CLUSTER, proxy("a", "east"))
    west = cache.resources(types.CLUSTER, proxy("b", "west", "us-west1"))
    assert east is not west
    for name in east:
        assert east[name] is west[name], "clusters do not depend on locality: one shared Resource"
    # Endpoints do depend on locality (priorities), so they differ.
    eds_east = cache.resources(types.ENDPOINT, proxy("a", "east"))
    eds_west = cache.resources(types.ENDPOINT, proxy("b", "west", "us-west1"))
    web = "outbound|80||web.shop.svc.cluster.local"
    assert eds_east[web].version != eds_west[web].version


async def test_set_view_wakes_only_on_effective_change() -> None:
    view = parse_mesh(example_mesh_text())
    cache = ConfigCache(view)
    before = cache.resources(types.CLUSTER, proxy("a"))
    event = cache.watch()
    assert cache.set_view(parse_mesh(example_mesh_text())) is False
    assert not event.is_set()
    changed = parse_mesh(example_mesh_text().replace("127.10.0.11", "127.10.0.99"))
    assert cache.set_view(changed) is True
    await asyncio.wait_for(event.wait(), 1)
    # Clusters did not change: the same ResourceSet object survives the new mesh version.
    assert cache.resources(types.CLUSTER, proxy("a")) is before
    cache.unwatch(event)


def test_failing_generator_keeps_last_good_set() -> None:
    calls = {"fail": False}
    base = ConfigCache(parse_mesh(example_mesh_text()))

    def clusters(view, p, identity):  # type: ignore[no-untyped-def]
        if calls["fail"]:
            raise RuntimeError("boom")
        from isthmus.xds.generate import clusters as real

        return real.generate(view, p, identity)

    gens = {t: (clusters if t == types.CLUSTER else lambda v, p, i: {}) for t in types.PUSH_ORDER}
    cache = ConfigCache(base.view, gens)
    good = cache.resources(types.CLUSTER, proxy("a"))
    assert len(good) == 3
    calls["fail"] = True
    cache.invalidate()
    assert cache.resources(types.CLUSTER, proxy("a")) is good


def test_proxies_share_a_generation_per_type_and_get_what_the_full_proxy_would() -> None:
    """Per type, proxies reduced by for_type share one ResourceSet; and what the cache serves each
    proxy equals generating for that full proxy (nothing a generator reads is left out)."""
    from isthmus.xds.generate import GENERATORS
    from isthmus.xds.generate.identity import PLAINTEXT

    view = parse_mesh(example_mesh_text())
    cache = ConfigCache(view)
    pods = [
        Proxy(
            f"p{i}",
            Role.SIDECAR,
            ns,
            svc,
            svc,
            Locality(region, zone, cluster),
            f"127.0.{i}.1",
            f"127.0.{i}.2",
        )
        for i, (ns, svc, region, zone, cluster) in enumerate(
            [
                ("shop", "web", "us-east1", "us-east1-b", "east"),
                ("shop", "api", "us-east1", "us-east1-b", "east"),
                ("blog", "web", "us-east1", "us-east1-b", "east"),
                ("shop", "web", "us-west1", "us-west1-a", "west"),
            ]
        )
    ]
    pods.append(
        Proxy("gw", Role.GATEWAY, "isthmus-system", "gw", "gw", Locality("us-west1", "us-west1-a", "west"))
    )
    for p in pods:
        for type_url, generate in GENERATORS.items():
            served = {n: r.body for n, r in cache.resources(type_url, p).items()}
            direct = {
                n: m.SerializeToString(deterministic=True) for n, m in generate(view, p, PLAINTEXT).items()
            }
            assert served == direct, (p.node_id, types.short(type_url))
    # The three pods of east share one EDS generation; west's differs (its own priorities).
    eds = [cache.resources(types.ENDPOINT, p) for p in pods[:4]]
    assert eds[0] is eds[1] is eds[2]
    assert eds[3] is not eds[0]
    assert cache.resources(types.LISTENER, pods[0]) is not cache.resources(types.LISTENER, pods[1])


def test_eds_regenerates_only_the_services_that_changed() -> None:
    """A new view that reuses Service objects (as the aggregate does) costs one serialization per
    port of the changed service; what is served still equals generating from scratch."""
    from dataclasses import replace as dc_replace

    from isthmus.discovery.model import MeshView
    from isthmus.xds.generate import GENERATORS
    from isthmus.xds.generate.identity import PLAINTEXT

    view = parse_mesh(example_mesh_text())
    cache = ConfigCache(view)
    proxy = Proxy("p", Role.SIDECAR, "shop", "web", "web", Locality("us-east1", "us-east1-b", "east"))
    cache.resources(types.ENDPOINT, proxy)
    changed_key = next(iter(view.services))
    changed = view.services[changed_key]
    services = dict(view.services)
    services[changed_key] = dc_replace(changed, endpoints=changed.endpoints[1:])
    new_view = MeshView.of(services, view.clusters.values())
    before = cache.serializations
    cache.set_view(new_view)
    served = cache.resources(types.ENDPOINT, proxy)
    assert cache.serializations - before == len(changed.ports)
    direct = GENERATORS[types.ENDPOINT](new_view, proxy, PLAINTEXT)
    assert {n: r.body for n, r in served.items()} == {
        n: m.SerializeToString(deterministic=True) for n, m in direct.items()
    }
    # A change of the clusters (the context) regenerates everything.
    states = [dc_replace(c, weight=50) if c.name == "west" else c for c in new_view.clusters.values()]
    cache.set_view(MeshView.of(services, states))
    before = cache.serializations
    cache.resources(types.ENDPOINT, proxy)
    assert cache.serializations - before == sum(len(s.ports) for s in services.values())
