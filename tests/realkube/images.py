"""Container images without a registry: a docker-archive tarball (what ``docker save`` writes and
``ctr images import`` reads) of one layer holding the given files, written from Python. The nodes
of the tests import them; pods use them with ``imagePullPolicy: Never``."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path


def write_image(
    path: Path,
    ref: str,
    files: Mapping[str, Path],
    entrypoint: Sequence[str],
    cmd: Sequence[str] = (),
) -> Path:
    """Write image ``ref`` (e.g. ``isthmus.test/app:1``) with ``files`` (path in the image -> file
    on disk, kept executable) to the tarball ``path``; returns it."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for inside, source in sorted(files.items()):
            info = tar.gettarinfo(str(source), arcname=inside.lstrip("/"))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with source.open("rb") as data:
                tar.addfile(info, data)
    layer_bytes = layer.getvalue()
    diff_id = hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": list(entrypoint), "Cmd": list(cmd), "Env": ["PATH=/"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = f"{hashlib.sha256(config_bytes).hexdigest()}.json"
    manifest = [{"Config": config_name, "RepoTags": [ref], "Layers": [f"{diff_id}/layer.tar"]}]
    with tarfile.open(path, mode="w") as out:
        for name, content in (
            (f"{diff_id}/layer.tar", layer_bytes),
            (config_name, config_bytes),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            out.addfile(info, io.BytesIO(content))
    return path


def with_libraries(inside: str, binary: Path) -> dict[str, Path]:
    """``binary`` at ``inside`` and the shared libraries it loads (per ``ldd``), at their own paths:
    the files of an image that runs a dynamically linked program (Envoy) with nothing else."""
    files = {inside: binary}
    listing = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False).stdout
    for line in listing.splitlines():
        match = re.search(r"(/\S+) \(0x", line)
        if match:
            path = match.group(1)
            files[path] = Path(path).resolve()
    return files
