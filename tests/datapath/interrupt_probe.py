"""Not collected by default (no test_ prefix): test_topology.py runs it in a child pytest and interrupts
it, to prove that a Ctrl-C (or a SIGKILL and the next run) removes everything.

It builds a data path with every kind of process (agents, control plane, Envoy), writes what it created
to $DATAPATH_PROBE_OUT, and waits to be interrupted.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from datapath.harness import DataPath


async def test_wait_for_interrupt(dp: DataPath) -> None:
    app = await dp.app("east", "web")
    await dp.control_plane(dp.mesh.service("web", app))
    proxy = await dp.sidecar("east", "client")
    created = {
        "namespaces": [n for n in (dp.topology.transit_netns, *(c.netns for c in dp.topology)) if n],
        "pids": [p.pid for p in dp.topology.processes],
        "rundir": str(dp.topology.rundir),
        "envoy_pid": proxy.process.pid,
    }
    out = Path(os.environ["DATAPATH_PROBE_OUT"])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(created))
    os.replace(tmp, out)
    await asyncio.sleep(60)
