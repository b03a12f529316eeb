#!/usr/bin/python3
"""Ansible module: check a node's GPUs against an expected profile, from nvidia-smi (and dcgmi when present).

The parsers and the comparison are pure functions (tests feed them real nvidia-smi outputs); `main()` only runs
the commands, writes the JSON report and turns differences into a failed task with a readable table.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
from typing import Any

DOCUMENTATION = r"""
module: gpu_validate
short_description: Compare a node's NVIDIA GPUs, NVLink topology and health with an expected profile
description:
  - Runs C(nvidia-smi --query-gpu), C(nvidia-smi topo -m), C(nvidia-smi nvlink --status) and, when C(dcgmi) is
    found, C(dcgmi diag -r 1); parses them and compares against O(profile).
  - Fails with a table of every difference; writes a JSON report either way when O(report_path) is set.
options:
  profile:
    description:
      - Name of the expected profile in O(profiles), or C(auto) for the profile whose C(model) pattern matches the
        GPUs found and whose C(count) equals their number.
    type: str
    default: auto
  profiles:
    description: Profiles by name; each holds count, model, nvlink, pcie, ecc, persistence, driver_version.
    type: dict
    required: true
  nvidia_smi:
    description: nvidia-smi executable.
    type: str
    default: nvidia-smi
  dcgmi:
    description: dcgmi executable; the DCGM check runs only when it is found. Empty disables it.
    type: str
    default: dcgmi
  report_path:
    description: Where to write this node's JSON report.
    type: path
  timeout:
    description: Seconds each command may take.
    type: int
    default: 120
"""

# Fields asked from `nvidia-smi --query-gpu`, in this order.
QUERY_FIELDS = (
    "index", "name", "uuid", "pci.bus_id", "driver_version", "persistence_mode", "ecc.mode.current",
    "pcie.link.gen.max", "pcie.link.width.max", "retired_pages.pending", "remapped_rows.failure",
)
MISSING = {"", "N/A", "[N/A]", "[Not Supported]", "Not Supported", "[Unknown Error]"}


# --------------------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------------------
def _field_name(header: str) -> str:
    # "memory.total [MiB]" -> "memory.total"
    return header.strip().split(" [", 1)[0].strip()


def _value(text: str) -> str | None:
    text = text.strip()
    return None if text in MISSING else text


def parse_query_gpu(text: str) -> list[dict[str, str | None]]:
    """`--query-gpu=... --format=csv` (with header) -> one dict per GPU keyed by field name; N/A -> None."""
    rows = [r for r in csv.reader(io.StringIO(text.strip()), skipinitialspace=True) if r]
    if not rows:
        return []
    header = [_field_name(h) for h in rows[0]]
    gpus = []
    for row in rows[1:]:
        if len(row) != len(header):
            raise ValueError(f"query-gpu row has {len(row)} fields, header has {len(header)}: {row}")
        gpus.append({name: _value(v) for name, v in zip(header, row, strict=True)})
    return gpus


def parse_topo(text: str) -> dict[str, Any]:
    """`nvidia-smi topo -m` -> {"gpus": ["GPU0", ...], "links": {"GPU0": {"GPU1": "NV18", ...}}, "numa": {...}}.

    Recent drivers separate columns with tabs, older ones with spaces; the device columns (GPUn, NICn, mlx*)
    lead the header and are read by position, the affinity columns after them.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    header = next((line for line in lines if re.match(r"^\s+GPU0\b", line)), None)
    if header is None:
        raise ValueError("no topology matrix header (a line starting with GPU0) in nvidia-smi topo -m output")
    devices = []
    for token in header.split():
        if not re.fullmatch(r"(GPU|NIC)\d+|mlx\d+_\d+", token):
            break
        devices.append(token)
    gpus = [d for d in devices if d.startswith("GPU")]
    links: dict[str, dict[str, str]] = {}
    numa: dict[str, str | None] = {}
    for line in lines[lines.index(header) + 1:]:
        if line.startswith("Legend"):
            break
        if not re.match(r"^GPU\d+\b", line):
            continue
        if "\t" in line:
            name, *cells = [c.strip() for c in line.split("\t")]
        else:
            name, *cells = line.split()
        if len(cells) < len(devices):
            raise ValueError(f"topology row {name} has {len(cells)} cells for {len(devices)} devices")
        row = dict(zip(devices, cells[:len(devices)], strict=True))
        links[name] = {dev: row[dev] for dev in gpus if dev != name}
        extra = [c for c in cells[len(devices):] if c]
        numa[name] = extra[1] if len(extra) > 1 else None
    return {"gpus": gpus, "links": links, "numa": numa}


def nvlink_count(marker: str) -> int:
    """"NV18" -> 18; PCIe paths (SYS, PHB, PXB, PIX, NODE) -> 0."""
    match = re.fullmatch(r"NV(\d+)", marker or "")
    return int(match.group(1)) if match else 0


def parse_nvlink_status(text: str) -> dict[int, dict[str, Any]]:
    """`nvidia-smi nvlink --status` -> {gpu index: {"name", "uuid", "links": {link: GB/s or None if inactive}}}."""
    gpus: dict[int, dict[str, Any]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^GPU (\d+): (.+?) \(UUID: ([^)]*)\)", line.strip())
        if head:
            current = {"name": head.group(2), "uuid": head.group(3), "links": {}}
            gpus[int(head.group(1))] = current
            continue
        link = re.match(r"^Link (\d+): (.+)$", line.strip())
        if link and current is not None:
            speed = re.match(r"([\d.]+) GB/s", link.group(2))
            current["links"][int(link.group(1))] = float(speed.group(1)) if speed else None
    return gpus


def parse_dcgmi_diag(text: str) -> dict[str, str]:
    """`dcgmi diag -r N` table -> {test name: result} for the test rows (metadata rows are kept too)."""
    results = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] and cells[1] and not cells[0].startswith(("-", "=", "Diagnostic")):
            results[cells[0]] = cells[1]
    return results


# --------------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------------
def _enabled(value: str | None) -> bool | None:
    if value is None:
        return None
    return value.strip().lower() in ("enabled", "on", "1", "yes")


def _int(value: str | None) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def compare(observed: dict[str, Any], profile: dict[str, Any]) -> list[dict[str, str]]:
    """Every way the observed node differs from the profile: [{"check", "gpu", "expected", "found"}]."""
    diffs: list[dict[str, str]] = []

    def differ(check: str, gpu: str, expected: Any, found: Any) -> None:
        diffs.append({"check": check, "gpu": gpu, "expected": str(expected), "found": str(found)})

    gpus = observed.get("gpus") or []
    if "count" in profile and len(gpus) != profile["count"]:
        differ("count", "-", profile["count"], len(gpus))
    model = profile.get("model")
    for gpu in gpus:
        gid = f"GPU{gpu.get('index')}"
        if model and not re.search(model, gpu.get("name") or ""):
            differ("model", gid, model, gpu.get("name"))
        if profile.get("persistence") and _enabled(gpu.get("persistence_mode")) is not True:
            differ("persistence mode", gid, "Enabled", gpu.get("persistence_mode"))
        if profile.get("ecc") and _enabled(gpu.get("ecc.mode.current")) is not True:
            differ("ECC", gid, "Enabled", gpu.get("ecc.mode.current"))
        pcie = profile.get("pcie") or {}
        for key, field in (("gen", "pcie.link.gen.max"), ("width", "pcie.link.width.max")):
            if key in pcie and (_int(gpu.get(field)) or 0) < pcie[key]:
                differ(f"PCIe {key}", gid, f">= {pcie[key]}", gpu.get(field))
        if _enabled(gpu.get("retired_pages.pending")):
            differ("retired pages pending", gid, "No", gpu.get("retired_pages.pending"))
        if (_int(gpu.get("remapped_rows.failure")) or 0) > 0 or _enabled(gpu.get("remapped_rows.failure")):
            differ("row remapping failure", gid, "0", gpu.get("remapped_rows.failure"))
    versions = sorted({g.get("driver_version") for g in gpus if g.get("driver_version")})
    if len(versions) > 1:
        differ("driver version", "-", "one version", ", ".join(versions))
    if profile.get("driver_version") and versions and versions != [str(profile["driver_version"])]:
        differ("driver version", "-", profile["driver_version"], ", ".join(versions))

    nvlink = profile.get("nvlink") or {}
    if nvlink:
        topo = observed.get("topology") or {"gpus": [], "links": {}}
        want_pair = nvlink.get("links_per_pair")
        if want_pair:
            names = topo["gpus"]
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    marker = topo["links"].get(a, {}).get(b)
                    if marker is None and a in topo["links"]:
                        marker = "missing"
                    if marker is not None and nvlink_count(marker) < want_pair:
                        differ("NVLink links per pair", f"{a}-{b}", f"NV{want_pair}", marker)
        status = observed.get("nvlink") or {}
        want_links = nvlink.get("links_per_gpu")
        min_speed = nvlink.get("min_link_gbps")
        for index in sorted(status):
            links = status[index]["links"]
            active = {n: s for n, s in links.items() if s is not None}
            inactive = sorted(n for n, s in links.items() if s is None)
            gid = f"GPU{index}"
            if inactive:
                differ("NVLink inactive", gid, "all links up", "links " + ", ".join(map(str, inactive)) + " inactive")
            if want_links and len(active) < want_links:
                differ("NVLink active links", gid, want_links, len(active))
            if min_speed:
                slow = sorted(n for n, s in active.items() if s < min_speed)
                if slow:
                    differ("NVLink bandwidth", gid, f">= {min_speed} GB/s per link",
                           ", ".join(f"link {n}: {active[n]} GB/s" for n in slow))
        if want_links and gpus and not status:
            differ("NVLink active links", "-", want_links, "no NVLink reported")

    dcgm = observed.get("dcgm") or {}
    for test, result in sorted(dcgm.items()):
        if result.lower().startswith(("fail", "error")):
            differ("DCGM diag", "-", f"{test}: Pass", f"{test}: {result}")
    return diffs


def select_profile(name: str, profiles: dict[str, dict[str, Any]], gpus: list[dict[str, Any]]
                   ) -> tuple[str, dict[str, Any]]:
    """The named profile, or with "auto" the one matching the GPUs found (model pattern and count)."""
    if name != "auto":
        if name not in profiles:
            raise ValueError(f"gpu_validate_profile: no profile named {name!r}; known: {', '.join(sorted(profiles))}")
        return name, profiles[name]
    names = sorted({g.get("name") or "?" for g in gpus})
    matches = [n for n, prof in sorted(profiles.items())
               if prof.get("count") == len(gpus) and all(re.search(prof.get("model", "."), m) for m in names)]
    if not matches:
        raise ValueError(f"no GPU profile matches {len(gpus)} x {', '.join(names) or 'no GPU'}; set "
                         f"gpu_validate_profile to one of {', '.join(sorted(profiles))} or add yours to "
                         "gpu_validate_profiles")
    return matches[0], profiles[matches[0]]


def table(diffs: list[dict[str, str]]) -> str:
    """Differences as an aligned text table."""
    heads = ("check", "gpu", "expected", "found")
    rows = [heads] + [tuple(d[h] for h in heads) for d in diffs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(heads))]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    out = [line, "| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)) + " |", line]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows[1:]]
    return "\n".join([*out, line])


# --------------------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------------------
def _run(argv: list[str], timeout: int) -> tuple[int, str, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return 127, "", f"{argv[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, "", f"{' '.join(argv)}: timed out after {timeout}s"
    return proc.returncode, proc.stdout, proc.stderr


def observe(nvidia_smi: str, dcgmi: str, timeout: int) -> tuple[dict[str, Any], list[str]]:
    """Run the tools; return what they showed and the errors that stopped a check from running."""
    errors: list[str] = []
    observed: dict[str, Any] = {"gpus": [], "topology": None, "nvlink": {}, "dcgm": {}}
    rc, out, err = _run([nvidia_smi, "--query-gpu=" + ",".join(QUERY_FIELDS), "--format=csv"], timeout)
    if rc != 0:
        errors.append(f"nvidia-smi --query-gpu failed (rc={rc}): {(err or out).strip()}")
        return observed, errors
    observed["gpus"] = parse_query_gpu(out)
    rc, out, err = _run([nvidia_smi, "topo", "-m"], timeout)
    if rc == 0:
        observed["topology"] = parse_topo(out)
    else:
        errors.append(f"nvidia-smi topo -m failed (rc={rc}): {(err or out).strip()}")
    rc, out, err = _run([nvidia_smi, "nvlink", "--status"], timeout)
    if rc == 0:
        observed["nvlink"] = parse_nvlink_status(out)
    else:
        errors.append(f"nvidia-smi nvlink --status failed (rc={rc}): {(err or out).strip()}")
    if dcgmi and shutil.which(dcgmi):
        rc, out, err = _run([dcgmi, "diag", "-r", "1"], timeout)
        observed["dcgm"] = parse_dcgmi_diag(out)
        if rc != 0 and not observed["dcgm"]:
            errors.append(f"dcgmi diag -r 1 failed (rc={rc}): {(err or out).strip()}")
    return observed, errors


def _jsonable(observed: dict[str, Any]) -> dict[str, Any]:
    return dict(observed, nvlink={str(k): v for k, v in (observed.get("nvlink") or {}).items()})


def main() -> None:
    from ansible.module_utils.basic import AnsibleModule

    module = AnsibleModule(
        argument_spec={
            "profile": {"type": "str", "default": "auto"},
            "profiles": {"type": "dict", "required": True},
            "nvidia_smi": {"type": "str", "default": "nvidia-smi"},
            "dcgmi": {"type": "str", "default": "dcgmi"},
            "report_path": {"type": "path"},
            "timeout": {"type": "int", "default": 120},
        },
        supports_check_mode=True,
    )
    p = module.params
    observed, errors = observe(p["nvidia_smi"], p["dcgmi"], p["timeout"])
    try:
        name, profile = select_profile(p["profile"], p["profiles"], observed["gpus"])
    except ValueError as exc:
        name, profile = p["profile"], {}
        errors.append(str(exc))
    diffs = compare(observed, profile)
    diffs = [{"check": "tool", "gpu": "-", "expected": "runs", "found": e} for e in errors] + diffs
    versions = sorted({g.get("driver_version") for g in observed["gpus"] if g.get("driver_version")})
    report = {"ok": not diffs, "profile": name, "expected": profile, "differences": diffs, "driver_versions": versions,
              "observed": _jsonable(observed)}
    changed = False
    if p["report_path"]:
        text = json.dumps(report, indent=2, sort_keys=True) + "\n"
        try:
            with open(p["report_path"], encoding="utf-8") as fh:
                changed = fh.read() != text
        except OSError:
            changed = True
        if changed and not module.check_mode:
            os.makedirs(os.path.dirname(p["report_path"]) or ".", exist_ok=True)
            with open(p["report_path"], "w", encoding="utf-8") as fh:
                fh.write(text)
    result = {"changed": changed, "report": report, "differences": diffs, "driver_versions": versions}
    if diffs:
        module.fail_json(msg=f"{len(diffs)} difference(s) from the expected GPU profile:\n{table(diffs)}", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
