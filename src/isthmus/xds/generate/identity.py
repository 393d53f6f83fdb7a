"""What generators know about identities: the trust domain, the trust bundle, and (for SDS only)
the proxy's own workload certificate. Plain data, made by the mesh CA (xds/ca.py); an empty trust
bundle means mTLS is off and every generator leaves TLS out."""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


@dataclass(frozen=True, slots=True)
class WorkloadCert:
    """A workload's certificate chain and private key (PEM), and its validity."""

    spiffe_id: str
    cert_chain: str
    private_key: str
    not_before: datetime.datetime
    not_after: datetime.datetime

    @property
    def serial(self) -> str:
        return hashlib.sha256(self.cert_chain.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class MeshIdentity:
    trust_domain: str = "cluster.local"
    trust_bundle: str = ""  # PEM of the mesh root(s); empty = mTLS off
    workload: WorkloadCert | None = None  # set only when generating SDS for one proxy

    @property
    def mtls(self) -> bool:
        return bool(self.trust_bundle)

    def spiffe_id(self, namespace: str, service_account: str) -> str:
        return spiffe_id(self.trust_domain, namespace, service_account)


PLAINTEXT = MeshIdentity()
