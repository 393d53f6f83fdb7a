"""The Kubernetes discovery graph feeds the ADS server: a real Envoy receives the endpoints of two
member clusters (two fake API servers) and follows their changes (SotW and Delta)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import LOOPBACK, ControlPlaneProcess, isthmus_command
from kubeapi.kubeconfig import write_kubeconfig
from kubeapi.server import FakeKubeApi
from realkube.fixtures import reader_kubeconfig

pytestmark = pytest.mark.envoy

WEB = "outbound|80||web.shop.svc.cluster.local"


class KubeControlPlane(ControlPlaneProcess):
    """`isthmus serve --kubeconfig-dir DIR` (plus ``extra_args``: then proxies must authenticate)."""

    def __init__(self, directory: Path, log_path: Path, extra_args: list[str] | None = None) -> None:
        super().__init__(directory, log_path)
        self.auth_args = extra_args

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
                # Proxies present no token, unless the test gives the TLS arguments to check them.
                *(self.auth_args if self.auth_args is not None else ["--insecure-unauthenticated-xds"]),
            ]
        )


def web_service(namespace: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": namespace},
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


async def authenticating_control_plane(
    procs: Any, east: Any, namespace: str, tmp_path: Path, extra: list[str] | None = None
) -> tuple[KubeControlPlane, list[str]]:
    """`isthmus serve` over TLS watching real cluster ``east`` with the reader role (so proxies
    authenticate by TokenReview), with Service web and service accounts default and other in
    ``namespace``; and the bootstrap arguments for its TLS."""
    await east.admin.create(web_service(namespace))
    directory = tmp_path / "kubeconfigs"
    directory.mkdir()
    await reader_kubeconfig(east, directory / "east.yaml")
    for account in ("default", "other"):
        await east.admin.apply(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": account, "namespace": namespace},
            }
        )
    ca_dir = tmp_path / "ca"
    cp = KubeControlPlane(
        directory,
        tmp_path / "isthmus-auth.log",
        ["--xds-san", "localhost", "--ca-dir", str(ca_dir), *(extra or [])],
    )
    procs.started.append(cp)
    cp.start()
    await cp.wait_ready()
    return cp, ["--xds-root-ca", str(ca_dir / "ca.crt"), "--xds-server-name", "localhost"]


@pytest.mark.realkube
async def test_envoy_authenticates_with_a_service_account_token_of_its_real_cluster(
    procs, eventually, holds, tmp_path, real_clusters, namespace
) -> None:
    """xDS over TLS with a TokenRequest token (audience isthmus) in a file: isthmus verifies it with
    a TokenReview in the Envoy's own member cluster (a real API server, the reader role) and serves
    the Envoy; an Envoy with another service account's token gets nothing."""
    east = real_clusters["a"]
    cp, tls = await authenticating_control_plane(procs, east, namespace, tmp_path)

    async def envoy_with_token_of(account: str, service: str) -> Any:
        path = tmp_path / f"{account}.token"
        path.write_text(await east.admin.service_account_token(namespace, account, "isthmus", seconds=600))
        boot = procs.bootstrap(
            xds_port=cp.xds_port,
            delta=True,
            namespace=namespace,
            service=service,
            extra=[*tls, "--token-file", str(path)],
        )
        return await procs.envoy(boot)

    good = await envoy_with_token_of("default", "client")  # the node claims service account "default"
    impostor = await envoy_with_token_of("other", "client2")
    cluster = f"outbound|80||web.{namespace}.svc.cluster.local"

    async def served() -> None:
        assert cluster in await good.admin.active_clusters()

    await eventually(served, what="the Envoy with its own token is served")

    async def nothing() -> None:
        assert await impostor.admin.active_clusters() == {}

    await holds(nothing, what="the Envoy with another account's token gets nothing", duration=2)
    refused = (await cp.readyz())["xds"]["refused_streams"]
    assert refused.get("node-mismatch", 0) >= 1, refused


@pytest.mark.realkube
@pytest.mark.parametrize("workers", [1, 2])
async def test_the_stream_of_a_pod_bound_token_ends_when_its_pod_is_deleted(
    procs, eventually, holds, tmp_path, real_clusters, namespace, workers
) -> None:
    """A token bound to a pod (as the kubelet projects it) admits the Envoy that names that pod;
    when the pod is deleted, isthmus closes the open stream (the pod watch of the member cluster)
    and the reconnect is refused (the API server no longer accepts the token). With a worker
    process the Envoys land on either process: the worker asks the main one for reviews and pods."""
    east = real_clusters["a"]
    cp, tls = await authenticating_control_plane(
        procs, east, namespace, tmp_path, ["--xds-workers", str(workers)]
    )
    pod = await east.admin.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "client-1", "namespace": namespace},
            "spec": {"containers": [{"name": "app", "image": "unscheduled.invalid/app"}]},
        }
    )
    bound = (pod["metadata"]["name"], pod["metadata"]["uid"])
    path = tmp_path / "pod.token"
    path.write_text(await east.admin.service_account_token(namespace, "default", "isthmus", 600, bound))
    token = ["--token-file", str(path)]
    boot = procs.bootstrap(
        xds_port=cp.xds_port, delta=True, namespace=namespace, extra=[*tls, *token, "--pod-name", "client-1"]
    )
    envoy = await procs.envoy(boot)
    cluster = f"outbound|80||web.{namespace}.svc.cluster.local"

    async def served() -> None:
        assert cluster in await envoy.admin.active_clusters()
        assert (await cp.readyz())["xds"]["pod_bound_streams"] == 1

    await eventually(served, what="the Envoy of pod client-1 is served")
    # The same token in an Envoy that names another pod is refused.
    other = procs.bootstrap(
        xds_port=cp.xds_port,
        delta=False,
        namespace=namespace,
        service="other",
        extra=[*tls, *token, "--pod-name", "client-2"],
    )
    impostor = await procs.envoy(other)
    await east.admin.delete("Pod", namespace, "client-1")

    async def closed() -> None:
        status = await cp.readyz()
        assert status["xds"]["refused_streams"].get("pod-deleted", 0) >= 1, status["xds"]
        assert status["proxies"] == 0, status

    await eventually(closed, what="the stream of the deleted pod is closed")
    assert "client-1 (uid " + bound[1] + ") of member cluster 'east' was deleted" in cp.log_path.read_text()

    async def reconnect_refused() -> None:
        # The API server still accepts the token for a few seconds (its token cache); isthmus does not.
        assert (await cp.readyz())["xds"]["refused_streams"].get("pod-deleted", 0) >= 2

    await eventually(reconnect_refused, what="the Envoy's reconnect is refused")
    await holds(closed, what="the deleted pod's Envoy is not admitted again", duration=2)
    assert (await cp.readyz())["xds"]["refused_streams"].get("node-mismatch", 0) >= 1  # naming client-2
    assert await impostor.admin.active_clusters() == {}
