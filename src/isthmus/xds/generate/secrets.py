"""SDS: workload certificates and the trust bundle.

The mesh CA arrives with the data-path work (issue 4); until then no secrets are
generated, and the server answers SDS requests for unknown names with nothing.
"""

from __future__ import annotations

from typing import Any

from isthmus.discovery.model import MeshView
from isthmus.xds.proxy import Proxy


def generate(view: MeshView, proxy: Proxy) -> dict[str, Any]:
    return {}
