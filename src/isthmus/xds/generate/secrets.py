"""SDS: a sidecar's own workload certificate (``default``) and the mesh trust bundle (``ROOTCA``).

A proxy receives only the certificate of the service account it runs as (its node metadata; until
proxies authenticate to the control plane, `isthmus serve` serves keys on loopback or Unix socket
addresses only, unless told otherwise). Gateways receive nothing: they pass TLS through and never
hold a key. With mTLS off there are no secrets.
"""

from __future__ import annotations

from typing import Any

from isthmus.discovery.model import MeshView
from isthmus.xds.generate.identity import PLAINTEXT, MeshIdentity
from isthmus.xds.generate.tls import root_secret, workload_secret
from isthmus.xds.proxy import Proxy, Role


def generate(view: MeshView, proxy: Proxy, identity: MeshIdentity = PLAINTEXT) -> dict[str, Any]:
    if proxy.role is not Role.SIDECAR or not identity.mtls:
        return {}
    out = {}
    root = root_secret(identity)
    out[root.name] = root
    if identity.workload is not None:
        cert = workload_secret(identity)
        out[cert.name] = cert
    return out
