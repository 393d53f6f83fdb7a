"""The xDS server's TLS: a serving certificate issued by the mesh CA for the names the operator gives
(``--xds-san``), renewed before it expires without a restart and without dropping streams.

gRPC's dynamic server credentials ask ``_fetch`` for the current certificate at every new TLS
handshake (from a gRPC core thread): it answers with a new configuration when the CA has renewed the
certificate (at ``rotate_at`` of its lifetime, like workload certificates), else None ("keep the
current one"). Connections already open keep the certificate they were made with, so streams are
never cut by a renewal. Envoy verifies it against the mesh root (``isthmus bootstrap
--xds-root-ca``) and the expected SAN.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import grpc

from isthmus.xds.ca import MeshCA
from isthmus.xds.generate.identity import WorkloadCert

log = logging.getLogger(__name__)


class ServingCredentials:
    """Dynamic gRPC server credentials for the xDS port, from the mesh CA."""

    def __init__(self, ca: MeshCA, names: Sequence[str]) -> None:
        self.ca = ca
        self.names = tuple(names)
        self._lock = threading.Lock()  # _fetch runs on gRPC's threads
        self.current = ca.serving_certificate(self.names)
        self.renewals = 0

    def _configuration(self, cert: WorkloadCert) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(cert.private_key.encode(), cert.cert_chain.encode())]
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            cert = self.ca.serving_certificate(self.names)
            if cert is self.current:
                return None
            self.current = cert
            self.renewals += 1
        log.info("xDS serving certificate renewed (valid until %s)", cert.not_after.isoformat())
        return self._configuration(cert)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self.current),
            self._fetch,  # type: ignore[arg-type]  # gRPC documents None as "no change"; the stubs do not
            require_client_authentication=False,
        )
