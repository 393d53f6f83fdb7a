"""Terminal tables of the admin API's status pages (admin.debug), for ``isthmus status`` and
``isthmus clusters``: pure functions from their JSON to text, so what a test reads is what an
operator reads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

TYPES = ("CDS", "LDS", "EDS", "RDS", "SDS")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart (as kubectl prints)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *rows]
    ]
    return "\n".join(lines) + "\n"


def _state(types: Mapping[str, Any], name: str) -> str:
    found = types.get(name)
    return str(found["state"]) if found else "-"


def proxies_table(syncz: Sequence[Mapping[str, Any]]) -> str:
    """One line per connected proxy (like ``istioctl proxy-status``): where each type stands."""
    rows = [
        [
            str(p["proxy"]),
            str(p["cluster"]) or "-",
            str(p["role"]),
            str(p["mode"]),
            *(_state(p["types"], t) for t in TYPES),
        ]
        for p in sorted(syncz, key=lambda p: (str(p["proxy"]), int(p["stream"])))
    ]
    return table(["NAME", "CLUSTER", "ROLE", "MODE", *TYPES], rows)


def proxy_detail(proxy: str, syncz: Sequence[Mapping[str, Any]], dump: Mapping[str, Any]) -> str:
    """One proxy: per stream and type, what was sent, what was ACKed, how many resources it holds,
    and the last NACK's error."""
    counts: dict[tuple[int, str], int] = {}
    for stream in dump.get("streams", ()):
        for type_name, items in stream["types"].items():
            counts[(int(stream["stream"]), type_name)] = len(items)
    out = []
    for entry in (p for p in syncz if p["proxy"] == proxy):
        out.append(
            f"proxy {proxy}  cluster {entry['cluster'] or '-'}  role {entry['role']}  "
            f"{entry['mode']} stream {entry['stream']} from {entry['peer']} "
            f"since {entry['connected_since']}\n"
        )
        rows = []
        nacks = []
        for type_name, t in sorted(entry["types"].items()):
            rows.append(
                [
                    type_name,
                    str(t["state"]),
                    str(t["sent"]) or "-",
                    str(t["acked"]) or "-",
                    str(counts.get((int(entry["stream"]), type_name), 0)),
                    str(t["nacks"]),
                ]
            )
            if t.get("last_nack"):
                nack = t["last_nack"]
                nacks.append(
                    f"last NACK of {type_name} (version {nack['version']}, {nack['at']}): {nack['message']}"
                )
        out.append(table(["TYPE", "STATE", "SENT", "ACKED", "RESOURCES", "NACKS"], rows))
        out.extend(line + "\n" for line in nacks)
    return "".join(out)


def clusters_table(clusters: Mapping[str, Mapping[str, Any]]) -> str:
    """One line per member cluster: its state, gateway, traffic weight, drain and where it is declared."""
    rows = []
    for name, c in sorted(clusters.items()):
        discovery = c.get("discovery") or {}
        drain = c.get("drain") or {}
        gateway = str(c.get("gateway") or "-")
        if c.get("gateway_down"):
            gateway += " (down)"
        rows.append(
            [
                name,
                str(discovery.get("state") or c.get("state") or "-"),
                gateway,
                f"{c['weight']}%" if "weight" in c else "-",
                f"{drain['state']} at {drain['weight']}%" if drain else "-",
                str(discovery.get("last_sync") or "-"),
                str(discovery.get("source") or ("mesh file" if c.get("state") == "static" else "-")),
                str(discovery.get("detail") or ""),
            ]
        )
    return table(["NAME", "STATE", "GATEWAY", "WEIGHT", "DRAIN", "LAST-SYNC", "SOURCE", "DETAIL"], rows)
