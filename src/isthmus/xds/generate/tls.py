"""TLS pieces shared by the CDS and LDS generators: SDS references, upstream and downstream contexts.

Certificates never appear inline here: contexts point at SDS secrets (``default`` for the proxy's
own certificate, ``ROOTCA`` for the trust bundle) that arrive over the same ADS stream. Peers are
checked by SPIFFE URI SAN: a client accepts only the service accounts behind the service, a
server accepts any identity of the trust domain.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, wrappers_pb2

from isthmus.xds import naming
from isthmus.xds.generate.identity import MeshIdentity

TLS_SOCKET = "envoy.transport_sockets.tls"
RAW_BUFFER = "envoy.transport_sockets.raw_buffer"
TLS_MODE_KEY = "tlsMode"  # endpoint metadata under envoy.transport_socket_match
TLS_MODE_MTLS = "isthmus"
MESH_ALPN = "isthmus"  # marks mesh traffic, so gateways and inbound listeners can tell it apart


def pack(message: Any) -> Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _sds(name: str) -> Any:
    return secret_pb2.SdsSecretConfig(
        name=name,
        sds_config=config_source_pb2.ConfigSource(
            ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
        ),
    )


def _san_matchers(identity: MeshIdentity, spiffe_ids: Iterable[str]) -> list[Any]:
    ids = sorted(set(spiffe_ids))
    matchers = [string_pb2.StringMatcher(exact=i) for i in ids] or [
        string_pb2.StringMatcher(prefix=f"spiffe://{identity.trust_domain}/")
    ]
    return [
        common_pb2.SubjectAltNameMatcher(san_type=common_pb2.SubjectAltNameMatcher.URI, matcher=m)
        for m in matchers
    ]


def _common(identity: MeshIdentity, peers: Iterable[str]) -> Any:
    return tls_pb2.CommonTlsContext(
        tls_params=common_pb2.TlsParameters(tls_minimum_protocol_version=common_pb2.TlsParameters.TLSv1_2),
        tls_certificate_sds_secret_configs=[_sds(naming.WORKLOAD_SECRET)],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=common_pb2.CertificateValidationContext(
                match_typed_subject_alt_names=_san_matchers(identity, peers)
            ),
            validation_context_sds_secret_config=_sds(naming.ROOT_SECRET),
        ),
        alpn_protocols=[MESH_ALPN],
    )


def upstream_socket(identity: MeshIdentity, sni: str, peers: Iterable[str]) -> Any:
    """Client side of mesh mTLS: our certificate, the service's SNI, only the service's identities."""
    context = tls_pb2.UpstreamTlsContext(common_tls_context=_common(identity, peers), sni=sni)
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=pack(context))


def downstream_socket(identity: MeshIdentity, peers: Sequence[Any] | None = None) -> Any:
    """Server side of mesh mTLS: our certificate; clients must present one of the trust domain (or,
    given ``peers``, URI SAN StringMatchers, one whose URI SAN one of them matches)."""
    common = _common(identity, ())
    if peers is not None:
        validation = common.combined_validation_context.default_validation_context
        del validation.match_typed_subject_alt_names[:]
        validation.match_typed_subject_alt_names.extend(
            common_pb2.SubjectAltNameMatcher(san_type=common_pb2.SubjectAltNameMatcher.URI, matcher=m)
            for m in peers
        )
    context = tls_pb2.DownstreamTlsContext(
        common_tls_context=common,
        require_client_certificate=wrappers_pb2.BoolValue(value=True),
    )
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=pack(context))


def workload_secret(identity: MeshIdentity) -> Any:
    assert identity.workload is not None
    return secret_pb2.Secret(
        name=naming.WORKLOAD_SECRET,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_string=identity.workload.cert_chain),
            private_key=base_pb2.DataSource(inline_string=identity.workload.private_key),
        ),
    )


def root_secret(identity: MeshIdentity) -> Any:
    return secret_pb2.Secret(
        name=naming.ROOT_SECRET,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_string=identity.trust_bundle)
        ),
    )


def xds_client_socket(root_ca_file: str, server_name: str) -> Any:
    """TLS to the control plane itself: the mesh root read from a file Envoy watches (a mounted
    ConfigMap), the serving certificate's SAN checked (a DNS name, or an IP address), SNI for a name."""
    try:
        ipaddress.ip_address(server_name)
        san_type, sni = common_pb2.SubjectAltNameMatcher.IP_ADDRESS, ""
    except ValueError:
        san_type, sni = common_pb2.SubjectAltNameMatcher.DNS, server_name
    context = tls_pb2.UpstreamTlsContext(
        sni=sni,
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_params=common_pb2.TlsParameters(
                tls_minimum_protocol_version=common_pb2.TlsParameters.TLSv1_2
            ),
            alpn_protocols=["h2"],
            validation_context=common_pb2.CertificateValidationContext(
                trusted_ca=base_pb2.DataSource(filename=root_ca_file),
                match_typed_subject_alt_names=[
                    common_pb2.SubjectAltNameMatcher(
                        san_type=san_type, matcher=string_pb2.StringMatcher(exact=server_name)
                    )
                ],
            ),
        ),
    )
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=pack(context))
