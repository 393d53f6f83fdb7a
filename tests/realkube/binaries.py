"""Where the real Kubernetes binaries are: built (once per machine, cached by version) by
hack/kube-binaries.sh, which prints the directory. Tests call ``kube_bin`` and get the path; the
script does nothing when the binaries are cached. ``kube_bin("previous")`` is the directory of the
previous Kubernetes version's components (KUBE_PREVIOUS_VERSION: the upgrade test's starting point;
no etcd there, the upgrade keeps the one etcd build)."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "kube-binaries.sh"


def versions() -> dict[str, str]:
    """hack/versions.env as a dict: the one place the versions are pinned."""
    out = {}
    for line in (ROOT / "hack" / "versions.env").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


@functools.cache
def kube_bin(what: str = "control") -> Path:
    """The directory holding etcd, kube-apiserver, kube-controller-manager (and, with ``"all"``, the
    node binaries). ``ISTHMUS_KUBE_BIN`` overrides it (a directory with the same binaries). With
    ``"previous"``: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy of
    KUBE_PREVIOUS_VERSION (``ISTHMUS_KUBE_PREVIOUS_BIN`` overrides that one)."""
    given = os.environ.get("ISTHMUS_KUBE_PREVIOUS_BIN" if what == "previous" else "ISTHMUS_KUBE_BIN")
    if given:
        return Path(given)
    done = subprocess.run(
        ["bash", str(SCRIPT), what], check=True, stdout=subprocess.PIPE, text=True, timeout=3000
    )
    return Path(done.stdout.strip().splitlines()[-1])
