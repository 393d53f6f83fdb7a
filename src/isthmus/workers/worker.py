"""An xDS worker process: serves ADS on the main process's address with its own cache.

Run by the main process (pool.py) as ``python -m isthmus.workers.worker``. It reads its
WorkerConfig, then mesh views (ViewDelta) and node localities from stdin, serves xDS with the
same protocol code as the main process, renews its proxies' certificates when due, and writes a
Summary of its streams to stdout a few times a second. It stops when stdin ends (the main process
stopped or died): streams are closed with UNAVAILABLE and Envoy reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Callable

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.service.status.v3 import csds_pb2

from isthmus.admin.debug import Decoded, dump_snapshot, dump_streams, syncz
from isthmus.discovery.model import MeshView
from isthmus.identity.gateways import GatewayChecked, GatewayIdentities
from isthmus.identity.kube_tokens import FirstOf, KubeTokens, peer_of
from isthmus.identity.pod_bindings import PodBindings
from isthmus.identity.tokens import Peer, StaticTokens
from isthmus.identity.xds_tls import ServingCredentials
from isthmus.workers.messages import (
    Answer,
    Ask,
    Asking,
    Listening,
    Localities,
    PodUids,
    ReviewResult,
    Summary,
    ViewDelta,
    WatchPod,
    WorkerConfig,
    frame,
    read,
)
from isthmus.xds import types
from isthmus.xds.ca import MeshCA
from isthmus.xds.cache import ConfigCache
from isthmus.xds.proxy import Proxy, located
from isthmus.xds.server import AdsServer, Limits
from isthmus.xds.server.csds import Csds, client_status

log = logging.getLogger(__name__)

SUMMARY_EVERY = 0.25  # seconds
# The types whose laggards a Summary lists: what drains wait for (asking is a look per stream).
LAGGING_TYPES = (types.ENDPOINT,)
ANSWER_TIMEOUT = 10.0  # seconds the main process may take to answer (a review: else unavailable)


def load_ca(config: WorkerConfig) -> MeshCA | None:
    if config.ca is None:
        return None
    cert_pem, key_pem, trust_domain = config.ca
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return MeshCA(cert, key, trust_domain, ttl=datetime.timedelta(seconds=config.cert_ttl))


class Worker:
    """One worker's cache and ADS server, fed by the main process."""

    def __init__(self, config: WorkerConfig, send: Callable[[object], None] = lambda message: None) -> None:
        self.config = config
        self._send = send  # a message to the main process
        self.cache = ConfigCache()
        self.cache.hold()  # until the main process sends the first view (a complete one)
        limits = Limits(send_timeout=config.send_timeout, send_budget=config.send_budget)
        self.ads = AdsServer(self.cache, f"{config.host}:{config.port}", limits)
        self.view: MeshView | None = None
        self.localities: dict[tuple[str, str], tuple[str, str]] = {}
        self.asking = Asking(send, ANSWER_TIMEOUT)  # questions to the main process
        self._answers: set[asyncio.Task[None]] = set()
        self._decoded = Decoded()  # config dumps decode each resource version once
        # Pods with streams of their token here, as the main process's watch holds them.
        self._pods: dict[tuple[str, str, str], str | None] = {}
        self.bindings = (
            PodBindings(self._pod_uid, on_bind=self._watch_pod) if config.token_audience is not None else None
        )

    async def review(self, cluster: str, token: str, audiences: tuple[str, ...]) -> ReviewResult:
        """A TokenReview, asked of the main process (identity.kube_tokens.ReviewFn)."""
        answer = await self.asking.ask("review", cluster, token, audiences)
        if isinstance(answer.value, ReviewResult):
            peer = peer_of(cluster, answer.value)
            if answer.value.pod_gone and self.bindings is not None and isinstance(peer, Peer):
                self.bindings.gone(*peer.bound_pod())  # KubeTokens then refuses it as deleted
            return answer.value
        return ReviewResult(False, error=answer.error or "no review", unavailable=True)

    async def _csds(self, token: str | None, request: bytes) -> tuple[int | None, str, bytes]:
        """A CSDS call reaching this worker is answered by the main process, for every process
        (the caller checked there, as the admin API checks it)."""
        answer = await self.asking.ask("csds", token, request)
        if answer.error:
            return grpc.StatusCode.UNAVAILABLE.value[0], f"CSDS: {answer.error}", b""
        code, detail, body = answer.value
        return code, detail, body

    def _pod_uid(self, cluster: str, namespace: str, name: str) -> str | None:
        """The pod's uid as the main process last said; "" (not known) until it says, which it
        does once told a stream of the pod's token is open here (``_watch_pod``)."""
        return self._pods.get((cluster, namespace, name), "")

    def _watch_pod(self, cluster: str, namespace: str, name: str, uid: str) -> None:
        """A stream of that pod's token was admitted here: the main process follows the pod for
        this worker, and remembers it gone for every process."""
        self._send(WatchPod(cluster, namespace, name, uid))

    def _locate(self, proxy: Proxy) -> Proxy:
        """As the main process does (xds.proxy.located), from the localities it sent."""
        return located(proxy, lambda cluster, node: self.localities.get((cluster, node))) or proxy

    async def start(self) -> int:
        ca = load_ca(self.config)
        if ca is not None:
            if self.config.mtls:
                self.cache.use_ca(ca)
            if self.config.xds_sans:
                self.ads.credentials = ServingCredentials(ca, self.config.xds_sans).credentials()
        static = StaticTokens(self.config.token_file) if self.config.token_file is not None else None
        kube = None
        if self.config.token_audience is not None:
            kube = KubeTokens(self.review, (self.config.token_audience,), bindings=self.bindings)
        found = FirstOf(static, kube) if static is not None and kube is not None else static or kube
        if found is not None:
            identities = GatewayIdentities.of(self.config.gateway_identities)
            self.ads.authenticator = GatewayChecked(found, identities)
        self.ads.locate = self._locate
        self.ads.services.append(Csds(self.ads.streams, relay=self._csds).handler())
        self.ads.share_port = "join"
        return await self.ads.start()

    def apply(self, message: object) -> None:
        if isinstance(message, ViewDelta):
            self.view = message.apply(self.view)
            self.cache.set_view(self.view)
            self.cache.serve()
        elif isinstance(message, Localities):
            self.localities = message.nodes
        elif isinstance(message, Answer):
            self.asking.answered(message)
        elif isinstance(message, Ask):
            task = asyncio.create_task(self._answer(message))
            self._answers.add(task)
            task.add_done_callback(self._answers.discard)
        elif isinstance(message, PodUids):
            self._pods_changed(message)
        else:
            log.warning(
                "xDS worker %d: unknown message %s ignored", self.config.index, type(message).__name__
            )

    async def _answer(self, question: Ask) -> None:
        """The main process's questions about this worker's streams (its per-proxy pages)."""
        try:
            if question.what == "syncz":
                value: object = syncz(self.ads.streams())
            elif question.what == "dump":
                snapshot = dump_snapshot(self.ads.streams(), str(question.args[0]))
                value = [entry async for entry in dump_streams(snapshot, self._decoded)]
            elif question.what == "csds":
                request = csds_pb2.ClientStatusRequest.FromString(question.args[0])
                value = client_status(self.ads.streams(), request).SerializeToString()
            else:
                raise ValueError(f"unknown question {question.what!r}")
            self._send(Answer(question.id, value))
        except Exception as exc:  # the question fails, the worker does not
            self._send(Answer(question.id, error=f"{type(exc).__name__}: {exc}"))

    def _pods_changed(self, message: PodUids) -> None:
        """The bindings check the pods the main process says changed; one gone (None) is then
        forgotten, and watched again if a stream of its name comes."""
        for (namespace, name), uid in message.uids.items():
            self._pods[(message.cluster, namespace, name)] = uid
        if self.bindings is not None:
            self.bindings.pods_changed(message.cluster, [f"{ns}/{name}" for ns, name in message.uids])
        for (namespace, name), uid in message.uids.items():
            if uid is None:
                self._pods.pop((message.cluster, namespace, name), None)

    def summary(self) -> Summary:
        streams = self.ads.streams()
        connected: dict[tuple[str, str, str], int] = {}
        for stream in streams:
            if stream.proxy is not None:
                key = (stream.proxy.cluster, stream.proxy.role.value, stream.mode)
                connected[key] = connected.get(key, 0) + 1
        lagging = {t: tuple(found) for t in LAGGING_TYPES if (found := self.ads.lagging(t))}
        return Summary(
            pid=os.getpid(),
            view_version=self.view.version if self.view is not None else "",
            streams=len(streams),
            lagging=lagging,
            connected=connected,
            auth_failures=dict(self.ads.auth_failures),
            pod_bound_streams=len(self.bindings) if self.bindings is not None else 0,
        )


async def _stdio() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    frames = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything printed goes to the log, not the frames
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, frames)
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return reader, writer


async def main() -> int:
    reader, writer = await _stdio()
    config = await read(reader)
    if not isinstance(config, WorkerConfig):
        log.error("xDS worker: the first message is not a WorkerConfig")
        return 2
    logging.basicConfig(
        level=config.log_level,
        format=f"%(asctime)s %(levelname)s xds-worker-{config.index} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    worker = Worker(config, lambda message: writer.write(frame(message)))
    port = await worker.start()
    writer.write(frame(Listening(os.getpid(), port)))
    await writer.drain()
    log.info("xDS worker %d (pid %d) serving on %s:%d", config.index, os.getpid(), config.host, port)

    async def report() -> None:
        while True:
            await asyncio.sleep(SUMMARY_EVERY)
            writer.write(frame(worker.summary()))
            await writer.drain()

    tasks = [
        asyncio.create_task(report(), name="summaries"),
        asyncio.create_task(worker.cache.renew_certificates(config.cert_ttl)),
    ]
    try:
        while (message := await read(reader)) is not None:
            worker.apply(message)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        log.info("xDS worker %d: the main process is gone; closing streams", config.index)
        await worker.ads.stop(config.shutdown_grace)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
