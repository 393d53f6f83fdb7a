"""Who may use the admin API beyond its probes: bearer tokens of a file, each with its rights.

``--admin-token-file FILE``, one ``token,name,rights`` per line (``#`` comments), rights ``read``
(status and progress) or ``drain`` (also start and undo drains; it implies ``read``), several joined
with ``;``. Re-read when it changes. ``check`` answers the admin server's middleware: 200, 401 (no
or unknown token) or 403 (the token lacks the right). ``FirstKnown`` asks several checks in turn
(the file, then the home cluster's RBAC: identity.admin_kube)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from isthmus.identity.tokens import TokenFile

RIGHTS = {"read": {"read"}, "drain": {"read", "drain"}}


class AdminTokens:
    def __init__(self, path: Path, check_every: float = 1.0) -> None:
        self.file = TokenFile(path, (2, 2), "token,name,rights (read or drain, ;-separated)", check_every)

    async def check(self, token: str | None, right: str, path: str) -> tuple[int, str]:
        """(HTTP status, who or why) for ``token`` asking for ``right`` (on any path)."""
        record = self.file.lookup(token) if token else None
        if record is None:
            return 401, "a valid bearer token is required"
        name, rights = record
        granted = set().union(*(RIGHTS.get(r.strip(), set()) for r in rights.split(";")))
        if right not in granted:
            return 403, f"{name} may not {right}"
        return 200, name


Check = Callable[[str | None, str, str], Awaitable[tuple[int, str]]]


class FirstKnown:
    """The answer of the first check that knows the token (anything but 401)."""

    def __init__(self, *checks: Check) -> None:
        self.checks = checks

    async def check(self, token: str | None, right: str, path: str) -> tuple[int, str]:
        answer = 401, "a valid bearer token is required"
        for check in self.checks:
            answer = await check(token, right, path)
            if answer[0] != 401:
                break
        return answer
