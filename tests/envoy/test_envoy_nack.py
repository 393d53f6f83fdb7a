"""NACK handling against a real Envoy, with an in-process ADS server whose CDS generator can inject an
invalid Cluster: Envoy rejects it and keeps serving the previous config, the server records the NACK
with Envoy's message and does not resend the rejected version, and a corrected version then applies
(SotW and Delta)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import duration_pb2

from isthmus.admin.debug import syncz
from isthmus.discovery.file import parse_mesh
from isthmus.xds import types
from isthmus.xds.cache import ConfigCache
from isthmus.xds.generate import GENERATORS
from isthmus.xds.server import AdsServer
from isthmus.xds.server.csds import client_status

pytestmark = pytest.mark.envoy

EXTRA = "extra"  # the injected cluster's name
REJECTED = "cluster_manager.cds.update_rejected"
SUCCESS = "cluster_manager.cds.update_success"
CDS_STATS = r"^cluster_manager\.cds\.(update_rejected|update_success|version_text)$"


@dataclass
class Injection:
    """Adds cluster EXTRA to the generated CDS resources: invalid (negative connect_timeout) or valid."""

    enabled: bool = False
    valid: bool = False
    port: int = 1

    def clusters(self, view, proxy, identity) -> dict:
        out = dict(GENERATORS[types.CLUSTER](view, proxy, identity))
        if self.enabled:
            out[EXTRA] = cluster_pb2.Cluster(
                name=EXTRA,
                type=cluster_pb2.Cluster.STATIC,
                connect_timeout=duration_pb2.Duration(seconds=1 if self.valid else -1),
                load_assignment=endpoint_pb2.ClusterLoadAssignment(
                    cluster_name=EXTRA,
                    endpoints=[
                        endpoint_components_pb2.LocalityLbEndpoints(
                            lb_endpoints=[
                                endpoint_components_pb2.LbEndpoint(
                                    endpoint=endpoint_components_pb2.Endpoint(
                                        address=address_pb2.Address(
                                            socket_address=address_pb2.SocketAddress(
                                                address="127.0.0.1", port_value=self.port
                                            )
                                        )
                                    )
                                )
                            ]
                        )
                    ],
                ),
            )
        return out


@pytest.fixture
async def ads() -> AsyncIterator[tuple[AdsServer, ConfigCache, Injection]]:
    injection = Injection()
    generators = {**GENERATORS, types.CLUSTER: injection.clusters}
    cache = ConfigCache(generators=generators)
    server = AdsServer(cache, "127.0.0.1:0")
    await server.start()
    try:
        yield server, cache, injection
    finally:
        await server.stop(0.5)


def cds_status(server: AdsServer, node_id: str):
    statuses = server.proxy_status(node_id)
    assert len(statuses) == 1, f"expected one stream for {node_id}: {statuses}"
    return statuses[0], statuses[0].types.get(types.CLUSTER)


async def test_nack_keeps_last_good_config_and_recovers(
    delta, ads, procs, mesh, upstreams, eventually, holds
) -> None:
    server, cache, injection = ads
    web1 = await upstreams.start("web-1")
    injection.port = web1.port
    web = mesh.cluster("web")
    cache.set_view(parse_mesh(mesh.text(mesh.service("web", web1)), "test mesh"))
    assert server.port is not None
    boot = procs.bootstrap(xds_port=server.port, delta=delta)
    envoy = await procs.envoy(boot)

    async def serving() -> None:
        reply = await envoy.request("web.shop:80")
        assert (reply.status, reply.upstream) == (200, "web-1"), reply

    await eventually(serving, what="the initial config serves web-1")
    proxy, cds = cds_status(server, boot.node_id)
    assert proxy.mode == ("delta" if delta else "sotw")
    assert cds is not None
    assert cds.last_acked_version == cds.last_sent_version, cds
    assert cds.nacks == 0, cds
    good_version = cds.last_acked_version
    before = await envoy.admin.stats(CDS_STATS)
    assert before[REJECTED] == 0, before
    assert before[SUCCESS] >= 1, before

    # Push an invalid Cluster: Envoy rejects it, the server records Envoy's message.
    injection.enabled = True
    cache.invalidate()

    async def rejected() -> dict:
        stats = await envoy.admin.stats(CDS_STATS)
        assert stats[REJECTED] == 1, stats
        _, status = cds_status(server, boot.node_id)
        assert status is not None
        assert status.last_nack is not None, status
        return stats

    at_nack = await eventually(
        rejected, what="Envoy rejects the invalid cluster and the server sees the NACK"
    )
    _, cds = cds_status(server, boot.node_id)
    nack = cds.last_nack
    assert cds.nacks == 1, cds
    assert "duration" in nack.message.lower(), nack
    assert nack.message.splitlines()[0].strip() in envoy.log_text(), (
        f"NACK message {nack.message!r} is not the one Envoy logged:\n{envoy.log_tail()}"
    )
    assert nack.version == cds.last_sent_version != good_version, cds
    assert cds.last_acked_version == good_version, cds
    assert at_nack[SUCCESS] == before[SUCCESS], at_nack
    assert at_nack["cluster_manager.cds.version_text"] == good_version, at_nack
    # The status page and CSDS say so, with Envoy's message.
    [entry] = [p for p in syncz(server.streams()) if p["proxy"] == boot.node_id]
    assert entry["types"]["CDS"]["state"] == "NACKED", entry
    assert entry["types"]["CDS"]["last_nack"]["message"] == nack.message
    [config] = client_status(server.streams(), csds_pb2.ClientStatusRequest()).config
    clusters = [g for g in config.generic_xds_configs if g.type_url == types.CLUSTER]
    assert {g.config_status for g in clusters} == {csds_pb2.ERROR}, clusters
    assert {g.error_state.details for g in clusters} == {nack.message}

    # Envoy keeps serving with the previous config; nothing is resent in a loop.
    active = await envoy.admin.active_clusters()
    assert set(active) == {web}, sorted(active)
    await serving()
    responses = cds.responses

    async def quiet() -> None:
        stats = await envoy.admin.stats(CDS_STATS)
        assert stats[REJECTED] == 1, stats
        _, status = cds_status(server, boot.node_id)
        assert (status.nacks, status.responses) == (1, responses), status

    await holds(quiet, what="one NACK and no resend of the rejected version", duration=2.0)
    await serving()

    # A corrected version applies.
    injection.valid = True
    cache.invalidate()

    async def recovered() -> None:
        stats = await envoy.admin.stats(CDS_STATS)
        assert stats[SUCCESS] > at_nack[SUCCESS], stats
        assert stats[REJECTED] == 1, stats
        active = await envoy.admin.active_clusters()
        assert set(active) == {web, EXTRA}, sorted(active)
        hosts = await envoy.admin.cluster_hosts()
        assert set(hosts.get(EXTRA, {})) == {f"127.0.0.1:{web1.port}"}, hosts
        _, status = cds_status(server, boot.node_id)
        assert status.last_acked_version == status.last_sent_version != nack.version, status
        assert status.nacks == 1, status

    await eventually(recovered, what="the corrected cluster is accepted")
    await serving()
    [entry] = [p for p in syncz(server.streams()) if p["proxy"] == boot.node_id]
    assert entry["types"]["CDS"]["state"] == "SYNCED", entry
