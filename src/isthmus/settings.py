"""Settings of `isthmus serve`, parsed and validated once; constructors take these, never argv."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class SettingsError(ValueError):
    """A setting is invalid; the message names it."""


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise SettingsError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class ServeSettings:
    xds_address: str = "127.0.0.1:15010"
    admin_address: str = "127.0.0.1:15014"
    mesh: Path | None = None
    mesh_poll_interval: float = 1.0
    send_timeout: float = 30.0
    shutdown_grace: float = 5.0

    def __post_init__(self) -> None:
        parse_hostport(self.xds_address, "--xds-address")
        parse_hostport(self.admin_address, "--admin-address")
        if self.mesh is not None and not self.mesh.is_file():
            raise SettingsError(f"--mesh: {self.mesh} is not a readable file")
