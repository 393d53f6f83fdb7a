"""Wiring: builds the cache, the mesh source, the ADS server and the admin app, and runs them
as one task group until stopped. Constructors do no I/O; ``run`` does it all."""

from __future__ import annotations

import asyncio
import datetime
import functools
import gc
import logging
import os
import socket
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import replace
from pathlib import Path

from aiohttp import web
from envoy.service.status.v3 import csds_pb2

from isthmus.admin.app import AdminCheck, DrainActions, Readiness, make_admin_app, start_admin
from isthmus.admin.debug import debug_routes
from isthmus.admin.webview import PATHS as UI_PATHS
from isthmus.admin.webview import ui_routes
from isthmus.discovery import clusterset
from isthmus.discovery.aggregate import Aggregator, shards_of_view
from isthmus.discovery.file import (
    example_mesh_text,
    file_stat,
    load_mesh_file,
    parse_mesh,
    watch_mesh_file,
)
from isthmus.discovery.kube.cluster import ClusterPolicy
from isthmus.discovery.kube.config_api import (
    MESH_CONFIG,
    Condition,
    ConfigApi,
    Report,
    mesh_overrides,
)
from isthmus.discovery.kube.convert import ExportPolicy
from isthmus.discovery.kube.mcs import Desired
from isthmus.discovery.kube.members import Members
from isthmus.discovery.kube.reviews import Reviewer
from isthmus.discovery.kube.secrets import SecretMembers
from isthmus.discovery.model import FULL_WEIGHT, ClusterState, Gateway, MeshView
from isthmus.drain import Drains
from isthmus.identity.admin_kube import KubeAdmin
from isthmus.identity.admin_tokens import AdminTokens, FirstKnown
from isthmus.identity.gateways import GatewayChecked, GatewayIdentities
from isthmus.identity.https_tls import HttpsServing
from isthmus.identity.kube_tokens import FirstOf, KubeTokens
from isthmus.identity.pod_bindings import PodBindings
from isthmus.identity.tokens import StaticTokens
from isthmus.identity.xds_tls import ServingCredentials
from isthmus.inject.pod import InjectSettings
from isthmus.inject.webhook import Webhook
from isthmus.settings import (
    INSECURE_PLAINTEXT_FLAG,
    INSECURE_UNAUTHENTICATED_FLAG,
    ServeSettings,
    SettingsError,
    is_local,
    mesh_settings_in_force,
    parse_hostport,
    parse_xds_address,
    with_mesh_config,
)
from isthmus.workers.messages import WorkerConfig
from isthmus.workers.pool import WorkerPool
from isthmus.xds.ca import MeshCA
from isthmus.xds.cache import ConfigCache
from isthmus.xds.proxy import Proxy, Role, located
from isthmus.xds.server import AdsServer, Limits
from isthmus.xds.server.auth import StreamAuthenticator
from isthmus.xds.server.csds import Csds, CsdsCheck, Refused

log = logging.getLogger(__name__)


class ControlPlane:
    """One isthmus instance: mesh source -> cache -> ADS server, plus the admin endpoints."""

    def __init__(self, settings: ServeSettings) -> None:
        self.flags = settings  # as given; self.settings: in force (a MeshConfig may set some)
        self.settings = settings
        self._overrides: dict[str, object] = {}  # what the MeshConfig sets, of what is in force
        self._mesh_error: str | None = None  # why the MeshConfig is not in force
        self._restart_required = ""  # a MeshConfig setting that takes effect only on restart
        self.cache = ConfigCache()
        limits = Limits(send_timeout=settings.send_timeout, send_budget=settings.send_budget)
        self.ads = AdsServer(self.cache, settings.xds_address, limits)
        self.xds_tls: ServingCredentials | None = None
        self.webhook: Webhook | None = None
        # Streams of pod-bound tokens (kube authentication), of every process: the pods seen gone.
        self.pod_bindings: PodBindings | None = None
        self.view_loaded = False
        self.started = asyncio.Event()
        self.aggregator = Aggregator(
            self.apply_view,
            settings.debounce_quiet,
            settings.debounce_max,
            clusterset_range=clusterset.network(settings.clusterset_range),
        )
        self.members: Members | None = None
        if settings.kubernetes:
            secrets = None
            if settings.cluster_secrets_namespace:
                secrets = SecretMembers(settings.cluster_secrets_namespace, settings.home_kubeconfig)
            self.members = Members(
                self.aggregator,
                dict(settings.clusters),
                settings.kubeconfig_dir,
                policy=self._cluster_policy,
                secrets=secrets,
                service_imports=settings.service_imports,
                route_status=settings.route_status,
            )
            if settings.kube_authentication:
                self.pod_bindings = PodBindings(self.members.pod_uid)
                self.members.on_pods = self._pods_changed
        self._imports = Desired()
        # Every member cluster synced once and a view of all of them applied (or the ready deadline
        # passed): until then a view is partial, so it neither makes the replica ready nor writes
        # ServiceImports (which would delete those of the clusters not synced yet).
        self._complete = self.members is None
        if not self._complete:
            self.cache.hold()  # proxies get nothing of a partial view (_until_complete serves)
        self._ready_deadline: float | None = None
        self._gateways_down: set[str] = set()
        # --xds-workers: the other processes serving xDS (started with the xDS server)
        self.pool: WorkerPool | None = None
        if settings.xds_workers > 1:
            kube = self.members if settings.kube_authentication else None
            self.pool = WorkerPool(
                review=kube.review if kube is not None else None,
                pod_uid=kube.pod_uid if kube is not None else None,
                bindings=self.pod_bindings,
            )
        self.drains = Drains(self.aggregator, self._lagging, settings.drain_step, settings.drain_ack_timeout)
        # The configuration API (MemberCluster objects in the home cluster): drains every replica follows.
        self.config: ConfigApi | None = None
        self._config_started: set[str] = set()  # clusters whose recorded weight was applied
        self._writes: set[asyncio.Task[None]] = set()
        if settings.config_namespace:
            identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
            self.config = ConfigApi(
                settings.config_namespace,
                identity,
                self._config_changed,
                settings.home_kubeconfig,
                on_mesh=self._mesh_changed,
            )

    def _cluster_policy(self, cluster: str) -> ClusterPolicy:
        """A member cluster's discovery policy, from the settings in force."""
        settings = self.settings
        gateway = next(((h, p) for name, h, p in settings.cluster_gateways if name == cluster), None)
        return ClusterPolicy(
            export=ExportPolicy(settings.export_policy),
            require_namespace_label=settings.require_namespace_label,
            demote_after=settings.max_staleness,
            withdraw_after=settings.withdraw_after,
            gateway=Gateway(*gateway) if gateway is not None else None,
        )

    def _mesh_changed(self) -> None:
        """The MeshConfig changed: its settings over the flags are in force from now on, if they are
        valid together; if not, the settings in force stay and its status says why."""
        assert self.config is not None
        obj = self.config.mesh_config()
        try:
            overrides = mesh_overrides(obj) if obj is not None else {}
            settings = with_mesh_config(self.flags, overrides)
        except (ValueError, SettingsError) as exc:
            if str(exc) != self._mesh_error:
                log.error(
                    "MeshConfig %s/%s not applied (the settings in force stay): %s",
                    self.config.namespace,
                    MESH_CONFIG,
                    exc,
                )
            self._mesh_error = str(exc)
            return
        self._mesh_error = None
        ca = self.cache.ca
        self._restart_required = ""
        if ca is not None and settings.trust_domain != ca.trust_domain:
            # The mesh CA's: every certificate and identity follows it. A restart applies it.
            self._restart_required = (
                f"trustDomain {settings.trust_domain} takes effect when isthmus restarts; "
                f"{ca.trust_domain} is in force"
            )
            log.warning("MeshConfig: %s", self._restart_required)
            settings = replace(settings, trust_domain=ca.trust_domain)
            overrides = {k: v for k, v in overrides.items() if k != "trust_domain"}
            if self.flags.trust_domain != ca.trust_domain:  # an earlier MeshConfig set it
                overrides["trust_domain"] = ca.trust_domain
        self._overrides = overrides
        self._apply_settings(settings)

    def _apply_settings(self, settings: ServeSettings) -> None:
        old, self.settings = self.settings, settings
        if old == settings:
            return
        changed = [
            f"{name}={value} ({source})"
            for (name, value, source), (_, before, _) in zip(
                mesh_settings_in_force(self.flags, settings, self._overrides),
                mesh_settings_in_force(self.flags, old, self._overrides),
                strict=True,
            )
            if value != before
        ]
        log.info("settings in force changed: %s", ", ".join(changed))
        if (old.debounce_quiet, old.debounce_max) != (settings.debounce_quiet, settings.debounce_max):
            self.aggregator.set_debounce(settings.debounce_quiet, settings.debounce_max)
        if old.clusterset_range != settings.clusterset_range:
            self.aggregator.set_clusterset_range(clusterset.network(settings.clusterset_range))
        if self.members is not None:
            self.members.set_policy(self._cluster_policy)

    def _report(self) -> Report:
        """What the configuration API's status should say (see ConfigApi.write_status)."""
        synced: dict[str, Condition] = {}
        for name, cluster in self.cache.view.clusters.items():
            if cluster.state is ClusterState.STATIC:
                synced[name] = Condition("Synced", True, "MeshFile", "declared by the mesh file")
        for name, status in (self.members.status() if self.members is not None else {}).items():
            state = str(status["state"])
            reason = "".join(part.title() for part in state.split("_"))
            synced[name] = Condition("Synced", state == "synced", reason, str(status.get("detail") or ""))
        applied = (
            Condition("Applied", False, "RestartRequired", self._restart_required)
            if self._restart_required
            else Condition("Applied", True, "Applied")
        )
        return Report(
            drains=self.drains.status(),
            synced=synced,
            in_force=mesh_settings_in_force(self.flags, self.settings, self._overrides),
            mesh=[applied],
            mesh_error=self._mesh_error,
        )

    def _config_changed(self) -> None:
        """MemberClusters changed: every cluster's weight goes toward its object's drain target; a
        cluster seen for the first time starts from the weight its status recorded (a restart
        resumes a drain where it was instead of sending traffic back first)."""
        assert self.config is not None
        applied = self.config.applied()
        desired = self.config.desired()
        for cluster in sorted(self._config_started - set(desired) - set(self.config.errors)):
            # Its object was deleted: back to normal, as a replica that starts now would be.
            self._config_started.discard(cluster)
            self.drains.toward(cluster, FULL_WEIGHT)
        for cluster, target in sorted(desired.items()):
            start = None
            if cluster not in self._config_started:
                self._config_started.add(cluster)
                start = applied.get(cluster)
                if start is not None and start != FULL_WEIGHT:
                    self.aggregator.set_cluster_weight(cluster, start)
            progress = self.drains.progress.get(cluster)
            at = start if start is not None else progress.weight if progress is not None else FULL_WEIGHT
            if target != at or start is not None or (progress is not None and progress.state == "running"):
                self.drains.toward(cluster, target, start)  # from a recorded weight: its progress shows

    def _lagging(self, type_url: str) -> list[str]:
        """Proxies of every xDS process that do not hold the current resources of ``type_url``."""
        lagging = self.ads.lagging(type_url)
        return lagging if self.pool is None else lagging + self.pool.lagging(type_url)

    def _connected_clusters(self, role: Role) -> set[str]:
        connected = self.ads.connected_clusters(role)
        if self.pool is not None:
            connected |= {
                cluster for (cluster, r, _), n in self.pool.connected().items() if r == role.value and n
            }
        return connected

    def apply_view(self, view: MeshView) -> None:
        changed = self.cache.set_view(view)
        if self.pool is not None and self._complete:  # workers serve complete views only
            self.pool.set_view(view)
        self.view_loaded = True
        if self.members is not None and self.members.service_imports and self._complete:
            self.members.write_imports(self._imports(view))
        if self.members is not None and self._complete:
            self.members.write_route_status(view)
        if changed:
            log.info(
                "mesh version %s: %d services in %d clusters",
                view.version,
                len(view.services),
                len(view.clusters),
            )

    def load_file(self, view: MeshView) -> None:
        self.aggregator.set_source("file", shards_of_view(view))

    def readiness(self) -> Readiness:
        if self.config is not None and not self.config.synced:
            return Readiness(False, "configuration API (MeshConfig, MemberClusters) not read yet")
        if self.ads.port is None:
            return Readiness(False, "xDS server not listening")
        if self.pool is not None and not self.pool.ready:
            return Readiness(False, "xDS worker processes starting")
        if self.members is not None and not self._complete:
            loop = asyncio.get_running_loop()
            if self._ready_deadline is not None and loop.time() < self._ready_deadline:
                return Readiness(False, "member clusters still syncing")
            if self.view_loaded:
                return Readiness(True, "serving; some member clusters are not synced (see member_clusters)")
        if not self.view_loaded:
            return Readiness(False, "no mesh view loaded yet")
        return Readiness(True, "serving")

    def info(self) -> dict[str, object]:
        return {
            "mesh_version": self.cache.view.version,
            "services": len(self.cache.view.services),
            "clusters": sorted(self.cache.view.clusters),
            "proxies": len(self.ads.status()) + (self.pool.streams() if self.pool is not None else 0),
            "member_clusters": self.members.status() if self.members is not None else {},
            "membership": self.members.membership_status() if self.members is not None else {},
            "settings": self._settings_status(),
            "xds": {
                "tls": list(self.settings.xds_sans) if self.settings.xds_sans else None,
                "authentication": [
                    *([f"token file {self.settings.xds_token_file}"] if self.settings.xds_token_file else []),
                    *(
                        [f"TokenReview (audience {self.settings.token_audience})"]
                        if self.settings.kube_authentication
                        else []
                    ),
                ],
                "refused_streams": self._refused_streams(),  # by reason
                "workers": self._workers_status(),
                "pod_bound_streams": (len(self.pod_bindings) if self.pod_bindings is not None else 0)
                + (self.pool.pod_bound_streams() if self.pool is not None else 0),
            },
        }

    def _refused_streams(self) -> dict[str, int]:
        refused = dict(self.ads.auth_failures)
        for reason, n in (self.pool.auth_failures() if self.pool is not None else {}).items():
            refused[reason] = refused.get(reason, 0) + n
        return dict(sorted(refused.items()))

    def _workers_status(self) -> dict[str, object]:
        """The processes serving xDS: this one first, then the workers (pid, streams)."""
        here = {"pid": os.getpid(), "streams": len(self.ads.streams())}
        if self.pool is None:
            return {"processes": [here]}
        return {"processes": [here, *self.pool.processes()], "ready": self.pool.ready}

    def _settings_status(self) -> dict[str, object]:
        """The MeshConfig settings in force and where each comes from, and the MeshConfig's state."""
        if self.config is None:
            mesh_config = "not read (no --config-namespace)"
        elif self._mesh_error is not None:
            mesh_config = f"invalid, not applied: {self._mesh_error}"
        elif self.config.mesh_config() is None:
            mesh_config = "none"
        else:
            mesh_config = "applied" + (f"; {self._restart_required}" if self._restart_required else "")
        in_force = mesh_settings_in_force(self.flags, self.settings, self._overrides)
        return {
            "mesh_config": mesh_config,
            "in_force": {name: {"value": value, "source": source} for name, value, source in in_force},
        }

    def _locate(self, proxy: Proxy) -> Proxy:
        """Locate an injected sidecar by its node (xds.proxy.located), from the member clusters' Nodes."""
        if self.members is None:
            return proxy
        found = located(proxy, self.members.node_locality)
        if found is None:
            log.warning(
                "proxy %s: node %s of cluster %s is unknown; no locality",
                proxy.node_id,
                proxy.node_name,
                proxy.cluster,
            )
            return proxy
        return found

    def _authenticator(self) -> StreamAuthenticator | None:
        found = self._token_authenticator()
        if found is None:
            return None
        return GatewayChecked(found, GatewayIdentities.of(self.settings.gateway_identities))

    def _pods_changed(self, cluster: str, keys: Collection[str] | None) -> None:
        """A member cluster's pod watch changed: streams of deleted pods' tokens end, here and in
        the workers."""
        if self.pod_bindings is not None:
            self.pod_bindings.pods_changed(cluster, keys)
        if self.pool is not None:
            self.pool.pods_changed(cluster, keys)

    def _token_authenticator(self) -> StreamAuthenticator | None:
        static = StaticTokens(self.settings.xds_token_file) if self.settings.xds_token_file else None
        if self.settings.kube_authentication and self.members is not None:
            kube = KubeTokens(
                self.members.review, (self.settings.token_audience,), bindings=self.pod_bindings
            )
            return FirstOf(static, kube) if static is not None else kube
        if self.settings.kubernetes:
            log.warning(
                "INSECURE: proxies are NOT authenticated (%s): anyone who can reach the xDS port may "
                "claim any workload's identity.",
                INSECURE_UNAUTHENTICATED_FLAG,
            )
        return static

    async def run(self, stop: asyncio.Event) -> None:
        mesh: Path | None = self.settings.mesh
        loaded: tuple[float, int] | None = None  # the mesh file version loaded here, not reloaded
        if mesh is None and self.members is None:
            log.info("no discovery configured: serving the built-in example mesh (see --mesh, --cluster)")
            self.load_file(parse_mesh(example_mesh_text(), "<built-in example mesh>"))
            self.aggregator.flush()
        elif mesh is not None:
            loaded = file_stat(mesh)
            self.load_file(await asyncio.to_thread(load_mesh_file, mesh))
            if self.members is None:
                self.aggregator.flush()
        host, port = parse_hostport(self.settings.admin_address, "--admin-address")
        actions = DrainActions(self._drain, self.drains.status)
        home = Reviewer.home(self.settings.home_kubeconfig) if self.settings.admin_kube_auth else None
        check = self._admin_check(home)
        admin = make_admin_app(self.readiness, self.info, actions, check, open_paths=UI_PATHS)
        admin.add_routes(
            debug_routes(self.ads.streams, lambda: self.cache.view, self._clusters_status, others=self.pool)
        )
        admin.add_routes(ui_routes())
        runner = await start_admin(admin, host, port)
        log.info("admin listening on %s:%d (/healthz, /readyz, /drain, /debug/..., /ui)", host, port)
        csds = Csds(
            self.ads.streams,
            self._csds_check(check),
            others=self.pool.csds_parts if self.pool is not None else None,
        )
        self.ads.services.append(csds.handler())
        if self.pool is not None:
            self.pool.csds = functools.partial(_csds_for_workers, csds)
        config: asyncio.Task[None] | None = None
        webhook: tuple[web.AppRunner, HttpsServing] | None = None
        try:
            if self.config is not None:
                # The MeshConfig may set what the CA, discovery and the first pushes are built with.
                config = asyncio.create_task(self.config.run(self._report), name="configuration-api")
                await self._configuration_read(config)
            self._ready_deadline = asyncio.get_running_loop().time() + self.settings.ready_timeout
            ca = await self._start_xds()
            webhook = await self._start_webhook(ca)
            self.started.set()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.aggregator.run(), name="aggregate")
                if mesh is not None:
                    tasks.create_task(
                        watch_mesh_file(mesh, self.load_file, self.settings.mesh_poll_interval, loaded),
                        name="mesh-file",
                    )
                if self.members is not None:
                    tasks.create_task(self.members.run(), name="member-clusters")
                    tasks.create_task(self._until_complete(), name="first-complete-view")
                if config is not None:
                    tasks.create_task(_join(config), name="configuration-api")
                if self.cache.ca is not None:
                    tasks.create_task(
                        self.cache.renew_certificates(self.settings.cert_ttl), name="certificates"
                    )
                tasks.create_task(self._watch_gateways(), name="gateway-liveness")
                if self.pool is not None and self.members is not None:
                    tasks.create_task(self._feed_localities(self.pool, self.members), name="node-localities")
                tasks.create_task(self._freeze_after_sync(), name="gc-freeze")
                if webhook is not None:
                    tasks.create_task(self._renew_webhook_certificate(webhook[1]), name="webhook-tls")
                await stop.wait()
                raise _Stopped
        except* _Stopped:
            pass
        finally:
            log.info("shutting down: closing xDS streams (Envoy reconnects), then the admin server")
            if config is not None and not config.done():
                config.cancel()
                await asyncio.wait([config])
            await self.drains.close()
            if self.pool is not None:
                await self.pool.stop()
            await self.ads.stop(self.settings.shutdown_grace)
            await runner.cleanup()
            if webhook is not None:
                await webhook[0].cleanup()
            if home is not None:
                await home.close()

    async def _configuration_read(self, config: asyncio.Task[None]) -> None:
        """Wait until the configuration API's objects are listed (the MeshConfig applied), saying so
        every 10 s; a configuration task that ends raises here."""
        assert self.config is not None
        loop = asyncio.get_running_loop()
        warn_at = loop.time() + 10
        while not self.config.synced:
            if config.done():
                config.result()
                raise RuntimeError("the configuration API task ended before reading its objects")
            await asyncio.sleep(0.05)
            if loop.time() >= warn_at:
                warn_at += 10
                log.warning(
                    "still reading the configuration API (MeshConfig, MemberClusters) in namespace %s "
                    "of the home cluster: not serving xDS until it is read",
                    self.config.namespace,
                )
        self._mesh_changed()

    async def _start_xds(self) -> MeshCA | None:
        """Load the mesh CA (with the trust domain in force), then serve xDS."""
        ca = (
            await asyncio.to_thread(load_ca, self.settings)
            if self.settings.mtls or self.settings.xds_sans
            else None
        )
        if ca is not None and self.settings.mtls:
            self.cache.use_ca(ca)
        if ca is not None and self.settings.xds_sans:
            self.xds_tls = ServingCredentials(ca, self.settings.xds_sans)
            self.ads.credentials = self.xds_tls.credentials()
        elif not is_local(parse_xds_address(self.settings.xds_address, "--xds-address")):
            log.warning(
                "INSECURE: xDS is served in PLAIN TEXT on %s (%s): anyone on the network can read and "
                "alter what proxies receive. Use --xds-san NAME to serve TLS.",
                self.settings.xds_address,
                INSECURE_PLAINTEXT_FLAG,
            )
        self.ads.authenticator = self._authenticator()
        if self.members is not None:
            self.ads.locate = self._locate
        if self.settings.xds_workers > 1:
            self.ads.share_port = "first"
        port = await self.ads.start()
        if self.settings.xds_workers > 1:
            await self._start_workers(port, ca)
        return ca

    async def _start_workers(self, port: int, ca: MeshCA | None) -> None:
        """N-1 more processes serving xDS on the same port (SO_REUSEPORT), fed every view."""
        xds = parse_xds_address(self.settings.xds_address, "--xds-address")
        assert isinstance(xds, tuple)  # settings: workers need a TCP address
        shared_ca = None
        if ca is not None and (self.settings.mtls or self.settings.xds_sans):
            shared_ca = (ca.trust_bundle, ca.root_key_pem(), ca.trust_domain)
        configs = [
            WorkerConfig(
                index=i,
                host=xds[0],
                port=port,
                send_timeout=self.settings.send_timeout,
                send_budget=self.settings.send_budget,
                shutdown_grace=self.settings.shutdown_grace,
                cert_ttl=self.settings.cert_ttl,
                ca=shared_ca,
                mtls=self.settings.mtls,
                xds_sans=self.settings.xds_sans,
                token_file=self.settings.xds_token_file,
                gateway_identities=self.settings.gateway_identities,
                token_audience=self.settings.token_audience if self.settings.kube_authentication else None,
                log_level=logging.getLogger().getEffectiveLevel(),
            )
            for i in range(1, self.settings.xds_workers)
        ]
        assert self.pool is not None
        self.pool.configure(configs)
        if self.view_loaded and self._complete:
            self.pool.set_view(self.cache.view)
        if self.members is not None:
            self.pool.set_localities(self.members.node_localities())
        await self.pool.start()
        log.info("xDS served by %d processes on port %d", self.settings.xds_workers, port)

    async def _start_webhook(self, ca: MeshCA | None) -> tuple[web.AppRunner, HttpsServing] | None:
        """The admission webhook on --webhook-address (HTTPS with a mesh-CA certificate), if asked."""
        if self.settings.webhook_address is None:
            return None
        assert ca is not None  # settings: the webhook needs --xds-san, so a CA
        tls = HttpsServing(ca, self.settings.webhook_sans)
        xds_host, xds_port = self.settings.sidecar_xds()

        def settings_of(cluster: str) -> InjectSettings | None:
            known = cluster in self.cache.view.clusters or (
                self.members is not None and cluster in self.members.members
            )
            if not known:
                return None
            return InjectSettings(
                cluster=cluster,
                xds_host=xds_host,
                xds_port=xds_port,
                xds_server_name=self.settings.inject_xds_server_name,
                root_pem=ca.trust_bundle,
                proxy_image=self.settings.inject_proxy_image,
                capture_image=self.settings.inject_capture_image,
                token_audience=self.settings.token_audience,
                outbound_traffic=self.settings.inject_outbound_traffic,
            )

        self.webhook = Webhook(settings_of)
        host, port = parse_hostport(self.settings.webhook_address, "--webhook-address")
        runner = await start_admin(self.webhook.app(), host, port, ssl_context=tls.context)
        log.info("admission webhook listening on %s:%d (HTTPS, POST /inject/CLUSTER)", host, port)
        return runner, tls

    async def _renew_webhook_certificate(self, tls: HttpsServing) -> None:
        every = min(30.0, self.settings.cert_ttl / 4)
        while True:
            await asyncio.sleep(every)
            tls.refresh()

    def _csds_check(self, check: AdminCheck | None) -> CsdsCheck | None:
        """CSDS callers need what the admin API's reads need; with no admin authentication, only
        an xDS port on loopback (or a Unix socket) answers it: any client there could read every
        proxy's configuration otherwise."""
        if check is not None:
            admin = check
            return lambda token: admin(token, "read", "/debug/csds")
        if is_local(parse_xds_address(self.settings.xds_address, "--xds-address")):
            return None

        async def refuse(token: str | None) -> tuple[int, str]:
            return 403, "needs an authenticated admin API (--admin-token-file or --admin-kube-auth)"

        return refuse

    def _clusters_status(self) -> dict[str, dict[str, object]]:
        """Per member cluster: what discovery says (state, source, errors) and its drain."""
        out: dict[str, dict[str, object]] = {}
        for name, status in (self.members.status() if self.members is not None else {}).items():
            out.setdefault(name, {})["discovery"] = status
        for name, progress in self.drains.status().items():
            out.setdefault(name, {})["drain"] = progress
        return out

    def _admin_check(self, home: Reviewer | None) -> AdminCheck | None:
        """The admin API's check: the token file's, then (or only) the home cluster's RBAC."""
        checks = []
        if self.settings.admin_token_file is not None:
            checks.append(AdminTokens(self.settings.admin_token_file).check)
        if home is not None:
            checks.append(KubeAdmin(home.review, home.access).check)
        return FirstKnown(*checks).check if checks else None

    def _drain(self, cluster: str, drain: bool) -> dict[str, object]:
        if cluster not in self.cache.view.clusters:
            raise KeyError(cluster)
        if self.config is not None:  # into the cluster's object: every replica follows it
            task = asyncio.get_running_loop().create_task(
                self.config.set_drain(cluster, 0 if drain else FULL_WEIGHT)
            )
            self._writes.add(task)
            task.add_done_callback(self._written)
            known = self.drains.status().get(cluster)
            return {
                "cluster": cluster,
                "state": "requested",
                "weight": known["weight"] if known else FULL_WEIGHT,
            }
        self.drains.start(cluster, drain)
        return self.drains.status()[cluster]

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("writing the drain into the MemberCluster object failed: %s", task.exception())

    async def _until_complete(self) -> None:
        """Wait until every member cluster has synced once (or the ready deadline passed), then
        publish a view of all of them at once and let views write ServiceImports."""
        assert self.members is not None
        loop = asyncio.get_running_loop()
        while not self.members.all_synced():
            if self._ready_deadline is not None and loop.time() >= self._ready_deadline:
                log.warning(
                    "member clusters not synced after %.0f s: serving without them (%s)",
                    self.settings.ready_timeout,
                    ", ".join(n for n, s in self.members.status().items() if s["state"] != "synced"),
                )
                break
            await asyncio.sleep(0.05)
        self._complete = True
        self.aggregator.flush()  # the shards are all in: merge and publish them now
        self.cache.serve()
        if self.pool is not None:
            self.pool.set_view(self.cache.view)
        if self.members.service_imports and self.view_loaded:  # also if that view was published before
            self.members.write_imports(self._imports(self.cache.view))
        if self.view_loaded:
            self.members.write_route_status(self.cache.view)

    async def _freeze_after_sync(self) -> None:
        """Once ready, move everything built so far (the member clusters' objects, the first view
        and its resources) out of the garbage collector's reach: a full collection then no longer
        walks hundreds of thousands of long-lived objects (a pause of ~100 ms at W1) in the middle
        of a push. Later garbage is collected as usual."""
        while not self.readiness().ready:  # noqa: ASYNC110 - computed from several sources, polled
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)  # let the first pushes finish
        gc.collect()
        gc.freeze()
        log.info("initial state frozen for the garbage collector (%d objects)", gc.get_freeze_count())

    async def _watch_gateways(self) -> None:
        """Mark a member cluster's gateway dead when its Envoy's xDS stream is gone (GatewayLiveness)."""
        liveness = GatewayLiveness(self.settings.gateway_grace)
        while True:
            await asyncio.sleep(min(1.0, self.settings.gateway_grace / 3))
            connected = self._connected_clusters(Role.GATEWAY)
            with_gateway = {n for n, c in self.cache.view.clusters.items() if c.gateway is not None}
            down = liveness.observe(connected, with_gateway)
            if down != self._gateways_down:
                for cluster in down - self._gateways_down:
                    log.warning(
                        "cluster %s: east-west gateway gone; its endpoints are pushed unhealthy", cluster
                    )
                for cluster in self._gateways_down - down:
                    log.info("cluster %s: east-west gateway back", cluster)
                self._gateways_down = down
                self.aggregator.set_gateways_down(down)

    @staticmethod
    async def _feed_localities(pool: WorkerPool, members: Members) -> None:
        """The workers locate injected sidecars by their node as this process does (``_locate``)."""
        while True:
            await asyncio.sleep(1.0)
            pool.set_localities(members.node_localities())


async def _csds_for_workers(csds: Csds, token: str | None, request: bytes) -> tuple[int | None, str, bytes]:
    """A CSDS call that reached a worker, answered here for every process."""
    try:
        response = await csds.respond(token, csds_pb2.ClientStatusRequest.FromString(request))
    except Refused as exc:
        return exc.code.value[0], exc.details, b""
    return None, "", response.SerializeToString()


def load_ca(settings: ServeSettings) -> MeshCA:
    ttl = datetime.timedelta(seconds=settings.cert_ttl)
    if settings.ca_cert is not None and settings.ca_key is not None:
        return MeshCA.from_files(
            settings.ca_cert, settings.ca_key, trust_domain=settings.trust_domain, ttl=ttl
        )
    return MeshCA.development(settings.ca_dir, settings.trust_domain, ttl=ttl)


class GatewayLiveness:
    """Which member clusters' east-west gateways are dead, judged by their xDS streams.

    A gateway seen connected and then gone for longer than ``grace`` is dead until it reconnects.
    A gateway never seen (right after a control plane restart, or one this control plane does not
    serve) is unknown, and unknown is not dead: nothing is withdrawn on a guess. Clients' outlier
    detection covers what this cannot see (a gateway alive but unreachable from some clusters).
    """

    def __init__(self, grace: float = 3.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace = grace
        self._clock = clock
        self._last_seen: dict[str, float] = {}

    def observe(self, connected: Iterable[str], with_gateway: Iterable[str]) -> set[str]:
        now = self._clock()
        live = set(connected)
        for cluster in live:
            self._last_seen[cluster] = now
        return {
            cluster
            for cluster in with_gateway
            if cluster not in live
            and cluster in self._last_seen
            and now - self._last_seen[cluster] > self.grace
        }


async def _join(task: asyncio.Task[None]) -> None:
    """Await a task started before the task group, as one of its tasks."""
    await task


class _Stopped(Exception):
    """Raised inside the task group to cancel its tasks on shutdown."""
