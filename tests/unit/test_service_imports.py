"""The ServiceImports isthmus writes: made once per distinct content, and a service whose Service
object is unchanged is reused without being looked at (Desired)."""

from __future__ import annotations

from dataclasses import replace

from isthmus.discovery.file import example_mesh_text, parse_mesh
from isthmus.discovery.kube.mcs import Desired
from isthmus.discovery.model import MeshView, ServiceKey


def with_vips(view: MeshView) -> MeshView:
    services = {k: replace(s, vip=f"240.0.0.{i + 1}") for i, (k, s) in enumerate(view.services.items())}
    return MeshView.of(services, view.clusters.values())


def test_a_new_view_rebuilds_only_the_imports_whose_content_changed() -> None:
    desired = Desired()
    first = with_vips(parse_mesh(example_mesh_text()))
    made = desired(first)
    assert made["shop/reviews"]["status"]["clusters"] == [{"cluster": "west"}]
    # The same services again: the very same mapping (the writers know it is written).
    assert desired(MeshView.of(dict(first.services), first.clusters.values())) is made
    # reviews gains an endpoint in east: its import lists east too; the others are the same objects.
    reviews = first.services[ServiceKey("shop", "reviews")]
    moved = replace(
        reviews, endpoints=(*reviews.endpoints, replace(reviews.endpoints[0], address="127.10.0.40"))
    )
    moved = replace(
        moved,
        endpoints=tuple(
            replace(e, locality=replace(e.locality, cluster="east")) if e.address == "127.10.0.40" else e
            for e in moved.endpoints
        ),
    )
    second = MeshView.of({**first.services, reviews.key: moved}, first.clusters.values())
    again = desired(second)
    assert again is not made
    assert again["shop/reviews"]["status"]["clusters"] == [{"cluster": "east"}, {"cluster": "west"}]
    assert again["shop/web"] is made["shop/web"]
    assert again["shop/db"] is made["shop/db"]
    # An endpoint that changes nothing an import says (another address in the same cluster) keeps it.
    same = replace(
        moved,
        endpoints=tuple(
            replace(e, address="127.10.0.41") if e.address == "127.10.0.40" else e for e in moved.endpoints
        ),
    )
    third = desired(MeshView.of({**second.services, reviews.key: same}, first.clusters.values()))
    assert third is again
