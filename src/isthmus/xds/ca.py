"""The mesh CA: one root for every member cluster, SPIFFE workload certificates per service account.

* The root (EC P-256) is loaded from PEM files (a Kubernetes Secret mounted as files in the
  Deployment), or, for development only, generated once into a directory and reused from there
  on restart, with a loud warning. A root that changed on every restart would make proxies that
  already hold certificates distrust the ones that get new certificates.
* Workload certificates (EC P-256) carry one URI SAN, ``spiffe://TRUST_DOMAIN/ns/NS/sa/SA``, are
  valid for ``ttl`` and are issued again once ``rotate_at`` of their lifetime has passed
  (``rotate_due``), long before they expire, so Envoy swaps them over SDS without closing
  connections.
* ``trust_bundle`` is the PEM every proxy validates its peers with, the same in every cluster.
* Every certificate issued counts in isthmus_ca_certificates_issued_total, by kind (workload or
  serving); one issued again because the one before was due, in ..._rotated_total too.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from isthmus import metrics
from isthmus.xds.generate.identity import MeshIdentity, WorkloadCert, spiffe_id

log = logging.getLogger(__name__)

ROOT_TTL = datetime.timedelta(days=3650)
CERT_FILE, KEY_FILE = "ca.crt", "ca.key"
WORKLOAD, SERVING = "workload", "serving"  # the kind label of the certificate metrics


class CAError(ValueError):
    """The CA material cannot be used; the message says why."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _public_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class MeshCA:
    """Issues and rotates workload certificates under one root."""

    def __init__(
        self,
        root_cert: x509.Certificate,
        root_key: ec.EllipticCurvePrivateKey,
        trust_domain: str = "cluster.local",
        ttl: datetime.timedelta = datetime.timedelta(hours=24),
        rotate_at: float = 0.5,
        clock: Callable[[], datetime.datetime] = _now,
    ) -> None:
        if not isinstance(root_key, ec.EllipticCurvePrivateKey):
            raise CAError("the CA key must be an EC key")
        if _public_der(root_cert.public_key()) != _public_der(root_key.public_key()):
            raise CAError("the CA certificate does not match the CA key")
        if not 0 < rotate_at < 1:
            raise CAError("rotate_at must be a fraction of the lifetime, between 0 and 1")
        self.root_cert = root_cert
        self._root_key = root_key
        self.trust_domain = trust_domain
        self.ttl = ttl
        self.rotate_at = rotate_at
        self._clock = clock
        self.trust_bundle = root_cert.public_bytes(serialization.Encoding.PEM).decode()
        self._issued: dict[str, WorkloadCert] = {}
        self._serving: dict[tuple[str, ...], WorkloadCert] = {}  # renewed on use, not by rotate_due
        # The issuer's key identifier as the root itself states it (RFC 5280 4.2.1.1): roots made
        # elsewhere (helm's genCA, openssl) need not derive it from the key the way this module does.
        try:
            ski = root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._authority = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            self._authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key())
        self.issued_count = 0

    # ---- roots ---------------------------------------------------------------------------------

    @classmethod
    def generate_root(
        cls, trust_domain: str = "cluster.local"
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "isthmus"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"isthmus mesh CA ({trust_domain})"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + ROOT_TTL)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cert, key

    @classmethod
    def from_files(cls, cert_path: Path, key_path: Path, **kw: object) -> MeshCA:
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise CAError(f"cannot load the CA from {cert_path} and {key_path}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{key_path}: the CA key must be an EC key")
        return cls(cert, key, **kw)  # type: ignore[arg-type]

    @classmethod
    def development(cls, directory: Path | None, trust_domain: str = "cluster.local", **kw: object) -> MeshCA:
        """Load the development root from ``directory``, generating it there the first time."""
        if directory is not None and (directory / CERT_FILE).exists():
            log.warning(
                "DEVELOPMENT CA loaded from %s: not for production (use --ca-cert/--ca-key)", directory
            )
            return cls.from_files(
                directory / CERT_FILE, directory / KEY_FILE, trust_domain=trust_domain, **kw
            )
        cert, key = cls.generate_root(trust_domain)
        if directory is None:
            log.warning(
                "DEVELOPMENT CA generated in memory: every restart makes a new root, and proxies "
                "holding certificates of the old one stop trusting the new ones. Use --ca-cert/--ca-key "
                "in production, or --ca-dir to keep a development root."
            )
        else:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            key_file = directory / KEY_FILE
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(_key_pem(key))
            log.warning(
                "DEVELOPMENT CA generated into %s: not for production (use --ca-cert/--ca-key)", directory
            )
        return cls(cert, key, trust_domain=trust_domain, **kw)  # type: ignore[arg-type]

    def root_key_pem(self) -> str:
        """The root's private key, for the xDS worker processes of this control plane only
        (isthmus.workers: they issue their proxies' certificates); never logged or served."""
        return _key_pem(self._root_key)

    # ---- workload certificates -----------------------------------------------------------------

    def _issue(
        self, identity: str, sans: list[x509.GeneralName] | None = None, rotation: bool = False
    ) -> WorkloadCert:
        """A certificate for ``identity``: a SPIFFE ID as its one URI SAN, or the given ``sans``
        (the control plane's serving certificate); ``rotation``: it replaces one that is due."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = self._clock()
        not_before = now - datetime.timedelta(minutes=1)  # tolerate small clock skew between hosts
        not_after = min(now + self.ttl, self.root_cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "isthmus")]))
            .issuer_name(self.root_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(sans or [x509.UniformResourceIdentifier(identity)]), critical=True
            )
            .add_extension(
                self._authority,
                critical=False,
            )
            .sign(self._root_key, hashes.SHA256())
        )
        self.issued_count += 1
        kind = SERVING if sans else WORKLOAD
        metrics.CERTIFICATES_ISSUED.labels(kind).inc()
        if rotation:
            metrics.CERTIFICATES_ROTATED.labels(kind).inc()
        return WorkloadCert(
            identity,
            cert.public_bytes(serialization.Encoding.PEM).decode(),
            _key_pem(key),
            not_before,
            not_after,
        )

    def _renew_at(self, cert: WorkloadCert) -> datetime.datetime:
        # From the issuing time (not from not_before, which is backdated for clock skew).
        return cert.not_after - self.ttl * (1 - self.rotate_at)

    def _due(self, cert: WorkloadCert) -> bool:
        return self._clock() >= self._renew_at(cert)

    def certificate(self, namespace: str, service_account: str) -> WorkloadCert:
        """The current certificate of a service account, issued on first use or when due."""
        identity = spiffe_id(self.trust_domain, namespace, service_account)
        cert = self._issued.get(identity)
        if cert is None or self._due(cert):
            cert = self._issued[identity] = self._issue(identity, rotation=cert is not None)
        return cert

    def serving_certificate(self, names: tuple[str, ...]) -> WorkloadCert:
        """The control plane's own serving certificate for DNS names and IP addresses ``names``
        (the xDS port's), issued on first use and again when due, like a workload's."""
        if not names:
            raise CAError("a serving certificate needs at least one DNS name or IP address")
        cert = self._serving.get(names)
        if cert is None or self._due(cert):
            sans: list[x509.GeneralName] = []
            for name in names:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(name)))
                except ValueError:
                    sans.append(x509.DNSName(name))
            cert = self._serving[names] = self._issue(",".join(names), sans, rotation=cert is not None)
        return cert

    def rotate_due(self) -> list[str]:
        """Re-issue every certificate past its rotation point; returns the SPIFFE IDs rotated."""
        rotated = [identity for identity, cert in self._issued.items() if self._due(cert)]
        for identity in rotated:
            self._issued[identity] = self._issue(identity, rotation=True)
        if rotated:
            log.info("rotated %d workload certificates", len(rotated))
        return rotated

    def identity(self, workload: WorkloadCert | None = None) -> MeshIdentity:
        return MeshIdentity(self.trust_domain, self.trust_bundle, workload)

    def next_rotation(self) -> datetime.datetime | None:
        if not self._issued:
            return None
        return min(self._renew_at(c) for c in self._issued.values())
