"""Parsing of the human units used in config and scenario files: durations and byte sizes."""

from __future__ import annotations

import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_BYTES = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?")
_BYTE_FACTORS = {
    None: 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


def parse_duration(value: object) -> float:
    """Seconds from a number (seconds) or a Go-style duration string such as "1m30s" or "250ms"."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 5s or 250ms, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        parts = _DURATION_PART.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sum(float(n) * _DURATION_SECONDS[u] for n, u in parts)
    raise ValueError(f"expected a duration such as 5s or 250ms, got {value!r}")


def parse_bytes(value: object) -> int:
    """Bytes from a number or a size string such as "80GiB" or "512 MiB"."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 80GiB, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value!r}")
        return int(value)
    if isinstance(value, str):
        match = _BYTES.fullmatch(value.strip())
        if match:
            return int(float(match.group(1)) * _BYTE_FACTORS[match.group(2)])
    raise ValueError(f"expected a size such as 80GiB or 512MiB, got {value!r}")
