"""Wire encoding of shared resources: every pre-encoded response must parse as the real message."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2

from isthmus.xds import types
from isthmus.xds.resources import Resource, delta_response, encode_any, sotw_response, state_version


def _cluster(name: str, seconds: int = 1) -> Resource:
    msg = cluster_pb2.Cluster(name=name)
    msg.connect_timeout.seconds = seconds
    return Resource.from_message(types.CLUSTER, name, msg)


@pytest.mark.parametrize("count", [0, 1, 3, 200])
def test_sotw_response_parses(count: int) -> None:
    resources = [_cluster(f"c{i}" + "x" * i) for i in range(count)]
    data = sotw_response(types.CLUSTER, "v1", "n1", resources)
    parsed = discovery_pb2.DiscoveryResponse.FromString(data)
    assert parsed.version_info == "v1"
    assert parsed.nonce == "n1"
    assert parsed.type_url == types.CLUSTER
    names = []
    for any_msg in parsed.resources:
        assert any_msg.type_url == types.CLUSTER
        c = cluster_pb2.Cluster()
        assert any_msg.Unpack(c)
        names.append(c.name)
    assert names == [r.name for r in resources]


def test_delta_response_parses_with_removals() -> None:
    resources = [_cluster("a"), _cluster("b", 5)]
    data = delta_response(types.CLUSTER, "sys", "n7", resources, removed=["gone", "also-gone"])
    parsed = discovery_pb2.DeltaDiscoveryResponse.FromString(data)
    assert parsed.system_version_info == "sys"
    assert parsed.nonce == "n7"
    assert list(parsed.removed_resources) == ["gone", "also-gone"]
    assert [(r.name, r.version) for r in parsed.resources] == [(r.name, r.version) for r in resources]
    c = cluster_pb2.Cluster()
    parsed.resources[1].resource.Unpack(c)
    assert c.connect_timeout.seconds == 5


def test_version_is_content_hash() -> None:
    assert _cluster("a").version == _cluster("a").version
    assert _cluster("a").version != _cluster("a", 2).version
    assert _cluster("a").version != _cluster("b").version


def test_state_version_ignores_order_but_not_content() -> None:
    a, b = _cluster("a"), _cluster("b")
    assert state_version([a, b]) == state_version([b, a])
    assert state_version([a, b]) != state_version([a, _cluster("b", 9)])
    assert state_version([a]) != state_version([a, b])


def test_large_resource_length_prefix() -> None:
    # Lengths above 127 and 16383 need multi-byte varints.
    body = b"\x0a" + bytes([0x80, 0x80, 0x01]) + b"n" * 16384  # Cluster.name, 16384 bytes
    r = Resource.from_bytes(types.CLUSTER, "big", body)
    parsed = discovery_pb2.DiscoveryResponse.FromString(sotw_response(types.CLUSTER, "", "1", [r]))
    assert parsed.resources[0].value == body
    assert encode_any("t", b"").startswith(b"\x0a\x01t")
