"""Address helpers for the firewall role: split sources by IP family, and ask whether an address is allowed."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any


def firewall_family(sources: Iterable[Any], version: int) -> list[str]:
    """The sources (addresses or CIDRs) of one IP family, as networks, deduplicated and sorted."""
    nets = {ipaddress.ip_network(str(s).strip(), strict=False) for s in sources if str(s).strip()}
    return [str(n) for n in sorted(n for n in nets if n.version == version)]


def firewall_only_ips(values: Iterable[Any]) -> list[str]:
    """The values that are IP addresses or networks; host names (an ansible_host may be one) are left out."""
    kept = []
    for value in values:
        try:
            ipaddress.ip_network(str(value).strip(), strict=False)
        except ValueError:
            continue
        kept.append(str(value).strip())
    return kept


def firewall_allows(address: str, sources: Iterable[Any]) -> bool:
    """True when address lies inside one of the sources."""
    ip = ipaddress.ip_address(str(address))
    return any(ip in ipaddress.ip_network(str(s).strip(), strict=False) for s in sources if str(s).strip())


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"firewall_family": firewall_family, "firewall_allows": firewall_allows,
                "firewall_only_ips": firewall_only_ips}
