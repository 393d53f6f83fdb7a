"""The Kubernetes discovery graph feeds the ADS server: a real Envoy receives the endpoints of two
member clusters (two fake API servers) and follows their changes (SotW and Delta)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import LOOPBACK, ControlPlaneProcess, isthmus_command
from kubeapi.kubeconfig import write_kubeconfig
from kubeapi.server import FakeKubeApi

pytestmark = pytest.mark.envoy

WEB = "outbound|80||web.shop.svc.cluster.local"


class KubeControlPlane(ControlPlaneProcess):
    """`isthmus serve --kubeconfig-dir DIR`."""

    def __init__(self, directory: Path, log_path: Path) -> None:
        super().__init__(directory, log_path)

    def start(self) -> None:
        self._spawn(
            [
                *isthmus_command(),
                "serve",
                "--kubeconfig-dir",
                str(self.mesh_path),
                "--xds-address",
                f"{LOOPBACK}:{self.xds_port}",
                "--admin-address",
                f"{LOOPBACK}:{self.admin_port}",
                "--ready-timeout",
                "20",
                "--insecure-unauthenticated-xds",  # these proxies present no token
            ]
        )


def web_service() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"ports": [{"name": "http", "port": 80}]},
    }


def web_slice(name: str, host: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port}],
        "endpoints": [{"addresses": [host], "conditions": {"ready": True}}],
    }


async def test_envoy_receives_endpoints_of_two_clusters(
    delta, procs, upstreams, eventually, tmp_path
) -> None:
    east_app = await upstreams.start("web-east", "127.0.0.1")
    west_app = await upstreams.start("web-west", "127.0.0.2")
    apis = {"east": FakeKubeApi(), "west": FakeKubeApi()}
    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    try:
        for name, api in apis.items():
            await api.start()
            api.create(web_service())
            write_kubeconfig(directory / f"{name}.yaml", api.url, api.token, name)
        apis["east"].create(web_slice("web-east", east_app.host, east_app.port))
        apis["west"].create(web_slice("web-west", west_app.host, west_app.port))

        cp = KubeControlPlane(directory, tmp_path / "isthmus-kube.log")
        procs.started.append(cp)
        cp.start()
        ready = await cp.wait_ready()
        assert ready["member_clusters"]["east"]["state"] == "synced", ready
        envoy = await procs.envoy(procs.bootstrap(xds_port=cp.xds_port, delta=delta))

        async def hosts_are(expected: set[str]) -> None:
            hosts = await envoy.admin.cluster_hosts()
            assert set(hosts.get(WEB, {})) == expected, hosts

        both = {east_app.address, west_app.address}
        await eventually(lambda: hosts_are(both), what="both clusters' endpoints")

        async def served_by(name: str) -> None:
            reply = await envoy.request("web.shop")
            assert (reply.status, reply.upstream) == (200, name), reply

        # The Envoy runs in member cluster "east": its own cluster's endpoint is preferred.
        await eventually(lambda: served_by("web-east"), what="east serves east")
        # East's endpoints go away in its API server: traffic moves to west, then back.
        apis["east"].delete("endpointslices", "shop", "web-east")
        await eventually(lambda: hosts_are({west_app.address}), what="east endpoint withdrawn")
        await eventually(lambda: served_by("web-west"), what="west serves")
        apis["east"].create(web_slice("web-east", east_app.host, east_app.port))
        await eventually(lambda: served_by("web-east"), what="east serves again")
    finally:
        for api in apis.values():
            await api.stop()
