"""Settings of `isthmus serve`, parsed and validated once; constructors take these, never argv."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from isthmus.discovery.clusterset import DEFAULT_RANGE as DEFAULT_CLUSTERSET_RANGE
from isthmus.discovery.clusterset import network as clusterset_network
from isthmus.inject.pod import DEFAULT_CAPTURE_IMAGE, DEFAULT_PROXY_IMAGE

INSECURE_KEYS_FLAG = "--insecure-serve-private-keys-to-unauthenticated-proxies"
INSECURE_PLAINTEXT_FLAG = "--insecure-plaintext-xds"
INSECURE_UNAUTHENTICATED_FLAG = "--insecure-unauthenticated-xds"


class SettingsError(ValueError):
    """A setting is invalid; the message names it."""


def parse_cluster(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise SettingsError(f"--cluster: expected NAME=KUBECONFIG_PATH, got {value!r}")
    return name, Path(path)


UNIX_PREFIX = "unix:"


def parse_xds_address(value: str, what: str) -> tuple[str, int] | str:
    """HOST:PORT, or ``unix:PATH`` for a Unix domain socket (a path, reachable across network namespaces)."""
    if value.startswith(UNIX_PREFIX):
        path = value[len(UNIX_PREFIX) :].removeprefix("//")
        if not path.startswith("/"):
            raise SettingsError(f"{what}: expected unix:/ABSOLUTE/PATH, got {value!r}")
        return path
    return parse_hostport(value, what)


def is_local(xds: tuple[str, int] | str) -> bool:
    """A Unix socket or a loopback address: only processes on this host can connect."""
    if isinstance(xds, str):
        return True
    host = xds[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_cluster_gateway(value: str) -> tuple[str, str, int]:
    name, sep, address = value.partition("=")
    if not sep or not name:
        raise SettingsError(f"--cluster-gateway: expected NAME=HOST:PORT, got {value!r}")
    host, port = parse_hostport(address, "--cluster-gateway")
    return name, host, port


def parse_gateway_identity(value: str) -> tuple[str, str, str]:
    """``[CLUSTER=]NAMESPACE/SERVICEACCOUNT`` -> (cluster or "", namespace, service account)."""
    cluster, sep, identity = value.rpartition("=")
    namespace, slash, account = identity.partition("/")
    if (sep and not cluster) or not slash or not namespace or not account or "/" in account:
        raise SettingsError(f"--gateway-identity: expected [CLUSTER=]NAMESPACE/SERVICEACCOUNT, got {value!r}")
    return cluster, namespace, account


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise SettingsError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class ServeSettings:
    xds_address: str = "127.0.0.1:15010"
    admin_address: str = "127.0.0.1:15014"
    mesh: Path | None = None
    mesh_poll_interval: float = 1.0
    send_timeout: float = 30.0
    send_budget: int = 64 * 2**20  # bytes sent and not yet ACKed, over all streams
    xds_workers: int = 1  # processes serving xDS on --xds-address (the main one and N-1 workers)
    shutdown_grace: float = 5.0
    clusters: tuple[tuple[str, Path], ...] = ()  # --cluster NAME=KUBECONFIG
    kubeconfig_dir: Path | None = None
    cluster_gateways: tuple[tuple[str, str, int], ...] = ()  # --cluster-gateway NAME=HOST:PORT
    cluster_secrets_namespace: str | None = None  # watch labelled Secrets there (own cluster)
    home_kubeconfig: str | None = None  # own cluster's kubeconfig; None = in-cluster
    ready_timeout: float = 30.0
    export_policy: str = "all"
    require_namespace_label: bool = False
    max_staleness: float = 300.0
    withdraw_after: float | None = None
    debounce_quiet: float = 0.1
    debounce_max: float = 1.0
    clusterset_range: str = DEFAULT_CLUSTERSET_RANGE  # where services' clusterset IPs are chosen
    service_imports: bool = True  # write MCS ServiceImports into member clusters that have the CRD
    route_status: bool = True  # write the status of GAMMA routes (HTTPRoute, GRPCRoute) into member clusters
    config_namespace: str | None = None  # read MemberCluster objects (isthmus.io) there, home cluster
    mtls: bool = True
    trust_domain: str = "cluster.local"
    ca_cert: Path | None = None
    ca_key: Path | None = None
    ca_dir: Path | None = None  # development root, generated there once
    cert_ttl: float = 24 * 3600.0
    insecure_keys_on_network: bool = False
    xds_sans: tuple[str, ...] = ()  # DNS names and IPs of the xDS port's TLS certificate; () = no TLS
    xds_token_file: Path | None = None  # proxies authenticate with a token of this file
    admin_token_file: Path | None = None  # the admin API (but its probes) needs a token of this file
    admin_kube_auth: bool = False  # ... or one the home cluster's RBAC allows (TokenReview + SAR)
    token_audience: str = "isthmus"  # of the service-account tokens Kubernetes proxies present
    gateway_identities: tuple[tuple[str, str, str], ...] = ()  # --gateway-identity [CLUSTER=]NS/SA
    insecure_unauthenticated_xds: bool = False  # member clusters configured, yet no authentication
    insecure_plaintext_xds: bool = False
    drain_step: float = 2.0  # seconds between drain steps, once every proxy ACKed the previous one
    drain_ack_timeout: float = 30.0
    gateway_grace: float = 3.0  # a gateway's xDS stream gone this long: its endpoints are unhealthy
    webhook_address: str | None = None  # the admission webhook (sidecar injection); None: off
    webhook_sans: tuple[str, ...] = ()
    inject_xds_address: str | None = None  # where injected sidecars reach isthmus; None: from --xds-san
    inject_xds_server_name: str = ""
    inject_proxy_image: str = DEFAULT_PROXY_IMAGE
    inject_capture_image: str = DEFAULT_CAPTURE_IMAGE
    inject_outbound_traffic: str = (
        "allow-any"  # captured connections to no mesh service (per pod: annotation)
    )

    def sidecar_xds(self) -> tuple[str, int]:
        """Where injected sidecars reach isthmus: --inject-xds-address, else the first --xds-san
        with the xDS port."""
        if self.inject_xds_address:
            return parse_hostport(self.inject_xds_address, "--inject-xds-address")
        xds = parse_xds_address(self.xds_address, "--xds-address")
        if not self.xds_sans or not isinstance(xds, tuple):
            raise SettingsError(
                "--webhook-address needs --inject-xds-address (or --xds-san and a TCP --xds-address)"
            )
        return self.xds_sans[0], xds[1]

    @property
    def kubernetes(self) -> bool:
        return bool(self.clusters) or self.kubeconfig_dir is not None or bool(self.cluster_secrets_namespace)

    @property
    def kube_authentication(self) -> bool:
        """Kubernetes proxies authenticate with TokenReviews: on whenever member clusters are."""
        return self.kubernetes and not self.insecure_unauthenticated_xds

    @property
    def authenticated(self) -> bool:
        return self.xds_token_file is not None or self.kube_authentication

    def __post_init__(self) -> None:
        if self.export_policy not in ("all", "serviceexport"):
            raise SettingsError(f"--export-policy: {self.export_policy!r} is not all or serviceexport")
        if self.max_staleness <= 0:
            raise SettingsError("--max-staleness must be more than 0 seconds")
        if self.debounce_quiet < 0 or self.debounce_max < self.debounce_quiet:
            raise SettingsError("--debounce must not be negative, nor longer than --debounce-max")
        if self.withdraw_after is not None and self.withdraw_after < self.max_staleness:
            raise SettingsError("--withdraw-after must not be shorter than --max-staleness")
        if self.home_kubeconfig is not None and not (
            self.cluster_secrets_namespace or self.admin_kube_auth or self.config_namespace
        ):
            raise SettingsError(
                "--home-kubeconfig is only used with --cluster-secrets-namespace, --admin-kube-auth "
                "or --config-namespace"
            )
        if self.kubeconfig_dir is not None and not self.kubeconfig_dir.is_dir():
            raise SettingsError(f"--kubeconfig-dir: {self.kubeconfig_dir} is not a directory")
        xds = parse_xds_address(self.xds_address, "--xds-address")
        if (self.ca_cert is None) != (self.ca_key is None):
            raise SettingsError("--ca-cert and --ca-key go together")
        if self.cert_ttl < 10:
            raise SettingsError("--cert-ttl must be at least 10 seconds")
        if not is_local(xds) and not self.xds_sans and not self.insecure_plaintext_xds:
            raise SettingsError(
                f"--xds-address {self.xds_address} is not a loopback address or Unix socket: serve TLS "
                "with --xds-san NAME (each DNS name or IP address proxies connect to), or accept plain "
                f"text on the network with {INSECURE_PLAINTEXT_FLAG}."
            )
        if self.xds_token_file is not None and not self.xds_token_file.is_file():
            raise SettingsError(f"--xds-token-file: {self.xds_token_file} is not a readable file")
        if self.xds_workers < 1:
            raise SettingsError("--xds-workers must be at least 1")
        if self.xds_workers > 1 and not isinstance(xds, tuple):
            raise SettingsError("--xds-workers needs a TCP --xds-address (workers share its port)")
        if self.mtls and not is_local(xds) and not self.authenticated and not self.insecure_keys_on_network:
            raise SettingsError(
                f"--xds-address {self.xds_address} is not a loopback address or Unix socket, and proxies are "
                "not authenticated: anyone who can connect could ask for any workload's private key. "
                "Authenticate them (--xds-token-file), serve on loopback or unix:/PATH, pass --no-mtls, "
                f"or accept the risk with {INSECURE_KEYS_FLAG}."
            )
        parse_hostport(self.admin_address, "--admin-address")
        if self.webhook_address is not None:
            parse_hostport(self.webhook_address, "--webhook-address")
            if not self.webhook_sans:
                raise SettingsError("--webhook-address needs --webhook-san NAME (its certificate's names)")
            if not self.xds_sans:
                raise SettingsError("--webhook-address: injected sidecars connect over TLS; give --xds-san")
            self.sidecar_xds()
        try:
            clusterset_network(self.clusterset_range)
        except ValueError as exc:
            raise SettingsError(f"--clusterset-range: {exc}") from None
        if self.mesh is not None and not self.mesh.is_file():
            raise SettingsError(f"--mesh: {self.mesh} is not a readable file")


# ---- the settings a MeshConfig can set -------------------------------------------------------

# The fields of a MeshConfig's spec (isthmus.io/v1alpha1, api/protos/.../mesh.proto) -> the
# ServeSettings fields each sets, and the flag of the same meaning.
MESH_SETTINGS: dict[str, tuple[tuple[str, ...], str]] = {
    "trustDomain": (("trust_domain",), "--trust-domain"),
    "exportPolicy": (("export_policy",), "--export-policy"),
    "maxStaleness": (("max_staleness",), "--max-staleness"),
    "withdrawAfter": (("withdraw_after",), "--withdraw-after"),
    "debounce": (("debounce_quiet", "debounce_max"), "--debounce"),
    "gateways": (("cluster_gateways",), "--cluster-gateway"),
    "clustersetRange": (("clusterset_range",), "--clusterset-range"),
}
_DEFAULTS = ServeSettings()


def with_mesh_config(flags: ServeSettings, overrides: Mapping[str, object]) -> ServeSettings:
    """The settings in force: ``flags`` with a MeshConfig's values over them (ServeSettings field ->
    value). Gateways merge by cluster: the MeshConfig's win for the clusters it names. The result is
    validated as flags are (SettingsError)."""
    values = dict(overrides)
    unknown = set(values) - {f for fields, _ in MESH_SETTINGS.values() for f in fields}
    if unknown:
        raise SettingsError(f"a MeshConfig cannot set {', '.join(sorted(unknown))}")
    gateways = values.get("cluster_gateways")
    if isinstance(gateways, tuple):
        merged = {gateway[0]: gateway for gateway in flags.cluster_gateways}
        merged.update({gateway[0]: gateway for gateway in gateways})
        values["cluster_gateways"] = tuple(merged[name] for name in sorted(merged))
    return dataclasses.replace(flags, **values)  # type: ignore[arg-type]


def _text(value: object) -> str:
    if value is None:
        return "never"
    if isinstance(value, float):
        return f"{value:g}s"
    if isinstance(value, tuple):
        return ",".join(f"{name}={host}:{port}" for name, host, port in value)
    return str(value)


def mesh_settings_in_force(
    flags: ServeSettings, effective: ServeSettings, overrides: Mapping[str, object]
) -> list[tuple[str, str, str]]:
    """Each MeshConfig setting as it is in force: (spec field, value as text, where it comes from:
    "meshconfig", "flag" or "default"). A flag equal to its default counts as the default."""
    out = []
    for name, (fields, _) in MESH_SETTINGS.items():
        value = ",".join(_text(getattr(effective, f)) for f in fields)
        if any(f in overrides for f in fields):
            source = "meshconfig"
        elif any(getattr(flags, f) != getattr(_DEFAULTS, f) for f in fields):
            source = "flag"
        else:
            source = "default"
        out.append((name, value, source))
    return out
