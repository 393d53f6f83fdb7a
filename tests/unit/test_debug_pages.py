"""What bounds the status pages' cost: the config dumps' token bucket and the decoded-resource LRU."""

from __future__ import annotations

from isthmus.admin.debug import Decoded, _Bucket
from isthmus.xds.resources import Resource
from isthmus.xds.server.introspect import Held


def test_the_bucket_allows_a_burst_then_its_rate() -> None:
    now = [0.0]
    bucket = _Bucket(2.0, 4, lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [0.0] * 4
    assert bucket.take() == 0.5  # empty: the next token in half a second
    now[0] = 0.5
    assert bucket.take() == 0.0
    now[0] = 100.0
    assert [bucket.take() for _ in range(5)] == [0.0] * 4 + [0.5]  # never more than the burst


def test_a_resource_version_is_decoded_once_and_the_oldest_go_first() -> None:
    decoded = Decoded(size=2)
    type_url = "type.googleapis.com/google.protobuf.Empty"
    items = [Held(type_url, f"r{i}", f"v{i}", Resource.from_bytes(type_url, f"r{i}", b"")) for i in range(3)]
    body, new = decoded.get(items[0])
    assert new
    assert b'"name": "r0"' in body
    assert decoded.get(items[0]) == (body, False)
    decoded.get(items[1])
    decoded.get(items[0])  # used: r1 is now the oldest
    decoded.get(items[2])
    assert decoded.get(items[0])[1] is False
    assert decoded.get(items[1])[1] is True  # evicted
    gone = Held(type_url, "x", "v", None)  # the stream no longer has its bytes
    assert decoded.get(gone) == (b'{"name": "x", "version": "v", "resource": null}', True)
