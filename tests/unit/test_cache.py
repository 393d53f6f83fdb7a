"""The cache: memoized generation per proxy key, interning of identical bytes, change notification."""

from __future__ import annotations

import random
from dataclasses import replace as dc_replace

from isthmus.discovery.file import example_mesh_text, parse_mesh
from isthmus.discovery.model import Locality, MeshView, Protocol, ServiceKey, ServicePort, TrafficSplit
from isthmus.xds import types
from isthmus.xds.cache import ConfigCache, ResourceSet
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


def test_set_view_tells_only_the_followers_of_changed_topics() -> None:
    view = parse_mesh(example_mesh_text())
    cache = ConfigCache(view)
    before = cache.resources(types.CLUSTER, proxy("a"))
    told: list[tuple[str, str]] = []
    for type_url in (types.CLUSTER, types.ENDPOINT, types.LISTENER):
        for name in ("a", "b"):
            cache.follow(type_url, proxy(name), lambda t, n=name: told.append((n, t)))
    assert cache.set_view(parse_mesh(example_mesh_text())) is False
    assert told == []
    changed = parse_mesh(example_mesh_text().replace("127.10.0.11", "127.10.0.99"))
    assert cache.set_view(changed) is True
    # An endpoint moved: EDS changed for both proxies; clusters and listeners did not.
    assert sorted(told) == [("a", types.ENDPOINT), ("b", types.ENDPOINT)]
    # Clusters did not change: the same ResourceSet object survives the new mesh version.
    assert cache.resources(types.CLUSTER, proxy("a")) is before


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


def _mutate(view: MeshView, rng: random.Random, step: int, pods: frozenset[str] = frozenset()) -> MeshView:
    """One random change of the kind discovery makes: an endpoint moved, its sidecar or account
    changed, its ports, a service's ports, a service added or removed, a TrafficSplit."""
    services = dict(view.services)
    key = rng.choice(sorted(services))
    service = services[key]
    kind = rng.choice(
        ["move", "move", "move", "sidecar", "account", "endpoint_ports", "ports", "add", "remove", "split"]
    )
    eps = list(service.endpoints)
    # Pods' own endpoints (``pods``: addresses) stay put; their ports are what changes of them.
    pick = [i for i, e in enumerate(eps) if (e.address in pods) == (kind == "endpoint_ports")]
    if kind in ("move", "sidecar", "account", "endpoint_ports") and pick:
        i = rng.choice(pick)
        e = eps[i]
        if kind == "move":
            eps[i] = dc_replace(e, address=f"127.77.{step // 250}.{step % 250 + 1}")
        elif kind == "sidecar":
            eps[i] = dc_replace(e, sidecar_port=0 if e.sidecar_port else 15006)
        elif kind == "account":
            eps[i] = dc_replace(e, service_account=f"sa{rng.randrange(3)}")
        else:
            eps[i] = dc_replace(e, ports=((service.ports[0].name, 9000 + rng.randrange(3)),))
        services[key] = dc_replace(service, endpoints=tuple(sorted(eps)))
    elif kind == "ports":
        extra = ServicePort(f"tcp{step}", 7000 + rng.randrange(5), 7000, Protocol.TCP)
        services[key] = dc_replace(service, ports=(*service.ports[:2], extra))
    elif kind == "add":
        new = ServiceKey(key.namespace, f"{key.name}-copy{step}")
        services[new] = dc_replace(service, key=new)
    elif kind == "remove" and len(services) > 2:
        del services[key]
    splits = list(view.splits.values())
    if kind == "split":
        other = rng.choice(sorted(k for k in services if k.namespace == key.namespace))
        splits = [TrafficSplit(key, ((key.name, 50), (other.name, rng.randrange(1, 100))))]
    return MeshView.of(dict(sorted(services.items())), view.clusters.values(), splits)


def test_incremental_generation_equals_generation_from_scratch() -> None:
    """After random changes, what the cache serves (keeping the types a change did not touch,
    reusing unchanged services) equals generating from scratch, for sidecars whose own endpoint
    is in the mesh and for gateways, with mTLS; and each set's diff matches its predecessor."""
    from isthmus.xds.ca import MeshCA
    from isthmus.xds.generate import GENERATORS

    rng = random.Random(7)
    ca = MeshCA(*MeshCA.generate_root("mesh.test"), trust_domain="mesh.test")
    view = parse_mesh(example_mesh_text())
    cache = ConfigCache(view, ca=ca)
    pods = [
        Proxy(
            f"p-{s.name}-{e.address}",
            Role.SIDECAR,
            s.namespace,
            s.name,
            e.service_account,
            e.locality,
            e.address,
            e.address,
        )
        for s in view.services.values()
        for e in s.endpoints[:1]
    ]
    pods += [
        Proxy(f"gw-{c}", Role.GATEWAY, "isthmus-system", "gw", "gw", Locality(m.region, m.zone, c))
        for c, m in view.clusters.items()
    ]
    kept = 0
    last: dict[tuple[str, str], ResourceSet] = {}
    for step in range(150):
        view = _mutate(view, rng, step, frozenset(p.app_address for p in pods))
        cache.set_view(view)
        for p in pods:
            for type_url, generate in GENERATORS.items():
                served = cache.resources(type_url, p)
                identity = cache._identity_for(type_url, p)
                direct = {
                    n: m.SerializeToString(deterministic=True) for n, m in generate(view, p, identity).items()
                }
                assert {n: r.body for n, r in served.items()} == direct, (
                    step,
                    p.node_id,
                    types.short(type_url),
                )
                before = last.get((p.node_id, type_url))
                if before is served:
                    kept += 1
                elif before is not None and served.base == before.version:
                    assert set(served.changed) == {
                        n for n in served if n not in before or before[n] is not served[n]
                    }
                    assert set(served.removed) == {n for n in before if n not in served}
                last[(p.node_id, type_url)] = served
    assert kept > 0, "no change ever left a type as it was: the inputs check never fired"


def test_an_endpoint_move_regenerates_only_eds() -> None:
    view = parse_mesh(example_mesh_text())
    cache = ConfigCache(view)
    p = Proxy("p", Role.SIDECAR, "shop", "web", "web", Locality("us-east1", "us-east1-b", "east"))
    before = {t: cache.resources(t, p) for t in types.PUSH_ORDER}
    key = ServiceKey("shop", "reviews")
    services = dict(view.services)
    moved = services[key].endpoints[0]
    services[key] = dc_replace(
        services[key],
        endpoints=tuple(sorted((dc_replace(moved, address="127.66.0.1"), *services[key].endpoints[1:]))),
    )
    cache.set_view(MeshView.of(services, view.clusters.values()))
    count = cache.serializations
    after = {t: cache.resources(t, p) for t in types.PUSH_ORDER}
    assert [types.short(t) for t in types.PUSH_ORDER if after[t] is not before[t]] == ["eds"]
    assert cache.serializations - count == len(services[key].ports)
    assert after[types.ENDPOINT].base == before[types.ENDPOINT].version
    assert after[types.ENDPOINT].changed == {
        f"outbound|{port.port}||reviews.shop.svc.cluster.local" for port in services[key].ports
    }


def test_a_proxy_is_hashed_by_every_field_it_is_compared_by() -> None:
    """Proxies are the cache's keys and hash once (Proxy.__post_init__): a field left out of that
    hash would make proxies that differ only in it collide."""
    from dataclasses import fields

    base = proxy("a")
    assert hash(base) == hash(dc_replace(base))
    assert base == dc_replace(base)
    for f in fields(Proxy):
        if not f.compare:
            continue
        value = getattr(base, f.name)
        other: object
        if isinstance(value, bool):
            other = not value
        elif isinstance(value, int):
            other = value + 1
        elif isinstance(value, Locality):
            other = Locality("elsewhere", "z9", "c9")
        elif isinstance(value, Role):
            other = Role.GATEWAY
        elif f.name == "outbound_traffic":
            other = type(value)("registry-only")
        else:
            other = f"{value}-other"
        changed = dc_replace(base, **{f.name: other})
        assert changed != base, f.name
        assert hash(changed) != hash(base), f.name


def test_a_held_cache_generates_nothing_for_the_partial_views_it_is_given() -> None:
    """While held (member clusters still syncing, ConfigCache.hold), views come and go and streams
    follow their topics, but nothing is generated for them; serve() tells every follower, and the
    views after it are published as usual."""
    cache = ConfigCache()
    cache.hold()
    told: list[str] = []
    for type_url in (types.CLUSTER, types.ENDPOINT):
        cache.follow(type_url, proxy("a"), told.append)
    for address in ("127.10.0.97", "127.10.0.98", "127.10.0.99"):
        assert cache.set_view(parse_mesh(example_mesh_text().replace("127.10.0.11", address)))
    assert cache.serializations == 0, "generated for a view no proxy will be sent"
    assert told == []
    cache.serve()
    assert sorted(told) == [types.CLUSTER, types.ENDPOINT]
    # The woken streams plan: each generates its set then.
    assert any(b"127.10.0.99" in r.body for r in cache.resources(types.ENDPOINT, proxy("a")).values())
    cache.resources(types.CLUSTER, proxy("a"))
    told.clear()
    cache.set_view(parse_mesh(example_mesh_text()))
    assert told == [types.ENDPOINT], "an endpoint moved back: EDS changed, clusters did not"
