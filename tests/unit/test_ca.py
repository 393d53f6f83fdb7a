"""The mesh CA and how certificates reach proxies: SPIFFE certificates chained to one root, rotation
at half-life touching SDS only, development roots kept on disk, and keys never served to the network
without an explicit flag."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.x509.oid import ExtendedKeyUsageOID
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from isthmus.discovery.file import parse_mesh
from isthmus.discovery.model import Locality
from isthmus.settings import INSECURE_KEYS_FLAG, INSECURE_PLAINTEXT_FLAG, ServeSettings, SettingsError
from isthmus.xds import types
from isthmus.xds.ca import CAError, MeshCA
from isthmus.xds.cache import ConfigCache
from isthmus.xds.proxy import Proxy, Role

START = datetime.datetime(2026, 11, 23, 12, 0, tzinfo=datetime.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime.datetime:
        return self.now


@pytest.fixture(scope="module")
def root() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return MeshCA.generate_root("mesh.test")


def make_ca(root: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], clock: Clock) -> MeshCA:
    return MeshCA(*root, trust_domain="mesh.test", ttl=datetime.timedelta(hours=2), clock=clock)


def test_workload_certificate_is_a_spiffe_leaf_of_the_root(root) -> None:  # type: ignore[no-untyped-def]
    ca = make_ca(root, Clock())
    issued = ca.certificate("shop", "web")
    cert = x509.load_pem_x509_certificate(issued.cert_chain.encode())
    root_cert = root[0]
    public = root_cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(SHA256())
    )  # raises if not signed by it
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://mesh.test/ns/shop/sa/web"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.not_valid_after_utc - START == datetime.timedelta(hours=2)
    assert issued.spiffe_id == "spiffe://mesh.test/ns/shop/sa/web"
    assert "PRIVATE KEY" in issued.private_key
    assert ca.trust_bundle.startswith("-----BEGIN CERTIFICATE-----")


def test_certificates_are_reused_until_half_life_then_rotated(root) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    ca = make_ca(root, clock)
    first = ca.certificate("shop", "web")
    other = ca.certificate("shop", "db")
    assert ca.certificate("shop", "web") is first
    clock.now = START + datetime.timedelta(minutes=59)
    assert ca.rotate_due() == []
    clock.now = START + datetime.timedelta(minutes=61)  # past half of the 2 h lifetime (from not_before)
    assert sorted(ca.rotate_due()) == [
        "spiffe://mesh.test/ns/shop/sa/db",
        "spiffe://mesh.test/ns/shop/sa/web",
    ]
    assert ca.certificate("shop", "web").serial != first.serial
    assert ca.certificate("shop", "db").serial != other.serial
    assert ca.issued_count == 4


def test_development_root_is_generated_once_and_kept(tmp_path: Path) -> None:
    first = MeshCA.development(tmp_path / "ca", "mesh.test")
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    second = MeshCA.development(tmp_path / "ca", "mesh.test")
    assert first.trust_bundle == second.trust_bundle


def test_mismatched_or_broken_ca_files_are_refused(tmp_path: Path, root) -> None:  # type: ignore[no-untyped-def]
    MeshCA.development(tmp_path / "one")
    MeshCA.development(tmp_path / "two")
    with pytest.raises(CAError, match="does not match"):
        MeshCA.from_files(tmp_path / "one" / "ca.crt", tmp_path / "two" / "ca.key")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(CAError, match="cannot load"):
        MeshCA.from_files(tmp_path / "junk.pem", tmp_path / "one" / "ca.key")


def proxy(role: Role, account: str) -> Proxy:
    return Proxy(f"{role}-{account}", role, "shop", account, account, Locality("r1", "z1", "a"))


def test_sds_gives_each_sidecar_its_own_account_and_rotation_touches_sds_only(root) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    cache = ConfigCache(parse_mesh("clusters: [{name: a}]\nservices: []\n"), ca=make_ca(root, clock))
    web, db = proxy(Role.SIDECAR, "web"), proxy(Role.SIDECAR, "db")

    def cert_of(p: Proxy) -> x509.Certificate:
        secret = secret_pb2.Secret.FromString(cache.resources(types.SECRET, p)["default"].body)
        pem = secret.tls_certificate.certificate_chain.inline_string
        return x509.load_pem_x509_certificate(pem.encode())

    def uri(cert: x509.Certificate) -> list[str]:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return san.get_values_for_type(x509.UniformResourceIdentifier)

    assert uri(cert_of(web)) == ["spiffe://mesh.test/ns/shop/sa/web"]
    assert uri(cert_of(db)) == ["spiffe://mesh.test/ns/shop/sa/db"]
    assert set(cache.resources(types.SECRET, web)) == {"default", "ROOTCA"}
    assert len(cache.resources(types.SECRET, proxy(Role.GATEWAY, "gw"))) == 0, "gateways hold no key"

    told: list[str] = []
    cache.follow(types.SECRET, web, told.append)
    cache.follow(types.CLUSTER, web, told.append)
    secrets_before = cache.resources(types.SECRET, web)
    # A new view leaves SDS as it was (it reads nothing of the view) ...
    assert cache.set_view(parse_mesh("clusters: [{name: a}, {name: b}]\nservices: []\n"))
    assert cache.resources(types.SECRET, web) is secrets_before
    clusters_before = cache.resources(types.CLUSTER, web)
    serial_before = cert_of(web).serial_number
    generation = cache.generation
    assert cache.rotate_certificates() == 0
    assert told == []
    clock.now = START + datetime.timedelta(hours=1, minutes=1)
    # ... but a rotation after it regenerates SDS, and tells the streams that follow it.
    assert cache.rotate_certificates() == 2
    assert cache.generation == generation + 1
    assert told == [types.SECRET], "the followers of SDS are told, those of other types are not"
    assert cache.resources(types.SECRET, web) is not secrets_before
    assert cert_of(web).serial_number != serial_before
    assert cache.resources(types.CLUSTER, web) is clusters_before, "other types are not regenerated"


@pytest.mark.parametrize(
    ("address", "extra", "ok"),
    [
        ("127.0.0.1:15010", {}, True),
        ("[::1]:15010", {}, True),
        ("unix:/run/isthmus/xds.sock", {}, True),
        ("0.0.0.0:15010", {"xds_sans": ("isthmus.example",)}, False),
        ("10.0.0.5:15010", {"xds_sans": ("10.0.0.5",)}, False),
        ("0.0.0.0:15010", {"xds_sans": ("isthmus.example",), "insecure_keys_on_network": True}, True),
        ("0.0.0.0:15010", {"xds_sans": ("isthmus.example",), "mtls": False}, True),
    ],
)
def test_private_keys_are_served_to_the_network_only_when_asked(address: str, extra: dict, ok: bool) -> None:
    if ok:
        ServeSettings(xds_address=address, **extra)
    else:
        with pytest.raises(SettingsError, match=INSECURE_KEYS_FLAG):
            ServeSettings(xds_address=address, **extra)


@pytest.mark.parametrize(
    ("address", "extra", "ok"),
    [
        ("127.0.0.1:15010", {}, True),
        ("unix:/run/isthmus/xds.sock", {}, True),
        ("0.0.0.0:15010", {"mtls": False}, False),
        ("0.0.0.0:15010", {"mtls": False, "xds_sans": ("isthmus.example",)}, True),
        ("0.0.0.0:15010", {"mtls": False, "insecure_plaintext_xds": True}, True),
    ],
)
def test_plain_text_xds_on_the_network_only_when_asked(address: str, extra: dict, ok: bool) -> None:
    if ok:
        ServeSettings(xds_address=address, **extra)
    else:
        with pytest.raises(SettingsError, match=INSECURE_PLAINTEXT_FLAG):
            ServeSettings(xds_address=address, **extra)


def test_the_serving_certificate_names_the_given_hosts_and_is_renewed_when_due() -> None:
    now = [datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)]
    ca = MeshCA(*MeshCA.generate_root(), ttl=datetime.timedelta(hours=2), clock=lambda: now[0])
    names = ("isthmus.isthmus-system.svc", "10.0.0.5")
    first = ca.serving_certificate(names)
    cert = x509.load_pem_x509_certificate(first.cert_chain.encode())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["isthmus.isthmus-system.svc"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == []  # not a workload identity
    assert ca.serving_certificate(names) is first
    assert ca.rotate_due() == []  # workload rotation (and its SDS pushes) never sees it
    now[0] += datetime.timedelta(hours=1, seconds=1)
    assert ca.serving_certificate(names) is not first
    with pytest.raises(CAError):
        ca.serving_certificate(())
