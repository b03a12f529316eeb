"""GPU checks of one node from nvidia-smi (and dcgmi) outputs: parsers, the observation they build, the checks.

Standard library only: the same file is the gpu_validate module's module_utils (the module runs on the node's
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
      "read":     [source, ...]                     what was read: a capture file, a command, or "NVML"
      "sources":  {fact: [source, ...]}             where each fact came from: a --query-gpu field name,
                  "topology", "nvlink" or "dcgm" -> the sources that gave it
      "unread":   {fact: why}                       what a live run could not read (each is a note)
    }

On a node (`observe`) NVML comes first: where libnvidia-ml.so.1 loads and nvmlInit_v2 succeeds, `observe_nvml`
reads the GPUs' fields and NVLink through ctypes into the same model ("nvlink" then also holds each link's
"version" and "remote" PCI bus id, and as "unmeasured" the active links whose speed NVML does not give), and
only the topology matrix and CPU/NUMA affinity come from `nvidia-smi topo -m`. A call NVML answers
NOT_SUPPORTED (or does not offer) leaves its fact out; any other NVML error is an "input" error finding naming
the call and the GPU. Without NVML the nvidia-smi commands give everything.

A finding: {"severity": "error" | "note", "check", "gpu", "expected", "observed"}. Errors fail the node;
notes are reported and do not.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import io
import json
import re
import shutil
import subprocess
import sys
import threading
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
# NVML (the driver's libnvidia-ml.so.1) through ctypes
# --------------------------------------------------------------------------------------------------------
NVML_LIBRARY = "libnvidia-ml.so.1"
NVML_SOURCE = "NVML"
# nvmlReturn_t codes this module tells apart; every other one is an error, named by nvmlErrorString.
NVML_SUCCESS = 0
NVML_ERROR_INVALID_ARGUMENT = 2  # also what a link number past the GPU's last link gets
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_FUNCTION_NOT_FOUND = 13  # also returned here for a function the library does not export
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NOT_OFFERED = (NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND)
NVML_NVLINK_MAX_LINKS = 36  # nvml.h (pynvml): link numbers tried per GPU, up to the first that does not exist
# NVML_FI_DEV_NVLINK_SPEED_MBPS_L0..L11 (nvml.h); a link past L11 is asked NVML_FI_DEV_NVLINK_GET_SPEED with
# the link as scopeId (newer drivers).
NVLINK_SPEED_FIELDS = (84, 85, 86, 87, 88, 89, 132, 133, 134, 135, 136, 137)
NVLINK_GET_SPEED_FIELD = 164
FABRIC_STATES = {1: "Not Started", 2: "In Progress", 3: "Completed"}  # nvmlGpuFabricState_t, as nvidia-smi -q
BUFFER_SIZE = 96  # NVML_DEVICE_NAME_V2_BUFFER_SIZE = NVML_DEVICE_UUID_V2_BUFFER_SIZE; driver version: 80


# The structures NVML fills, field for field as nvml.h (and pynvml) lay them out.
class _PciInfo(ctypes.Structure):  # nvmlPciInfo_t
    _fields_ = [("busIdLegacy", ctypes.c_char * 16), ("domain", ctypes.c_uint), ("bus", ctypes.c_uint),
                ("device", ctypes.c_uint), ("pciDeviceId", ctypes.c_uint), ("pciSubSystemId", ctypes.c_uint),
                ("busId", ctypes.c_char * 32)]


class _Utilization(ctypes.Structure):  # nvmlUtilization_t
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class _Value(ctypes.Union):  # nvmlValue_t
    _fields_ = [("dVal", ctypes.c_double), ("uiVal", ctypes.c_uint), ("ulVal", ctypes.c_ulong),
                ("ullVal", ctypes.c_ulonglong), ("sllVal", ctypes.c_longlong), ("siVal", ctypes.c_int),
                ("usVal", ctypes.c_ushort)]

    def of_type(self, value_type: int) -> float | int:
        """The member that nvmlValueType_t names (the members are in that order)."""
        return getattr(self, self._fields_[value_type][0])


class _FieldValue(ctypes.Structure):  # nvmlFieldValue_t
    _fields_ = [("fieldId", ctypes.c_uint32), ("scopeId", ctypes.c_uint32), ("timestamp", ctypes.c_int64),
                ("latencyUsec", ctypes.c_int64), ("valueType", ctypes.c_uint), ("nvmlReturn", ctypes.c_uint),
                ("value", _Value)]


class _FabricInfo(ctypes.Structure):  # nvmlGpuFabricInfo_t
    _fields_ = [("clusterUuid", ctypes.c_uint8 * 16), ("status", ctypes.c_uint), ("cliqueId", ctypes.c_uint32),
                ("state", ctypes.c_uint)]


class _FabricInfoV2(ctypes.Structure):  # nvmlGpuFabricInfo_v2_t, asked with version nvmlGpuFabricInfo_v2
    _fields_ = [("version", ctypes.c_uint), ("clusterUuid", ctypes.c_uint8 * 16), ("status", ctypes.c_uint),
                ("cliqueId", ctypes.c_uint32), ("state", ctypes.c_uint), ("healthMask", ctypes.c_uint32)]
    VERSION = 0x02000024  # nvmlGpuFabricInfo_v2: the structure's size (36) | 2 << 24


class NvmlUnavailable(Exception):
    """NVML cannot be used on this node (no library, no driver, no answer): the nvidia-smi commands give all."""


class _Nvml:
    """One nvmlInit_v2 .. nvmlShutdown session; every call's failure other than NOT_SUPPORTED is kept in errors."""

    def __init__(self, library: str):
        try:
            self.lib = ctypes.CDLL(library)
        except OSError as exc:
            raise NvmlUnavailable(f"does not load: {exc}") from None
        if not hasattr(self.lib, "nvmlErrorString"):
            raise NvmlUnavailable(f"{library} is not NVML: it has no nvmlErrorString")
        self.lib.nvmlErrorString.restype = ctypes.c_char_p
        self.errors: list[str] = []
        code = self.ask("nvmlInit_v2")
        if code != NVML_SUCCESS:
            raise NvmlUnavailable(f"nvmlInit_v2: {self.error_string(code)}")

    def error_string(self, code: int) -> str:
        if code == NVML_ERROR_FUNCTION_NOT_FOUND:
            return "Function Not Found (13)"
        text = self.lib.nvmlErrorString(code)
        return f"{text.decode(errors='replace') if text else 'unknown error'} ({code})"

    def ask(self, name: str, *args: Any) -> int:
        """The call's nvmlReturn_t; FUNCTION_NOT_FOUND when the library does not export it (an older driver)."""
        function = getattr(self.lib, name, None)
        return NVML_ERROR_FUNCTION_NOT_FOUND if function is None else int(function(*args))

    def get(self, where: str, name: str, *args: Any) -> bool:
        """Whether the call answered; an error other than NOT_SUPPORTED/not offered is kept, naming the call."""
        code = self.ask(name, *args)
        if code not in (NVML_SUCCESS, *NOT_OFFERED):
            self.errors.append(f"{NVML_SOURCE} {name} on {where}: {self.error_string(code)}")
        return code == NVML_SUCCESS

    def text(self, where: str, name: str, *args: Any, size: int = BUFFER_SIZE) -> str | None:
        buffer = ctypes.create_string_buffer(size)
        return buffer.value.decode(errors="replace") if self.get(where, name, *args, buffer, size) else None

    def uint(self, where: str, name: str, *args: Any) -> int | None:
        value = ctypes.c_uint()
        return value.value if self.get(where, name, *args, ctypes.byref(value)) else None

    def shutdown(self) -> None:
        self.ask("nvmlShutdown")


def _word(value: int | None, yes: str, no: str) -> str | None:
    return None if value is None else (yes if value else no)


def _nvml_gpu(nvml: _Nvml, index: int, handle: ctypes.c_void_p, driver: str | None
              ) -> tuple[dict[str, str | None], dict[str, Any]]:
    """One GPU's --query-gpu fields (QUERY_FIELDS, None where NVML does not say) and its "nvlink" entry, in
    nvidia-smi's words."""
    gid = f"GPU{index}"
    gpu = _nvml_row(index, driver)
    gpu["name"] = nvml.text(gid, "nvmlDeviceGetName", handle)
    gpu["uuid"] = nvml.text(gid, "nvmlDeviceGetUUID", handle)
    pci = _PciInfo()
    if nvml.get(gid, "nvmlDeviceGetPciInfo_v3", handle, ctypes.byref(pci)):
        gpu["pci.bus_id"] = pci.busId.decode(errors="replace")
    gpu["persistence_mode"] = _word(nvml.uint(gid, "nvmlDeviceGetPersistenceMode", handle), "Enabled", "Disabled")
    current, pending = ctypes.c_uint(), ctypes.c_uint()
    if nvml.get(gid, "nvmlDeviceGetEccMode", handle, ctypes.byref(current), ctypes.byref(pending)):
        gpu["ecc.mode.current"] = _word(current.value, "Enabled", "Disabled")
    for field, call in (("pcie.link.gen.current", "nvmlDeviceGetCurrPcieLinkGeneration"),
                        ("pcie.link.gen.max", "nvmlDeviceGetMaxPcieLinkGeneration"),
                        ("pcie.link.width.current", "nvmlDeviceGetCurrPcieLinkWidth"),
                        ("pcie.link.width.max", "nvmlDeviceGetMaxPcieLinkWidth")):
        value = nvml.uint(gid, call, handle)
        gpu[field] = None if value is None else str(value)
    utilization = _Utilization()
    if nvml.get(gid, "nvmlDeviceGetUtilizationRates", handle, ctypes.byref(utilization)):
        gpu["utilization.gpu"] = f"{utilization.gpu} %"
    gpu["retired_pages.pending"] = _word(nvml.uint(gid, "nvmlDeviceGetRetiredPagesPendingStatus", handle),
                                         "Yes", "No")
    rows = [ctypes.c_uint() for _ in range(4)]  # correctable, uncorrectable, pending, failure occurred
    if nvml.get(gid, "nvmlDeviceGetRemappedRows", handle, *map(ctypes.byref, rows)):
        gpu["remapped_rows.pending"] = _word(rows[2].value, "Yes", "No")
        gpu["remapped_rows.failure"] = _word(rows[3].value, "Yes", "No")
    gpu.update(_nvml_fabric(nvml, gid, handle))
    return gpu, {"name": gpu["name"], "uuid": gpu["uuid"], **_nvml_links(nvml, gid, handle)}


def _nvml_row(index: int, driver: str | None) -> dict[str, str | None]:
    return {**dict.fromkeys(QUERY_FIELDS), "index": str(index), "driver_version": driver}


def _nvml_fabric(nvml: _Nvml, gid: str, handle: ctypes.c_void_p) -> dict[str, str | None]:
    """fabric.state and, once Completed, fabric.status; nothing on a GPU without an NVSwitch fabric."""
    info: _FabricInfo | _FabricInfoV2 = _FabricInfoV2(version=_FabricInfoV2.VERSION)
    code = nvml.ask("nvmlDeviceGetGpuFabricInfoV", handle, ctypes.byref(info))
    if code in (NVML_ERROR_FUNCTION_NOT_FOUND, NVML_ERROR_ARGUMENT_VERSION_MISMATCH):
        info = _FabricInfo()  # a driver before the versioned call
        if not nvml.get(gid, "nvmlDeviceGetGpuFabricInfo", handle, ctypes.byref(info)):
            return {}
    elif code != NVML_SUCCESS:
        if code not in NOT_OFFERED:
            nvml.errors.append(f"{NVML_SOURCE} nvmlDeviceGetGpuFabricInfoV on {gid}: {nvml.error_string(code)}")
        return {}
    state = FABRIC_STATES.get(info.state)
    if state is None:
        return {}  # NVML_GPU_FABRIC_STATE_NOT_SUPPORTED
    status = None
    if state == "Completed":
        status = "Success" if info.status == NVML_SUCCESS else nvml.error_string(info.status)
    return {"fabric.state": state, "fabric.status": status}


def _nvml_links(nvml: _Nvml, gid: str, handle: ctypes.c_void_p) -> dict[str, Any]:
    """{"links": {link: GB/s, None when inactive}, "version": {link: n}, "remote": {link: PCI bus id},
    "unmeasured": [active links whose speed NVML does not give]} (counted as active, their speed unchecked)."""
    state: dict[int, bool] = {}
    versions: dict[int, int] = {}
    remote: dict[int, str] = {}
    for link in range(NVML_NVLINK_MAX_LINKS):
        active = ctypes.c_uint()
        code = nvml.ask("nvmlDeviceGetNvLinkState", handle, ctypes.c_uint(link), ctypes.byref(active))
        if code != NVML_SUCCESS:
            if code not in (*NOT_OFFERED, NVML_ERROR_INVALID_ARGUMENT):
                nvml.errors.append(f"{NVML_SOURCE} nvmlDeviceGetNvLinkState on {gid} link {link}: "
                                   f"{nvml.error_string(code)}")
            break  # no NVLink (or MIG mode), or past the last link
        state[link] = bool(active.value)
        where = f"{gid} link {link}"
        version = nvml.uint(where, "nvmlDeviceGetNvLinkVersion", handle, ctypes.c_uint(link))
        if version is not None:
            versions[link] = version
        pci = _PciInfo()
        if active.value and nvml.get(where, "nvmlDeviceGetNvLinkRemotePciInfo_v2", handle, ctypes.c_uint(link),
                                     ctypes.byref(pci)):
            remote[link] = pci.busId.decode(errors="replace")
    up = [n for n, active in state.items() if active]
    speeds: dict[int, float] = {}
    if up:
        values = (_FieldValue * len(up))()
        for value, link in zip(values, up, strict=True):
            if link < len(NVLINK_SPEED_FIELDS):
                value.fieldId = NVLINK_SPEED_FIELDS[link]
            else:
                value.fieldId, value.scopeId = NVLINK_GET_SPEED_FIELD, link
        if nvml.get(gid, "nvmlDeviceGetFieldValues", handle, ctypes.c_int(len(values)), values):
            for value, link in zip(values, up, strict=True):
                if value.nvmlReturn == NVML_SUCCESS:
                    # MB/s -> GB/s, as nvidia-smi nvlink --status
                    speeds[link] = value.value.of_type(value.valueType) / 1000
                elif value.nvmlReturn not in NOT_OFFERED:
                    nvml.errors.append(f"{NVML_SOURCE} NVLink speed field {value.fieldId} on {gid} link {link}: "
                                       f"{nvml.error_string(value.nvmlReturn)}")
    links = {n: speeds[n] if active else None for n, active in state.items() if not active or n in speeds}
    return {"links": links, "version": versions, "remote": remote,
            "unmeasured": [n for n in up if n not in speeds]}


def observe_nvml(library: str = NVML_LIBRARY, timeout: float = 120) -> tuple[list[dict[str, Any]],
                                                                               dict[int, dict[str, Any]], list[str]]:
    """This node's GPUs read through NVML: (--query-gpu rows, "nvlink", the errors of single calls).

    NvmlUnavailable when the library does not load, nvmlInit_v2 fails or NVML does not answer within timeout
    seconds (a hung GPU): the reads run in a thread the caller does not wait for beyond that."""
    result: dict[str, Any] = {}

    def read() -> None:
        try:
            nvml = _Nvml(library)
        except NvmlUnavailable as exc:
            result["unavailable"] = str(exc)
            return
        try:
            driver = nvml.text("the system", "nvmlSystemGetDriverVersion", size=80)
            count = nvml.uint("the system", "nvmlDeviceGetCount_v2")
            if count is None:
                raise NvmlUnavailable("nvmlDeviceGetCount_v2: " + (nvml.errors.pop() if nvml.errors else
                                                                   "not supported"))
            rows, nvlink = [], {}
            for index in range(count):
                handle = ctypes.c_void_p()
                if not nvml.get(f"GPU{index}", "nvmlDeviceGetHandleByIndex_v2", ctypes.c_uint(index),
                                ctypes.byref(handle)):
                    rows.append(_nvml_row(index, driver))
                    continue
                row, links = _nvml_gpu(nvml, index, handle, driver)
                rows.append(row)
                nvlink[index] = links
            result["read"] = rows, nvlink, nvml.errors
        except NvmlUnavailable as exc:
            result["unavailable"] = str(exc)
        except Exception as exc:  # a library that misbehaves: nvidia-smi is asked instead
            result["unavailable"] = f"reading NVML failed: {type(exc).__name__}: {exc}"
        finally:
            nvml.shutdown()

    thread = threading.Thread(target=read, name="nvml", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise NvmlUnavailable(f"no answer from NVML within {timeout}s")
    if "unavailable" in result:
        raise NvmlUnavailable(result["unavailable"])
    return result["read"]


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
        unmeasured = status[index].get("unmeasured") or []  # active, speed unknown (NVML)
        gid = f"GPU{index}"
        if inactive:
            out.add("NVLink inactive", gid, "all links up", "links " + ", ".join(map(str, inactive)) + " inactive")
        if want_links and len(active) + len(unmeasured) < want_links:
            out.add("NVLink active links", gid, want_links, len(active) + len(unmeasured))
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
        unread = (observed.get("unread") or {}).get("topology")
        if want_pair and unread and not topo["gpus"]:
            # A live node whose profile asserts the pairs must show them: unknown is not healthy.
            diffs.add("NVLink links per pair", "-", f"NV{want_pair} between every pair", f"not read: {unread}")
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
        if want_links and gpus and not any(s["links"] or s.get("unmeasured") for s in status.values()):
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
        if _enabled(gpu.get("persistence_mode")) is False:
            # A setting, not a fault: the first CUDA call after idle then pays the driver's start-up.
            out.add("persistence mode", gid, "Enabled (nvidia-persistenced)", gpu.get("persistence_mode"), "note")
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
    (None, {}) when none matches: then only the self-consistency checks run. A profile for any model
    (model ".", such as workstation-1) is a site's policy, not a description of hardware: it applies only
    when named."""
    if name != "auto":
        if name not in profiles:
            raise ValueError(f"no GPU profile named {name!r}; known: {', '.join(sorted(profiles))}")
        return name, profiles[name]
    names = sorted({g.get("name") or "?" for g in gpus})
    matches = [n for n, prof in sorted(profiles.items()) if prof.get("model", ".") != "."
               and prof.get("count") == len(gpus) and all(re.search(prof["model"], m) for m in names)]
    return (matches[0], profiles[matches[0]]) if matches else (None, {})


def _lists_gpus(source: str) -> bool:
    """Whether a source names every GPU (NVML, --query-gpu, -q), so that naming none is a finding."""
    return source in (NVML_SOURCE, "nvidia-smi --query-gpu") or Path(source).name in (
        CAPTURE_FILES["query"], CAPTURE_FILES["q"], CAPTURE_FILES["xml"])


def check(observed: dict[str, Any], profile_name: str, profiles: dict[str, dict[str, Any]],
          errors: list[str] | None = None) -> dict[str, Any]:
    """The report: self-consistency findings, plus a profile's differences when one is named or matches.

    errors: what stopped a source from being read (a tool that failed, an NVML call that failed); each is an
    error finding. What a live run could not read ("unread") is a note each.
    """
    findings = _Findings()
    for error in errors or []:
        findings.add("input", "-", "an answer from NVML" if error.startswith(NVML_SOURCE + " ")
                     else "readable nvidia-smi output", error)
    for fact, why in sorted((observed.get("unread") or {}).items()):
        findings.add(fact, "-", "read", f"not read: {why}", "note")
    gpus = observed.get("gpus") or []
    try:
        name, profile = select_profile(profile_name, profiles, gpus)
    except ValueError as exc:
        name, profile = profile_name, {}
        findings.add("profile", "-", ", ".join(sorted(profiles)), str(exc))
    listing = [source for source in observed.get("read") or [] if _lists_gpus(source)]
    if not gpus and listing:
        # NVML or nvidia-smi answered and named no GPU: on a node whose PCI bus has GPUs, the driver lost them.
        findings.add("GPU count", "-", "at least one GPU", f"none listed by {', '.join(listing)}")
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
def _merge(observed: dict[str, Any], rows: list[dict[str, Any]], source: str) -> None:
    """Add readings: the first reading of a GPU is its view, later sources only fill what it lacks."""
    observed["samples"].extend(rows)
    by_index = {g["index"]: g for g in observed["gpus"]}
    for row in rows:
        gpu = by_index.get(row["index"])
        if gpu is None:
            gpu = by_index[row["index"]] = {}
            observed["gpus"].append(gpu)
        for key, value in row.items():
            if key not in gpu or (gpu[key] is None and value is not None):
                gpu[key] = value
                if value is not None:
                    _from(observed, key, source)
    observed["gpus"].sort(key=lambda g: _int(g["index"]) or 0)


def _from(observed: dict[str, Any], fact: str, source: str) -> None:
    sources = observed["sources"].setdefault(fact, [])
    if source not in sources:
        sources.append(source)


def empty_observation() -> dict[str, Any]:
    return {"gpus": [], "samples": [], "topology": None, "nvlink": {}, "dcgm": {}, "read": [], "sources": {},
            "unread": {}}


PARSERS = {"query": parse_query_gpu, "q": parse_query_text, "xml": parse_query_xml, "topo": parse_topo,
           "nvlink": parse_nvlink_status, "dcgm": parse_dcgmi_diag}


def _add(observed: dict[str, Any], kind: str, text: str, source: str) -> None:
    parsed = PARSERS[kind](text, source)
    if kind in ("query", "q", "xml"):
        _merge(observed, parsed, source)
    elif kind == "topo":
        observed["topology"] = parsed
        _from(observed, "topology", source)
    else:
        observed[kind] = parsed
        _from(observed, kind, source)
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
    except OSError as exc:
        return 126, "", f"{argv[0]}: {exc.strerror}"
    except subprocess.TimeoutExpired:
        return 124, "", f"{' '.join(argv)}: timed out after {timeout}s"
    return proc.returncode, proc.stdout, proc.stderr


NVML_MODES = ("auto", "off")


def observe(nvidia_smi: str, dcgmi: str, timeout: int, nvml: str = "auto", nvml_library: str = NVML_LIBRARY
            ) -> tuple[dict[str, Any], list[str]]:
    """Read this node (NVML first with nvml "auto", see the module docstring; "off": nvidia-smi only); return
    the observation and the errors that kept a fact out."""
    if nvml not in NVML_MODES:
        raise ValueError(f"nvml: {nvml!r} is not allowed; allowed values: {', '.join(NVML_MODES)}")
    errors: list[str] = []
    observed = empty_observation()
    via_nvml = False
    if nvml == "auto":
        try:
            rows, links, nvml_errors = observe_nvml(nvml_library, timeout)
        except NvmlUnavailable as exc:
            observed["unread"][NVML_SOURCE] = f"{exc}; nvidia-smi only"
        else:
            via_nvml = True
            _merge(observed, rows, NVML_SOURCE)
            observed["nvlink"] = links
            _from(observed, "nvlink", NVML_SOURCE)
            observed["read"].append(NVML_SOURCE)
            errors += nvml_errors
    commands = [("topo", "nvidia-smi topo -m", [nvidia_smi, "topo", "-m"])]
    if not via_nvml:
        commands = [("query", "nvidia-smi --query-gpu", [nvidia_smi, "--query-gpu=" + ",".join(QUERY_FIELDS),
                                                          "--format=csv"]),
                    *commands, ("nvlink", "nvidia-smi nvlink --status", [nvidia_smi, "nvlink", "--status"])]
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
        if via_nvml and kind == "topo" and rc == 127:
            # NVML gave the rest; GPU pairs and CPU/NUMA affinity stay unchecked, and the report says so.
            observed["unread"]["topology"] = f"{err}: GPU pairs and CPU/NUMA affinity not checked"
            continue
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
        prog="rayrack gpu-check", description="Check one node's GPUs from saved nvidia-smi outputs, or this "
        "node's GPUs live (--live: NVML, nvidia-smi topo -m, dcgmi, as the gpu_validate role reads them).",
        epilog="Reads whichever exist in DIR: " + ", ".join(CAPTURE_FILES.values()) +
        ". Exit codes: 0 consistent, 1 something found, 2 unusable input.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--captures", type=Path, metavar="DIR", help="directory of the outputs")
    source.add_argument("--live", action="store_true", help="read this node's GPUs (NVML first, then nvidia-smi)")
    live = parser.add_argument_group("with --live")
    live.add_argument("--nvml", choices=NVML_MODES, default="auto",
                      help="auto (default): NVML first, nvidia-smi where it does not load; off: nvidia-smi only")
    live.add_argument("--nvidia-smi", default="nvidia-smi", metavar="PATH", help="nvidia-smi executable")
    live.add_argument("--dcgmi", default="dcgmi", metavar="PATH",
                      help="dcgmi executable, run when found (dcgmi diag -r 1); empty disables it")
    live.add_argument("--timeout", type=int, default=120, metavar="SECONDS",
                      help="what each command, and NVML's reads together, may take (default 120)")
    parser.add_argument("--profile", default="auto", metavar="NAME|auto",
                        help="a shipped profile, or auto (default): self-consistency, plus a profile that matches")
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    args = parser.parse_args(argv)
    profiles = load_profiles()
    if args.profile != "auto" and args.profile not in profiles:
        print(f"rayrack gpu-check: --profile {args.profile!r} is not a shipped profile; known: auto, "
              + ", ".join(sorted(profiles)), file=sys.stderr)
        return 2
    errors: list[str] = []
    if args.live:
        observed, errors = observe(args.nvidia_smi, args.dcgmi, args.timeout, args.nvml)
    else:
        try:
            observed = observe_captures(args.captures)
        except CaptureError as exc:
            print(f"rayrack gpu-check: {exc}", file=sys.stderr)
            return 2
    report = check(observed, args.profile, profiles, errors)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        profile = report["profile"] or "none matches (self-consistency only)"
        gpus = report["observed"]["gpus"]
        print(f"{len(gpus)} GPU(s); profile: {profile}; read: " + ", ".join(Path(p).name for p in observed["read"]))
        print(table(report["findings"]) if report["findings"] else "no findings: consistent")
    return 0 if report["ok"] else 1
