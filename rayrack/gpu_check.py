"""GPU checks of one node from nvidia-smi (and dcgmi) outputs: parsers, the observation they build, the checks.

Standard library only: the same file is the gpu_validate role's module_utils (the module runs on the node's
system python3) and backs `rayrack gpu-check --captures DIR` on the controller.

The observation every source feeds and every check reads (a plain dict, JSON-serialisable):

    {
      "gpus":     [{<--query-gpu field name>: str or None, ...}, ...]   one per GPU, "index" always set;
                  `nvidia-smi -q` (text or XML) fills the same field names (see Q_FIELDS, XML_FIELDS)
      "samples":  [{...same keys...}, ...]     every reading of every GPU (idle and under load), for the
                  checks that depend on the load at the time (PCIe generation)
      "topology": {"gpus": ["GPU0", ...], "links": {"GPU0": {"GPU1": "NV18", ...}},
                   "cpu": {"GPU0": "0-47,96-143" or None}, "numa": {"GPU0": "0" or None}} or None
      "nvlink":   {index: {"name", "uuid", "links": {link: GB/s, or None when inactive}}}
      "dcgm":     {test name: result}
    }

A finding: {"severity": "error" | "note", "check", "gpu", "expected", "observed"}. Errors fail the node;
notes are reported and do not.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

# Capture files `rayrack gpu-check --captures DIR` reads, by kind.
CAPTURE_FILES = {
    "query": "nvidia-smi-query-gpu.csv",
    "topo": "nvidia-smi-topo-m.txt",
    "nvlink": "nvidia-smi-nvlink-status.txt",
    "q": "nvidia-smi-q.txt",
    "xml": "nvidia-smi-q.xml",
    "dcgm": "dcgmi-diag.txt",
}
PROFILES_FILE = Path(__file__).resolve().parent / "gpu_profiles.json"

# Fields the module asks from `nvidia-smi --query-gpu`, in this order.
QUERY_FIELDS = (
    "index", "name", "uuid", "pci.bus_id", "driver_version", "persistence_mode", "ecc.mode.current",
    "pcie.link.gen.current", "pcie.link.gen.max", "pcie.link.width.current", "pcie.link.width.max",
    "utilization.gpu", "retired_pages.pending", "remapped_rows.pending", "remapped_rows.failure",
    "fabric.state", "fabric.status",
)
MISSING = {"", "N/A", "[N/A]", "[Not Supported]", "Not Supported", "[Unknown Error]", "Unknown Error",
           "Requested functionality has been deprecated"}
# A GPU busier than this (utilization.gpu, percent) is under load: its PCIe link must run at its top generation.
# Below it a lower generation is the driver saving power, reported as a note.
BUSY_UTILIZATION_PERCENT = 10
# Data-centre GPUs: ECC must be on. Matched as words in nvidia-smi's name ("NVIDIA H100 80GB HBM3").
DATA_CENTRE_MODELS = re.compile(
    r"\b(?:GB200|GB300|B200|B300|B100|H100|H200|H800|H20|GH200|A100|A800|A30|A40|A16|A10|A2|L40S|L40|L20|L4|"
    r"T4|V100|P100|P40|P4)\b")
NVLINK_MARKER = re.compile(r"NV(\d+)")
TOPO_DEVICE = re.compile(r"(?:GPU|NIC)\d+|mlx\d+_\d+")
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class CaptureError(ValueError):
    """Input that cannot be read: names the file and the line."""

    def __init__(self, source: str, line: int | None, message: str):
        where = f"{source}: line {line}" if line else source
        super().__init__(f"{where}: {message}")


# --------------------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------------------
def _field_name(header: str) -> str:
    # "memory.total [MiB]" -> "memory.total"
    return header.strip().split(" [", 1)[0].strip()


def _value(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    return None if text in MISSING else text


def parse_query_gpu(text: str, source: str = "query-gpu") -> list[dict[str, str | None]]:
    """`--query-gpu=... --format=csv` (with header, any fields, with or without units) -> one dict per row.

    N/A and its kin -> None. A header line repeated further down starts another reading of the same GPUs
    (an idle and an under-load capture in one file): all rows are returned, in order.
    """
    rows = list(csv.reader(io.StringIO(text), skipinitialspace=True))
    numbered = [(n, r) for n, r in enumerate(rows, 1) if any(c.strip() for c in r)]
    if not numbered:
        raise CaptureError(source, None, "empty; expected a --query-gpu CSV with a header line")
    first_line, head = numbered[0]
    header = [_field_name(h) for h in head]
    if not all(re.fullmatch(r"[A-Za-z_][\w.]*", h) for h in header):
        raise CaptureError(source, first_line, "not a --query-gpu header (field names such as index, name, "
                           "pcie.link.width.current); run nvidia-smi with --format=csv, not noheader")
    gpus = []
    for line, row in numbered[1:]:
        if [_field_name(c) for c in row] == header:
            continue  # the next reading's header
        if len(row) != len(header):
            raise CaptureError(source, line, f"{len(row)} fields, the header has {len(header)}")
        gpus.append({name: _value(v) for name, v in zip(header, row, strict=True)})
    if gpus and "index" not in header:
        _renumber(gpus)
    return gpus


def _cells_after(line: str, start: int) -> list[str]:
    """The tab-separated cells of a topo -m row from column start on, from the row as printed (tabs) or as
    pasted (tabs expanded to 8-column stops): a cell starts at a tab stop, and a stop skipped is an empty cell.

    So an empty CPU affinity (a CPU-restricting scheduler prints none) stays empty, and the NUMA affinity after
    it is not read as the CPU affinity, nor the GPU NUMA ID as the NUMA affinity.
    """
    cells: list[str] = []
    end = start
    for match in re.finditer(r"\S+", line[start:]):
        pos = start + match.start()
        next_stop = (end // 8 + 1) * 8
        tabs = (pos - next_stop) // 8 + 1 if pos >= next_stop else 1
        cells += [""] * (tabs - 1) + [match.group()]
        end = start + match.end()
    return cells


def parse_topo(text: str, source: str = "topo -m") -> dict[str, Any]:
    """`nvidia-smi topo -m` -> {"gpus", "links", "cpu", "numa"} (see the module docstring).

    nvidia-smi separates columns with tabs (recent drivers underline the header with ANSI escapes); pasted
    copies have the tabs expanded to spaces. The device columns (GPUn, NICn, or mlx5_n on old drivers) lead
    the header, with or without leading whitespace; the affinity columns follow (_cells_after). The legend,
    whole or cut, is not needed.
    """
    lines = [ANSI.sub("", line).rstrip("\n") for line in text.splitlines()]
    header_at = next((n for n, line in enumerate(lines) if re.match(r"^\s*GPU0(\s|$)", line)
                      and not re.match(r"^GPU0\s+X\b", line)), None)
    if header_at is None:
        raise CaptureError(source, 1, "no topology matrix header (a line of GPU0 GPU1 ... CPU Affinity); "
                           f"it starts {text.strip()[:60]!r}")
    header = lines[header_at]
    devices = []
    for token in header.split():
        if not TOPO_DEVICE.fullmatch(token):
            break
        devices.append(token)
    rest = header.split(devices[-1], 1)[1] if devices else header
    columns = [c for c in ("CPU Affinity", "NUMA Affinity", "GPU NUMA ID") if c in rest]
    gpus = [d for d in devices if d.startswith("GPU")]
    links: dict[str, dict[str, str]] = {}
    cpu: dict[str, str | None] = {}
    numa: dict[str, str | None] = {}
    for n, line in enumerate(lines[header_at + 1:], header_at + 2):
        if line.startswith("Legend"):
            break
        name = re.match(r"^(GPU\d+)\s", line + " ")
        if not name:
            continue
        cells = line.split()[1:]
        if len(cells) < len(devices):
            raise CaptureError(source, n, f"row {name.group(1)} has {len(cells)} cells for {len(devices)} devices")
        row = dict(zip(devices, cells[:len(devices)], strict=True))
        links[name.group(1)] = {dev: row[dev] for dev in gpus if dev != name.group(1)}
        if columns:
            expanded = line.expandtabs(8)
            last = list(re.finditer(r"\S+", expanded))[len(devices)]  # the row's last device cell
            values = _cells_after(expanded, last.end())
            cpu[name.group(1)] = _value(values[0]) if values else None
            numa[name.group(1)] = _value(values[1]) if len(values) > 1 and "NUMA Affinity" in columns else None
    return {"gpus": gpus, "links": links, "cpu": cpu, "numa": numa}


def nvlink_count(marker: str) -> int:
    """"NV18" -> 18; PCIe paths (SYS, PHB, PXB, PIX, NODE) -> 0."""
    match = NVLINK_MARKER.fullmatch(marker or "")
    return int(match.group(1)) if match else 0


def parse_nvlink_status(text: str, source: str = "nvlink --status") -> dict[int, dict[str, Any]]:
    """`nvidia-smi nvlink --status` -> {gpu index: {"name", "uuid", "links": {link: GB/s or None if inactive}}}.

    A GPU without NVLink (or in MIG mode) has no links; its message is kept as "note".
    """
    gpus: dict[int, dict[str, Any]] = {}
    current = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        head = re.match(r"^GPU (\d+): (.+?) \(UUID: ([^)]*)\)", line)
        if head:
            current = {"name": head.group(2), "uuid": head.group(3), "links": {}}
            gpus[int(head.group(1))] = current
            continue
        if current is None:
            raise CaptureError(source, n, f"expected a 'GPU n: <name> (UUID: ...)' line, got {line[:60]!r}")
        link = re.match(r"^Link (\d+): (.+)$", line)
        if link:
            speed = re.match(r"([\d.]+) GB/s", link.group(2))
            current["links"][int(link.group(1))] = float(speed.group(1)) if speed else None
        else:
            current["note"] = line
    if not gpus:
        raise CaptureError(source, None, "no 'GPU n: <name> (UUID: ...)' line")
    return gpus


def parse_dcgmi_diag(text: str, source: str = "dcgmi diag") -> dict[str, str]:
    """`dcgmi diag -r N` table -> {test name: result} for the test rows (metadata rows are kept too)."""
    results = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] and cells[1] and not cells[0].startswith(("-", "=", "Diagnostic")):
            results[cells[0]] = cells[1]
    if not results:
        raise CaptureError(source, None, "no '| test | result |' rows of dcgmi diag")
    return results


# `nvidia-smi -q` paths (section/.../key) -> --query-gpu field names.
Q_FIELDS = {
    "Product Name": "name",
    "GPU UUID": "uuid",
    "Persistence Mode": "persistence_mode",
    "PCI/Bus Id": "pci.bus_id",
    "PCI/GPU Link Info/PCIe Generation/Max": "pcie.link.gen.max",
    "PCI/GPU Link Info/PCIe Generation/Current": "pcie.link.gen.current",
    "PCI/GPU Link Info/Link Width/Max": "pcie.link.width.max",
    "PCI/GPU Link Info/Link Width/Current": "pcie.link.width.current",
    "Utilization/GPU": "utilization.gpu",
    "ECC Mode/Current": "ecc.mode.current",
    "Retired Pages/Pending Page Blacklist": "retired_pages.pending",
    "Retired Pages/Pending Page Retirement": "retired_pages.pending",
    "Remapped Rows/Pending": "remapped_rows.pending",
    "Remapped Rows/Remapping Failure Occurred": "remapped_rows.failure",
    "Fabric/State": "fabric.state",
    "Fabric/Status": "fabric.status",
}
# `nvidia-smi -q -x` element paths -> the same field names.
XML_FIELDS = {
    "product_name": "name",
    "uuid": "uuid",
    "persistence_mode": "persistence_mode",
    "pci/pci_bus_id": "pci.bus_id",
    "pci/pci_gpu_link_info/pcie_gen/max_link_gen": "pcie.link.gen.max",
    "pci/pci_gpu_link_info/pcie_gen/current_link_gen": "pcie.link.gen.current",
    "pci/pci_gpu_link_info/link_widths/max_link_width": "pcie.link.width.max",
    "pci/pci_gpu_link_info/link_widths/current_link_width": "pcie.link.width.current",
    "utilization/gpu_util": "utilization.gpu",
    "ecc_mode/current_ecc": "ecc.mode.current",
    "retired_pages/pending_blacklist": "retired_pages.pending",
    "retired_pages/pending_retirement": "retired_pages.pending",
    "remapped_rows/remapped_row_pending": "remapped_rows.pending",
    "remapped_rows/remapped_row_failure": "remapped_rows.failure",
    "fabric/state": "fabric.state",
    "fabric/status": "fabric.status",
}


def parse_query_text(text: str, source: str = "-q") -> list[dict[str, str | None]]:
    """`nvidia-smi -q` -> one dict per GPU in --query-gpu field names (Q_FIELDS); several logs -> all readings."""
    gpus: list[dict[str, str | None]] = []
    driver = None
    current: dict[str, str | None] | None = None
    stack: list[tuple[int, str]] = []
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("="):
            if "NVSMI LOG" in raw:
                current, stack = None, []
            continue
        indent = len(raw) - len(raw.lstrip())
        key, sep, value = raw.strip().partition(":")
        key = key.strip()
        if indent == 0:
            if key == "Driver Version" and sep:
                driver = _value(value)
            gpu = re.match(r"^GPU ([0-9A-Fa-f]+:[0-9A-Fa-f]+:[0-9A-Fa-f]+\.[0-9A-Fa-f])$", raw.strip())
            if gpu:
                current = {"pci.bus_id": gpu.group(1), "driver_version": driver}
                gpus.append(current)
                stack = []
            continue
        if current is None:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if not sep or not value.strip():
            stack.append((indent, key))
            continue
        path = "/".join([k for _, k in stack] + [key])
        field = Q_FIELDS.get(path)
        if field:
            current[field] = _value(re.sub(r"\s*(x|%)$", "", value.strip()))
    if not gpus:
        raise CaptureError(source, None, "no 'GPU 00000000:xx:xx.x' section of nvidia-smi -q")
    _renumber(gpus)
    return gpus


def _renumber(gpus: list[dict[str, Any]]) -> None:
    # Several logs list the same GPUs again: a GPU's index is the order its bus id was first seen.
    order: dict[str, int] = {}
    for n, gpu in enumerate(gpus):
        key = gpu.get("pci.bus_id") or gpu.get("uuid") or f"row {n}"
        order.setdefault(key, len(order))
        gpu["index"] = str(order[key])


def parse_query_xml(text: str, source: str = "-q -x") -> list[dict[str, str | None]]:
    """`nvidia-smi -q -x` -> one dict per GPU in --query-gpu field names (XML_FIELDS)."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise CaptureError(source, exc.position[0], f"not XML: {exc}") from None
    if root.tag != "nvidia_smi_log":
        raise CaptureError(source, 1, f"root element is <{root.tag}>, expected <nvidia_smi_log>")
    driver = _value(root.findtext("driver_version"))
    gpus = []
    for node in root.findall("gpu"):
        gpu: dict[str, str | None] = {"driver_version": driver, "pci.bus_id": node.get("id")}
        for path, field in XML_FIELDS.items():
            value = node.findtext(path)
            if value is not None and gpu.get(field) is None:
                gpu[field] = _value(re.sub(r"\s*(x|%)$", "", value.strip()))
        gpus.append(gpu)
    if not gpus:
        raise CaptureError(source, None, "no <gpu> element")
    _renumber(gpus)
    return gpus


# --------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------
def _enabled(value: str | None) -> bool | None:
    if value is None:
        return None
    return value.strip().lower() in ("enabled", "on", "1", "yes", "true")


def _int(value: str | None) -> int | None:
    match = re.match(r"^\s*(\d+)", str(value or ""))
    return int(match.group(1)) if match else None


def _gid(gpu: dict[str, Any]) -> str:
    return f"GPU{gpu.get('index')}"


class _Findings(list):
    def add(self, check: str, gpu: str, expected: Any, observed: Any, severity: str = "error") -> None:
        self.append({"severity": severity, "check": check, "gpu": gpu, "expected": str(expected),
                     "observed": str(observed)})


def _nvlink_findings(status: dict[int, dict[str, Any]], out: _Findings, want_links: int | None = None,
                     min_speed: float | None = None) -> None:
    """Inactive links always; with a profile its link count and speed; without, links slower than the node's
    usual speed (the most common one among its active links)."""
    speeds = Counter(s for gpu in status.values() for s in gpu["links"].values() if s is not None)
    usual = speeds.most_common(1)[0][0] if speeds else None
    for index in sorted(status):
        links = status[index]["links"]
        active = {n: s for n, s in links.items() if s is not None}
        inactive = sorted(n for n, s in links.items() if s is None)
        gid = f"GPU{index}"
        if inactive:
            out.add("NVLink inactive", gid, "all links up", "links " + ", ".join(map(str, inactive)) + " inactive")
        if want_links and len(active) < want_links:
            out.add("NVLink active links", gid, want_links, len(active))
        floor = min_speed if min_speed is not None else usual
        slow = sorted(n for n, s in active.items() if floor is not None and s < floor)
        if slow:
            expected = f">= {min_speed} GB/s per link" if min_speed is not None else \
                f"{usual} GB/s like the node's other links"
            out.add("NVLink bandwidth", gid, expected, ", ".join(f"link {n}: {active[n]} GB/s" for n in slow))


def compare(observed: dict[str, Any], profile: dict[str, Any]) -> list[dict[str, str]]:
    """Every way the observed node differs from a profile (its stricter expectations), and the node-wide checks
    that hold whatever the profile (no pending page retirement or row remap, one driver version, DCGM diagnostics
    passed); {} runs only those."""
    diffs = _Findings()
    gpus = observed.get("gpus") or []
    if "count" in profile and len(gpus) != profile["count"]:
        diffs.add("count", "-", profile["count"], len(gpus))
    model = profile.get("model")
    pcie = profile.get("pcie") or {}
    for gpu in gpus:
        gid = _gid(gpu)
        if model and not re.search(model, gpu.get("name") or ""):
            diffs.add("model", gid, model, gpu.get("name"))
        if profile.get("persistence") and _enabled(gpu.get("persistence_mode")) is not True:
            diffs.add("persistence mode", gid, "Enabled", gpu.get("persistence_mode"))
        if profile.get("ecc") and _enabled(gpu.get("ecc.mode.current")) is not True:
            diffs.add("ECC", gid, "Enabled", gpu.get("ecc.mode.current"))
        # The slot's capability (max) and, for the width, the link as trained (current): an x8 slot fails.
        widths = [w for w in (_int(gpu.get("pcie.link.width.max")), _int(gpu.get("pcie.link.width.current")))
                  if w is not None]
        if "width" in pcie and (min(widths) if widths else 0) < pcie["width"]:
            diffs.add("PCIe width", gid, f">= x{pcie['width']}", "/".join(f"x{w}" for w in widths) if widths
                      else None)
        if "gen" in pcie and (_int(gpu.get("pcie.link.gen.max")) or 0) < pcie["gen"]:
            diffs.add("PCIe gen", gid, f">= {pcie['gen']}", gpu.get("pcie.link.gen.max"))
        if _enabled(gpu.get("retired_pages.pending")):
            diffs.add("retired pages pending", gid, "No", gpu.get("retired_pages.pending"))
        if _enabled(gpu.get("remapped_rows.pending")):
            diffs.add("row remapping pending", gid, "No (reset the GPU to apply)", gpu.get("remapped_rows.pending"))
        if (_int(gpu.get("remapped_rows.failure")) or 0) > 0 or _enabled(gpu.get("remapped_rows.failure")):
            diffs.add("row remapping failure", gid, "0", gpu.get("remapped_rows.failure"))
    versions = driver_versions(observed)
    if len(versions) > 1:
        diffs.add("driver version", "-", "one version", ", ".join(versions))
    if profile.get("driver_version") and versions and versions != [str(profile["driver_version"])]:
        diffs.add("driver version", "-", profile["driver_version"], ", ".join(versions))

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
                        diffs.add("NVLink links per pair", f"{a}-{b}", f"NV{want_pair}", marker)
        status = {i: s for i, s in (observed.get("nvlink") or {}).items()}
        want_links = nvlink.get("links_per_gpu")
        _nvlink_findings(status, diffs, want_links, nvlink.get("min_link_gbps", 0.0))
        if want_links and gpus and not any(s["links"] for s in status.values()):
            diffs.add("NVLink active links", "-", want_links, "no NVLink reported")
    for test, result in sorted((observed.get("dcgm") or {}).items()):
        if result.lower().startswith(("fail", "error")):
            diffs.add("DCGM diag", "-", f"{test}: Pass", f"{test}: {result}")
    return list(diffs)


def driver_versions(observed: dict[str, Any]) -> list[str]:
    return sorted({g["driver_version"] for g in observed.get("gpus") or [] if g.get("driver_version")})


def self_consistency(observed: dict[str, Any]) -> list[dict[str, str]]:
    """What a node says about itself that cannot all be right, with no profile: see the README's GPU checks."""
    out = _Findings()
    gpus = observed.get("gpus") or []
    models = sorted({g["name"] for g in gpus if g.get("name")})
    if len(models) > 1:
        out.add("GPU models", "-", "one model",
                "; ".join(f"{m}: " + ", ".join(_gid(g) for g in gpus if g.get("name") == m) for m in models))
    for gpu in gpus:
        gid = _gid(gpu)
        if DATA_CENTRE_MODELS.search(gpu.get("name") or "") and _enabled(gpu.get("ecc.mode.current")) is False:
            out.add("ECC", gid, f"Enabled on a data-centre GPU ({gpu.get('name')})", gpu.get("ecc.mode.current"))
        state, status = gpu.get("fabric.state"), gpu.get("fabric.status")
        if state is not None and state != "Completed":
            out.add("fabric state", gid, "Completed (Fabric Manager registered the GPU)", state)
        elif state == "Completed" and status is not None and status != "Success":
            out.add("fabric status", gid, "Success", status)
    _pcie_findings(observed.get("samples") or gpus, out)
    _topology_findings(observed.get("topology"), out)
    _nvlink_findings(observed.get("nvlink") or {}, out)
    return list(out)


def _pcie_findings(samples: list[dict[str, Any]], out: _Findings) -> None:
    """Width below max always; generation below max under load (an error), at idle a note (power saving)."""
    worst: dict[str, dict[str, Any]] = {}
    for gpu in samples:
        gid = _gid(gpu)
        width, width_max = _int(gpu.get("pcie.link.width.current")), _int(gpu.get("pcie.link.width.max"))
        if width is not None and width_max is not None and width < width_max:
            worst.setdefault(gid, {})["width"] = (f"x{width_max}", f"x{width}")
        gen, gen_max = _int(gpu.get("pcie.link.gen.current")), _int(gpu.get("pcie.link.gen.max"))
        if gen is not None and gen_max is not None and gen < gen_max:
            util = _int(gpu.get("utilization.gpu"))
            busy = util is not None and util > BUSY_UTILIZATION_PERCENT
            load = f"at {util}% utilisation" if util is not None else "utilisation unknown"
            seen = worst.setdefault(gid, {}).get("gen")
            if seen is None or (busy and seen[2] == "note"):
                worst[gid]["gen"] = (f"Gen{gen_max}", f"Gen{gen} {load}", "error" if busy else "note")
    for gid in sorted(worst, key=lambda g: int(g[3:]) if g[3:].isdigit() else 0):
        if "width" in worst[gid]:
            out.add("PCIe width", gid, *worst[gid]["width"])
        if "gen" in worst[gid]:
            expected, observed, severity = worst[gid]["gen"]
            if severity == "note":
                expected += f" once busier than {BUSY_UTILIZATION_PERCENT}% (idle links downshift to save power)"
            out.add("PCIe gen", gid, expected, observed, severity)


def _topology_findings(topo: dict[str, Any] | None, out: _Findings) -> None:
    """NVSwitch boards (every pair NV#): a pair whose NV# differs from the rest. Direct-attach boards: a pair
    (i, j) that differs from (j, i)."""
    if not topo:
        return
    names = [g for g in topo["gpus"] if g in topo["links"]]
    pairs = {(a, b): topo["links"][a].get(b) for a in names for b in names if a != b}
    if not pairs:
        return
    if all(NVLINK_MARKER.fullmatch(m or "") for m in pairs.values()):
        usual = Counter(pairs.values()).most_common(1)[0][0]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                odd = sorted({pairs[(a, b)], pairs[(b, a)]} - {usual})
                if odd:
                    out.add("NVLink pair", f"{a}-{b}", f"{usual} like the node's other GPU pairs", "/".join(odd))
        return
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if pairs[(a, b)] != pairs[(b, a)]:
                out.add("topology symmetry", f"{a}-{b}", f"{a}->{b} = {b}->{a}", f"{pairs[(a, b)]} vs {pairs[(b, a)]}")


def select_profile(name: str, profiles: dict[str, dict[str, Any]], gpus: list[dict[str, Any]]
                   ) -> tuple[str | None, dict[str, Any]]:
    """The named profile, or with "auto" the one matching the GPUs found (model pattern and count), or
    (None, {}) when none matches: then only the self-consistency checks run."""
    if name != "auto":
        if name not in profiles:
            raise ValueError(f"no GPU profile named {name!r}; known: {', '.join(sorted(profiles))}")
        return name, profiles[name]
    names = sorted({g.get("name") or "?" for g in gpus})
    matches = [n for n, prof in sorted(profiles.items(), key=lambda item: (item[1].get("model", ".") == ".", item[0]))
               if prof.get("count") == len(gpus) and all(re.search(prof.get("model", "."), m) for m in names)]
    return (matches[0], profiles[matches[0]]) if matches else (None, {})


def check(observed: dict[str, Any], profile_name: str, profiles: dict[str, dict[str, Any]],
          errors: list[str] | None = None) -> dict[str, Any]:
    """The report: self-consistency findings, plus a profile's differences when one is named or matches.

    errors: what stopped a source from being read (a tool that failed); each is an error finding.
    """
    findings = _Findings()
    for error in errors or []:
        findings.add("input", "-", "readable nvidia-smi output", error)
    gpus = observed.get("gpus") or []
    try:
        name, profile = select_profile(profile_name, profiles, gpus)
    except ValueError as exc:
        name, profile = profile_name, {}
        findings.add("profile", "-", ", ".join(sorted(profiles)), str(exc))
    if name is None:
        models = ", ".join(sorted({g.get("name") or "?" for g in gpus})) or "no GPU"
        findings.add("profile", "-", "a profile for stricter checks",
                     f"none matches {len(gpus)} x {models}: self-consistency checks only", "note")
    seen = set()
    for finding in [*compare(observed, profile), *self_consistency(observed)]:
        key = (finding["check"], finding["gpu"])
        if key not in seen:
            seen.add(key)
            findings.append(finding)
    errors_found = [f for f in findings if f["severity"] == "error"]
    return {"ok": not errors_found, "profile": name, "expected": profile, "findings": list(findings),
            "driver_versions": driver_versions(observed),
            "observed": dict(observed, nvlink={str(k): v for k, v in (observed.get("nvlink") or {}).items()})}


def table(findings: list[dict[str, str]]) -> str:
    """Findings as an aligned text table."""
    heads = ("severity", "check", "gpu", "expected", "observed")
    rows = [heads] + [tuple(d[h] for h in heads) for d in findings]
    widths = [max(len(r[i]) for r in rows) for i in range(len(heads))]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    out = [line, "| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)) + " |", line]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows[1:]]
    return "\n".join([*out, line])


# --------------------------------------------------------------------------------------------------------
# Sources: capture files, or the tools on the node
# --------------------------------------------------------------------------------------------------------
def _merge(observed: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Add readings: the first reading of a GPU is its view, later sources only fill what it lacks."""
    observed["samples"].extend(rows)
    by_index = {g["index"]: g for g in observed["gpus"]}
    for row in rows:
        gpu = by_index.get(row["index"])
        if gpu is None:
            by_index[row["index"]] = dict(row)
            observed["gpus"].append(by_index[row["index"]])
        else:
            for key, value in row.items():
                if gpu.get(key) is None and value is not None:
                    gpu[key] = value
    observed["gpus"].sort(key=lambda g: _int(g["index"]) or 0)


def empty_observation() -> dict[str, Any]:
    return {"gpus": [], "samples": [], "topology": None, "nvlink": {}, "dcgm": {}, "read": []}


PARSERS = {"query": parse_query_gpu, "q": parse_query_text, "xml": parse_query_xml, "topo": parse_topo,
           "nvlink": parse_nvlink_status, "dcgm": parse_dcgmi_diag}


def _add(observed: dict[str, Any], kind: str, text: str, source: str) -> None:
    parsed = PARSERS[kind](text, source)
    if kind in ("query", "q", "xml"):
        _merge(observed, parsed)
    elif kind == "topo":
        observed["topology"] = parsed
    else:
        observed[kind] = parsed
    observed["read"].append(source)


def observe_captures(directory: Path) -> dict[str, Any]:
    """The observation from the capture files in directory (CAPTURE_FILES); CaptureError when unusable."""
    if not directory.is_dir():
        raise CaptureError(str(directory), None, "not a directory")
    observed = empty_observation()
    for kind in ("query", "xml", "q", "topo", "nvlink", "dcgm"):
        path = directory / CAPTURE_FILES[kind]
        if not path.exists():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[:exc.start].count(b"\n") + 1
            raise CaptureError(str(path), line, "not text (not UTF-8)") from None
        except OSError as exc:
            raise CaptureError(str(path), None, f"cannot read: {exc.strerror}") from None
        if not text.strip():
            raise CaptureError(str(path), None, "empty")
        _add(observed, kind, text, str(path))
    if not observed["read"]:
        raise CaptureError(str(directory), None, "none of the capture files: " + ", ".join(CAPTURE_FILES.values()))
    return observed


def _run(argv: list[str], timeout: int) -> tuple[int, str, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return 127, "", f"{argv[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, "", f"{' '.join(argv)}: timed out after {timeout}s"
    return proc.returncode, proc.stdout, proc.stderr


def observe(nvidia_smi: str, dcgmi: str, timeout: int) -> tuple[dict[str, Any], list[str]]:
    """Run the tools on this node; return the observation and the errors that kept a source out."""
    errors: list[str] = []
    observed = empty_observation()
    commands = [("query", "nvidia-smi --query-gpu", [nvidia_smi, "--query-gpu=" + ",".join(QUERY_FIELDS),
                                                      "--format=csv"]),
                ("topo", "nvidia-smi topo -m", [nvidia_smi, "topo", "-m"]),
                ("nvlink", "nvidia-smi nvlink --status", [nvidia_smi, "nvlink", "--status"])]
    if dcgmi and shutil.which(dcgmi):
        commands.append(("dcgm", "dcgmi diag -r 1", [dcgmi, "diag", "-r", "1"]))
    for kind, command, argv in commands:
        rc, out, err = _run(argv, timeout)
        fields = list(QUERY_FIELDS)
        while kind == "query" and rc != 0:
            # An older driver knows fewer fields: ask again without the one it names (its checks then see None).
            unknown = re.search(r'Field "([^"]+)" is not a valid field', out + err)
            if not unknown or unknown.group(1) not in fields:
                break
            fields.remove(unknown.group(1))
            argv = [nvidia_smi, "--query-gpu=" + ",".join(fields), "--format=csv"]
            rc, out, err = _run(argv, timeout)
        if rc != 0 and not (kind == "dcgm" and out.strip()):
            errors.append(f"{command} failed (rc={rc}): {(err or out).strip()}")
            if kind == "query":
                break
            continue
        try:
            _add(observed, kind, out, command)
        except CaptureError as exc:
            errors.append(str(exc))
    return observed, errors


# --------------------------------------------------------------------------------------------------------
# rayrack gpu-check
# --------------------------------------------------------------------------------------------------------
def load_profiles() -> dict[str, dict[str, Any]]:
    """The shipped profiles (gpu_profiles.json, also the gpu_validate role's)."""
    return json.loads(PROFILES_FILE.read_text(encoding="utf-8"))["profiles"]


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when consistent, 1 when anything (an error finding) was found, 2 when the input is unusable."""
    parser = argparse.ArgumentParser(
        prog="rayrack gpu-check", description="Check one node's GPUs from saved nvidia-smi outputs.",
        epilog="Reads whichever exist in DIR: " + ", ".join(CAPTURE_FILES.values()) +
        ". Exit codes: 0 consistent, 1 something found, 2 unusable input.")
    parser.add_argument("--captures", type=Path, required=True, metavar="DIR", help="directory of the outputs")
    parser.add_argument("--profile", default="auto", metavar="NAME|auto",
                        help="a shipped profile, or auto (default): self-consistency, plus a profile that matches")
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    args = parser.parse_args(argv)
    profiles = load_profiles()
    if args.profile != "auto" and args.profile not in profiles:
        print(f"rayrack gpu-check: --profile {args.profile!r} is not a shipped profile; known: auto, "
              + ", ".join(sorted(profiles)), file=sys.stderr)
        return 2
    try:
        observed = observe_captures(args.captures)
    except CaptureError as exc:
        print(f"rayrack gpu-check: {exc}", file=sys.stderr)
        return 2
    report = check(observed, args.profile, profiles)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        profile = report["profile"] or "none matches (self-consistency only)"
        gpus = report["observed"]["gpus"]
        print(f"{len(gpus)} GPU(s); profile: {profile}; read: " + ", ".join(Path(p).name for p in observed["read"]))
        print(table(report["findings"]) if report["findings"] else "no findings: consistent")
    return 0 if report["ok"] else 1
