"""The ADS server: grpc.aio, SotW and Delta. It speaks only the protocol; the cache owns versions."""

from isthmus.xds.server.ads import AdsServer
from isthmus.xds.server.stream import Limits

__all__ = ["AdsServer", "Limits"]
