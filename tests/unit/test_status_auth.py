"""Who may ask CSDS: the admin API's readers; with no admin authentication, anyone on a loopback or
Unix-socket xDS port, and nobody on a network one (it would hand every proxy's configuration to
whoever reaches the port)."""

from __future__ import annotations

from isthmus.app import ControlPlane
from isthmus.settings import ServeSettings


async def test_csds_callers() -> None:
    local = ControlPlane(ServeSettings(xds_address="127.0.0.1:15010"))
    assert local._csds_check(None) is None
    network = ControlPlane(
        ServeSettings(xds_address="0.0.0.0:15010", insecure_plaintext_xds=True, mtls=False)
    )
    refuse = network._csds_check(None)
    assert refuse is not None
    assert (await refuse("any-token"))[0] == 403

    asked = []

    async def admin(token: str | None, right: str, path: str) -> tuple[int, str]:
        asked.append((token, right, path))
        return (200, "alice") if token == "good" else (401, "bad token")

    check = network._csds_check(admin)
    assert check is not None
    assert await check("good") == (200, "alice")
    assert (await check(None))[0] == 401
    assert asked == [("good", "read", "/debug/csds"), (None, "read", "/debug/csds")]
