"""Which NVIDIA packages a host gets: pure functions over the OS data in vars/<os>.yml.

`nvidia_driver_plan(os_data, mode, kernel_modules, source, branch, version, kernel)` returns what to install,
hold and run; `nvidia_driver_fabricmanager(os_data, source, branch, driver_version)` the Fabric Manager packages
at exactly the installed driver's version. Package entries in the OS data are templates: `{branch}`, `{kernel}`,
and an optional `={version}` (apt) or `-{version}` (dnf) suffix that is dropped when no version is pinned.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # the tests import this file without Ansible's error classes mattering
    AnsibleFilterError = ValueError  # type: ignore[misc,assignment]

MODES = ("full", "userspace", "none")
KERNEL_MODULES = ("open", "proprietary")
VERSION_RE = re.compile(r"[0-9]+\.[0-9]+(\.[0-9]+)?")  # [0-9], not \d: that matches any script's digits
PIN_RE = re.compile(r"(=|-)\{version\}(\S*)$")


def _format(entry: str, branch: str, version: str | None, kernel: str) -> str:
    if version is None:
        entry = PIN_RE.sub("", entry)
    return entry.format(branch=branch, version=version or "", kernel=kernel)


def _package_name(spec: str) -> str:
    """apt 'nvidia-smi=535.1-*' -> 'nvidia-smi'; dnf '@nvidia-driver:535-dkms' stays a module spec."""
    return spec.split("=", 1)[0]


def upstream_version(package_version: str) -> str:
    """'535.309.01-0+deb12u1' or '3:535.309.01-1.el9' -> '535.309.01'."""
    match = VERSION_RE.search(package_version.split(":", 1)[-1])
    if not match:
        raise AnsibleFilterError(f"cannot read an NVIDIA driver version from {package_version!r}")
    return match.group(0)


def nvidia_driver_plan(os_data: Mapping[str, Any], mode: str, kernel_modules: str = "proprietary",
                       source: str = "", branch: str = "", version: str = "", kernel: str = "") -> dict[str, Any]:
    if mode not in MODES:
        raise AnsibleFilterError(f"nvidia_driver_install: unknown mode {mode!r}; one of auto, {', '.join(MODES)}")
    if kernel_modules not in KERNEL_MODULES:
        raise AnsibleFilterError(f"nvidia_driver_kernel_modules: must be open or proprietary; got {kernel_modules!r}")
    sources = os_data["sources"]
    source = source or os_data["default_source"]
    if source not in sources:
        raise AnsibleFilterError(
            f"nvidia_driver_source: {source!r} is not available on {os_data['name']}; choose one of "
            f"{', '.join(sorted(sources))}")
    data = sources[source]
    branch = str(branch or os_data["default_branch"])
    if branch not in (str(b) for b in data["branches"]):
        raise AnsibleFilterError(
            f"nvidia_driver_branch: {branch} is not packaged by {source} on {os_data['name']}; available: "
            f"{', '.join(str(b) for b in data['branches'])}")
    pinned = version or os_data.get("versions", {}).get(branch)
    if pinned and not VERSION_RE.fullmatch(str(pinned)):
        raise AnsibleFilterError(
            f"nvidia_driver_version: must be an upstream version such as 535.309.01; got {pinned!r}")
    if pinned and not str(pinned).startswith(branch + "."):
        raise AnsibleFilterError(f"nvidia_driver_version: {pinned} is not on branch {branch} (nvidia_driver_branch)")
    flavour = kernel_modules if mode == "full" else "userspace"
    if mode == "none":
        entries: list[str] = []
    else:
        entries = data.get(flavour)
        if entries is None:
            raise AnsibleFilterError(
                f"nvidia_driver_kernel_modules: {kernel_modules} modules are not packaged by {source} on "
                f"{os_data['name']}")
    packages = [_format(e, branch, pinned, kernel) for e in entries]
    headers = [_format(e, branch, pinned, kernel) for e in os_data.get("headers", [])] if mode == "full" else []
    hold = sorted({_package_name(p) for p in packages if not p.startswith("@")} | {
        _format(h, branch, None, kernel) for h in data.get("hold", {}).get(flavour, [])})
    return {
        "manager": os_data["manager"],
        "source": source,
        "branch": branch,
        "version": pinned or None,
        "mode": mode,
        "kernel_modules": kernel_modules if mode == "full" else "none",
        "repo": data.get("repo") if mode != "none" else None,
        "prerequisites": list((os_data.get("prerequisites") or {}).get(mode, [])),
        "headers": headers,
        "packages": packages,
        "hold": hold if mode != "none" else [],
        "services": list(os_data.get("services", [])) if mode == "full" else [],
        "driver_package": _package_name(_format(data["driver_package"][flavour], branch, None, kernel))
        if mode != "none" else None,
    }


def nvidia_driver_fabricmanager(os_data: Mapping[str, Any], source: str, branch: str,
                                driver_version: str) -> list[str]:
    """Fabric Manager packages pinned to the driver's exact upstream version (NVIDIA requires a match)."""
    source = source or os_data["default_source"]
    entries = os_data["sources"][source].get("fabricmanager") or os_data.get("fabricmanager")
    if not entries:
        raise AnsibleFilterError(f"no Fabric Manager packages known for {source} on {os_data['name']}")
    version = upstream_version(driver_version)
    return [_format(e, str(branch or os_data["default_branch"]), version, "") for e in entries]


class FilterModule:
    def filters(self):
        return {
            "nvidia_driver_plan": nvidia_driver_plan,
            "nvidia_driver_fabricmanager": nvidia_driver_fabricmanager,
            "nvidia_driver_upstream_version": upstream_version,
        }
