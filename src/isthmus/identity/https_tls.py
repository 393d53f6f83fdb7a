"""TLS for isthmus's own HTTPS servers (the admission webhook): a serving certificate from the mesh
CA for the names the operator gives, renewed without a restart.

Python loads certificates into an ``ssl.SSLContext`` only from files, so each certificate is
written to a private temporary directory, loaded into a fresh context and deleted at once. The
context the server was started with hands every new handshake the current one (its SNI callback),
so a renewal reaches new connections and open ones keep theirs.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path

from isthmus.xds.ca import MeshCA
from isthmus.xds.generate.identity import WorkloadCert

log = logging.getLogger(__name__)


def _context(cert: WorkloadCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="isthmus-tls-") as directory:
        os.chmod(directory, 0o700)
        chain, key = Path(directory, "tls.crt"), Path(directory, "tls.key")
        key.touch(0o600)
        key.write_text(cert.private_key)
        chain.write_text(cert.cert_chain)
        context.load_cert_chain(chain, key)
    return context


class HttpsServing:
    """The SSL context of one HTTPS server, following the CA's renewals of its certificate."""

    def __init__(self, ca: MeshCA, names: Sequence[str]) -> None:
        self.ca = ca
        self.names = tuple(names)
        self.current = ca.serving_certificate(self.names)
        self.context = self._current_context = _context(self.current)  # the server's; it hands on
        self.context.sni_callback = self._choose
        self.renewals = 0

    def _choose(self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        connection.context = self._current_context

    def refresh(self) -> bool:
        """Take the CA's current certificate for these names; True if it was renewed."""
        cert = self.ca.serving_certificate(self.names)
        if cert is self.current:
            return False
        self._current_context = _context(cert)
        self.current = cert
        self.renewals += 1
        log.info("HTTPS serving certificate for %s renewed", ", ".join(self.names))
        return True
