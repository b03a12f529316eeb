"""CUDA toolkit package names and paths from pinned major.minor versions."""

from __future__ import annotations

import re

try:
    from ansible.errors import AnsibleFilterError
except ImportError:
    AnsibleFilterError = ValueError  # type: ignore[misc,assignment]


def cuda_toolkit_packages(versions: list[str], default: str) -> list[str]:
    """['12.4', '12.8'] -> ['cuda-toolkit-12-4', 'cuda-toolkit-12-8'] (same names in NVIDIA's apt and dnf repos)."""
    bad = [v for v in versions if not re.fullmatch(r"[0-9]+\.[0-9]+", str(v))]
    if bad:
        raise AnsibleFilterError(f"cuda_toolkit_versions: each must be major.minor such as 12.4; got {bad}")
    if str(default) not in [str(v) for v in versions]:
        raise AnsibleFilterError(
            f"cuda_toolkit_default_version: {default} is not in cuda_toolkit_versions ({', '.join(versions)})")
    return [f"cuda-toolkit-{str(v).replace('.', '-')}" for v in versions]


class FilterModule:
    def filters(self):
        return {"cuda_toolkit_packages": cuda_toolkit_packages}
