"""Transparent capture: the nftables ruleset the injected init container loads into the pod's
network namespace (``nft -f``), as a pure function of what to capture.

* Outbound: TCP the application opens is redirected to the sidecar's outbound port, and its DNS
  queries (UDP port 53) to the sidecar's DNS listener; not the sidecar's own traffic (its user id),
  not loopback, not the excluded ports and CIDRs.
* Inbound: TCP arriving on the pod's interfaces is redirected to the sidecar's inbound port; not the
  sidecar's own ports (readiness probes, the admin API stays on loopback anyway), not the excluded
  ports.

Outbound capture is IPv4 only (the sidecar's outbound and DNS listeners are on 127.0.0.1): IPv6
connections of a dual-stack pod go out directly, uncaptured.

One table of its own (``inet isthmus``), created fresh: loading the ruleset twice gives the same
rules, and nothing else in the namespace is touched.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

TABLE = "isthmus"


@dataclass(frozen=True, slots=True)
class Capture:
    proxy_uid: int = 1337
    outbound_port: int = 15001
    inbound_port: int = 15006
    dns_port: int = 15053  # 0: DNS is not captured
    own_ports: tuple[int, ...] = (15000, 15001, 15006, 15021)  # never redirected inbound
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()


def _set(values: list[str]) -> str:
    return values[0] if len(values) == 1 else "{ " + ", ".join(values) + " }"


def nft_rules(capture: Capture) -> str:
    """The ruleset text; CIDRs are checked (ValueError names a bad one)."""
    v4: list[str] = []
    v6: list[str] = []
    for cidr in capture.exclude_outbound_cidrs:
        network = ipaddress.ip_network(cidr, strict=False)
        (v4 if network.version == 4 else v6).append(str(network))
    inbound_skip = sorted(set(capture.own_ports) | set(capture.exclude_inbound_ports))
    lines = [
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        f"    tcp dport {_set([str(p) for p in inbound_skip])} return",
        f"    meta l4proto tcp redirect to :{capture.inbound_port}",
        "  }",
        "  chain output {",
        "    type nat hook output priority -100; policy accept;",
        f"    meta skuid {capture.proxy_uid} return",
        '    oifname "lo" return',
    ]
    if v4:
        lines.append(f"    ip daddr {_set(v4)} return")
    if v6:
        lines.append(f"    ip6 daddr {_set(v6)} return")
    if capture.exclude_outbound_ports:
        ports = sorted(set(capture.exclude_outbound_ports))
        lines.append(f"    tcp dport {_set([str(p) for p in ports])} return")
    if capture.dns_port:
        lines.append(f"    meta nfproto ipv4 udp dport 53 redirect to :{capture.dns_port}")
    lines += [
        f"    meta nfproto ipv4 meta l4proto tcp redirect to :{capture.outbound_port}",
        "  }",
        "}",
        "",
    ]
    return "\n".join(lines)
