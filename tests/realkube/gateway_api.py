"""The Gateway API's own CRDs for HTTPRoute and GRPCRoute (the standard channel), as a member cluster
that uses GAMMA routes has them installed: taken at test time from the module
sigs.k8s.io/gateway-api on the Go module proxy (``go mod download -json``, as hack/istiod.sh takes
istio's CRDs), and cached outside the repository, keyed by version (never committed):

    ${ISTHMUS_CACHE:-~/.cache/isthmus}/gateway-api/<GATEWAY_API_VERSION>/<file>.yaml

Without the cached files and without Go, the tests that need them are skipped.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

GATEWAY_API_VERSION = "v1.3.0"
MODULE = "sigs.k8s.io/gateway-api"
FILES = (
    "gateway.networking.k8s.io_httproutes.yaml",
    "gateway.networking.k8s.io_grpcroutes.yaml",
)
STANDARD = Path("config") / "crd" / "standard"


def cache_dir(version: str = GATEWAY_API_VERSION) -> Path:
    home = Path(os.environ.get("ISTHMUS_CACHE", Path.home() / ".cache" / "isthmus"))
    return home / "gateway-api" / version


def _fetch(version: str, into: Path) -> None:
    """Copy FILES out of the module (downloaded into the Go module cache if it is not there)."""
    done = subprocess.run(
        ["go", "mod", "download", "-json", f"{MODULE}@{version}"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "GOFLAGS": "", "GOTOOLCHAIN": "local"},
        cwd=into.parent,  # outside any Go module of the repository
    )
    if done.returncode != 0:
        raise RuntimeError(f"go mod download {MODULE}@{version}: {done.stdout}{done.stderr}")
    source = Path(json.loads(done.stdout)["Dir"]) / STANDARD
    into.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        partial = into / f"{name}.tmp"
        shutil.copyfile(source / name, partial)  # the module cache's files are read-only: copy
        partial.chmod(0o644)
        partial.replace(into / name)


@functools.cache
def route_crds(version: str = GATEWAY_API_VERSION) -> list[dict[str, Any]]:
    """The HTTPRoute and GRPCRoute CustomResourceDefinitions of ``version``."""
    where = cache_dir(version)
    if not all((where / name).is_file() for name in FILES):
        if shutil.which("go") is None:
            pytest.skip(f"the Gateway API CRDs come from the Go module proxy ({MODULE}), and there is no Go")
        where.parent.mkdir(parents=True, exist_ok=True)
        _fetch(version, where)
    out = []
    for name in FILES:
        docs = [d for d in yaml.safe_load_all((where / name).read_text()) if d]
        assert [d["kind"] for d in docs] == ["CustomResourceDefinition"], name
        out.extend(docs)
    return out
