"""network_tuning helpers: which sysctl keys a network namespace owns, what differs from the live values, and which
peers each node proves the MTU to."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Under net.ipv4/net.ipv6 nearly every key belongs to the network namespace; these few are kernel-wide.
GLOBAL_NET_KEYS = {"net.ipv4.tcp_mem", "net.ipv4.udp_mem", "net.ipv4.tcp_available_congestion_control"}
# Outside net.ipv4/net.ipv6 only these are per namespace; net.core.rmem_max, netdev_max_backlog,
# default_qdisc and everything under vm., fs., kernel. are kernel-wide.
NAMESPACED_OTHER = {"net.core.somaxconn", "net.core.xfrm_acq_expires", "net.unix.max_dgram_qlen"}


def network_tuning_is_namespaced(key: str) -> bool:
    """True when writing the key changes only the caller's network namespace (safe in a container)."""
    if key in GLOBAL_NET_KEYS:
        return False
    if key.startswith(("net.ipv4.", "net.ipv6.", "net.netfilter.")):
        return True
    return key in NAMESPACED_OTHER


def network_tuning_kernel_wide(keys: Iterable[str]) -> list[str]:
    """The keys that are not per network namespace."""
    return [key for key in keys if not network_tuning_is_namespaced(key)]


def normalize(value: Any) -> str:
    """sysctl prints multi-value keys with tabs: compare whitespace-separated words."""
    return " ".join(str(value).split())


def parse_sysctl_output(text: str) -> dict[str, str]:
    """`sysctl k1 k2` output (`key = value` lines) -> {key: normalized value}."""
    live = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            live[key.strip()] = normalize(value)
    return live


def network_tuning_pending(desired: Mapping[str, Any], sysctl_output: str, apply_global: bool = True
                           ) -> dict[str, str]:
    """Keys to write live: those whose live value differs, leaving kernel-wide keys out unless apply_global."""
    live = parse_sysctl_output(sysctl_output)
    return {key: normalize(value) for key, value in desired.items()
            if (apply_global or network_tuning_is_namespaced(key)) and live.get(key) != normalize(value)}


def network_tuning_port_list(ports: Iterable[Any]) -> str:
    """Ports and 'low-high' ranges -> the compact comma list ip_local_reserved_ports takes, merged and sorted."""
    spans = []
    for item in ports:
        text = str(item)
        low, _, high = text.partition("-")
        spans.append((int(low), int(high or low)))
    merged: list[list[int]] = []
    for low, high in sorted(spans):
        if merged and low <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in merged)


# Past this many nodes each proves the MTU to its RING_PEERS successors only: O(n) pings, not O(n^2).
RING_PEERS = 3


def network_tuning_mtu_peers(nodes: Iterable[str], me: str, mesh_max: int) -> list[str]:
    """The nodes `me` pings with full-size packets: every other one up to mesh_max nodes (the full mesh), else its
    RING_PEERS successors in the (sorted) ring. Every node is then pinged by RING_PEERS others as well, so a port
    with a smaller MTU still shows on both sides of it."""
    ring = sorted(set(nodes))
    if me not in ring:
        return []
    others = ring[ring.index(me) + 1:] + ring[:ring.index(me)]
    return others if len(ring) <= int(mesh_max) else others[:RING_PEERS]


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"network_tuning_is_namespaced": network_tuning_is_namespaced,
                "network_tuning_kernel_wide": network_tuning_kernel_wide,
                "network_tuning_pending": network_tuning_pending,
                "network_tuning_port_list": network_tuning_port_list,
                "network_tuning_mtu_peers": network_tuning_mtu_peers}
