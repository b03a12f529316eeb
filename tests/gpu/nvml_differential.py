"""The simulated libnvidia-ml.so.1 against a real one: the same pynvml calls made against both, compared by what
they answer (a value, or which NVML error), the value's shape (types, struct fields, list lengths) and whether
it lies in the range NVML documents for it. Prints one table row per mismatch.

    python tests/gpu/nvml_differential.py                 # real (the system's library) vs simulated
    python tests/gpu/nvml_differential.py --sim-only      # the simulated library against the documented ranges
    python tests/gpu/nvml_differential.py --gpm           # GPM support per GPU and one pair of GPM samples

The simulated side is build/nvml-sim/libnvidia-ml.so.1 (`make nvml-sim`) serving --scenario (compiled with
`ray-agent nvml-sim compile`), loaded in a subprocess with LD_LIBRARY_PATH and RAYRACK_NVML_SCENARIO; the real
side runs in a subprocess with build/nvml-sim removed from LD_LIBRARY_PATH. Exit status: 0 when nothing
differs, 1 when something does, 2 when a side could not be probed at all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SIM_DIR = REPO / "build" / "nvml-sim"
MAX_GPUS = 8
GPM_SAMPLE_SECONDS = 0.5
UUID = re.compile(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
BUS_ID = re.compile(r"[0-9A-F]{8}:[0-9A-F]{2}:[0-9A-F]{2}\.[0-9A-F]")


# --- The calls -------------------------------------------------------------------------------------------------
# (name, how to make it on a device handle, the documented range of its answer as a predicate and its words).
# Run in the probing subprocess, where pynvml is imported as `nvml`.
def _calls(nvml) -> list[tuple[str, Callable[[Any], Any], Callable[[Any], bool], str]]:
    def between(low: float, high: float) -> Callable[[Any], bool]:
        return lambda v: low <= v <= high

    def ecc(kind: int, counter: int) -> Callable[[Any], Any]:
        return lambda h: nvml.nvmlDeviceGetTotalEccErrors(h, kind, counter)

    def field(field_id: int) -> Callable[[Any], Any]:
        def read(h: Any) -> Any:
            (value,) = nvml.nvmlDeviceGetFieldValues(h, [field_id])
            if value.nvmlReturn != nvml.NVML_SUCCESS:
                raise nvml.NVMLError(value.nvmlReturn)
            # The union member that the value's type names (nvmlValueType_t).
            member = nvml.c_nvmlValue_t._fields_[value.valueType][0]
            return {"valueType": value.valueType, "value": getattr(value.value, member)}

        return read

    percent = between(0, 100)
    return [
        ("nvmlDeviceGetName", nvml.nvmlDeviceGetName, lambda v: 0 < len(v) < 96, "1..95 characters"),
        ("nvmlDeviceGetUUID", nvml.nvmlDeviceGetUUID, lambda v: bool(UUID.fullmatch(v)), "GPU-<36 hex and dashes>"),
        ("nvmlDeviceGetPciInfo", nvml.nvmlDeviceGetPciInfo, lambda v: bool(BUS_ID.fullmatch(v["busId"])),
         "busId DDDDDDDD:BB:DD.F"),
        ("nvmlDeviceGetMemoryInfo", nvml.nvmlDeviceGetMemoryInfo,
         lambda v: 0 <= v["used"] <= v["total"] and v["free"] <= v["total"], "used, free <= total"),
        ("nvmlDeviceGetMemoryInfo_v2", lambda h: nvml.nvmlDeviceGetMemoryInfo(h, nvml.nvmlMemory_v2),
         lambda v: 0 <= v["used"] + v["reserved"] <= v["total"], "used + reserved <= total"),
        ("nvmlDeviceGetUtilizationRates", nvml.nvmlDeviceGetUtilizationRates,
         lambda v: percent(v["gpu"]) and percent(v["memory"]), "gpu, memory 0..100"),
        ("nvmlDeviceGetPowerUsage", nvml.nvmlDeviceGetPowerUsage, between(0, 2_000_000), "0..2 000 000 mW"),
        ("nvmlDeviceGetEnforcedPowerLimit", nvml.nvmlDeviceGetEnforcedPowerLimit, between(1, 2_000_000),
         "1..2 000 000 mW"),
        ("nvmlDeviceGetTotalEnergyConsumption", nvml.nvmlDeviceGetTotalEnergyConsumption, between(0, 2**63),
         ">= 0 mJ"),
        ("nvmlDeviceGetTemperature(GPU)", lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
         between(0, 130), "0..130 C"),
        ("nvmlDeviceGetFieldValues(MEMORY_TEMP)", field(nvml.NVML_FI_DEV_MEMORY_TEMP),
         lambda v: 0 <= v["value"] <= 130, "0..130 C"),
        ("nvmlDeviceGetClockInfo(SM)", lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
         between(0, 5000), "0..5000 MHz"),
        ("nvmlDeviceGetClockInfo(MEM)", lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM),
         between(0, 20000), "0..20000 MHz"),
        ("nvmlDeviceGetEccMode", nvml.nvmlDeviceGetEccMode, lambda v: set(v) <= {0, 1} and len(v) == 2,
         "[current, pending], each 0 or 1"),
        ("nvmlDeviceGetTotalEccErrors(uncorrected, volatile)",
         ecc(nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC), between(0, 2**63), ">= 0"),
        ("nvmlDeviceGetTotalEccErrors(corrected, aggregate)",
         ecc(nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_AGGREGATE_ECC), between(0, 2**63), ">= 0"),
        ("nvmlDeviceGetRemappedRows", nvml.nvmlDeviceGetRemappedRows,
         lambda v: len(v) == 4 and min(v[:2]) >= 0 and set(v[2:]) <= {0, 1},
         "(correctable, uncorrectable, pending 0/1, failure 0/1)"),
        ("nvmlDeviceGetRetiredPagesPendingStatus", nvml.nvmlDeviceGetRetiredPagesPendingStatus,
         lambda v: v in (0, 1), "0 or 1"),
        ("nvmlDeviceGetCurrentClocksEventReasons", nvml.nvmlDeviceGetCurrentClocksEventReasons,
         between(0, 2**64 - 1), "a bitmask"),
        ("nvmlDeviceGetPcieThroughput(TX)",
         lambda h: nvml.nvmlDeviceGetPcieThroughput(h, nvml.NVML_PCIE_UTIL_TX_BYTES), between(0, 2**32),
         ">= 0 KB/s"),
        ("nvmlDeviceGetPcieReplayCounter", nvml.nvmlDeviceGetPcieReplayCounter, between(0, 2**32), ">= 0"),
        ("nvmlDeviceGetEncoderUtilization", nvml.nvmlDeviceGetEncoderUtilization,
         lambda v: percent(v[0]) and v[1] >= 0, "[0..100, period us]"),
        ("nvmlDeviceGetDecoderUtilization", nvml.nvmlDeviceGetDecoderUtilization,
         lambda v: percent(v[0]) and v[1] >= 0, "[0..100, period us]"),
        ("nvmlDeviceGetFanSpeed", nvml.nvmlDeviceGetFanSpeed, percent, "0..100 %"),
        ("nvmlDeviceGetPersistenceMode", nvml.nvmlDeviceGetPersistenceMode, lambda v: v in (0, 1), "0 or 1"),
        ("nvmlDeviceGetMigMode", nvml.nvmlDeviceGetMigMode, lambda v: set(v) <= {0, 1}, "[current, pending] 0/1"),
        ("nvmlDeviceGetComputeRunningProcesses", nvml.nvmlDeviceGetComputeRunningProcesses,
         lambda v: all(p["pid"] > 0 for p in v), "pids > 0"),
        ("nvmlDeviceGetNvLinkState(0)", lambda h: nvml.nvmlDeviceGetNvLinkState(h, 0), lambda v: v in (0, 1),
         "0 or 1"),
        ("nvmlGpmQueryDeviceSupport", lambda h: nvml.nvmlGpmQueryDeviceSupport(h),
         lambda v: v["isSupportedDevice"] in (0, 1), "isSupportedDevice 0 or 1"),
    ]


# --- Probing (in a subprocess, against whichever libnvidia-ml.so.1 it loads) ---------------------------------
def _plain(value: Any) -> Any:
    """A pynvml answer as JSON: structs as their fields, bytes as text."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    if hasattr(value, "_fields_"):
        return {name: _plain(getattr(value, name)) for name, *_ in value._fields_ if not name.startswith("_")}
    if type(value).__name__ == "nvmlFriendlyObject":  # pynvml's process entries
        return {name: _plain(v) for name, v in sorted(vars(value).items())}
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return repr(value)


def _answer(nvml, call: Callable[[], Any], in_range: Callable[[Any], bool] | None = None) -> dict:
    try:
        value = _plain(call())
    except nvml.NVMLError as err:
        return {"error": _error_name(nvml, err)}
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    answer: dict[str, Any] = {"value": value, "shape": shape(value)}
    if in_range is not None:
        try:
            answer["in_range"] = bool(in_range(value))
        except (TypeError, KeyError, IndexError, ValueError):
            answer["in_range"] = False
    return answer


def _error_name(nvml, err: Exception) -> str:
    code = getattr(err, "value", None)
    for name in dir(nvml):
        if name.startswith("NVML_ERROR_") and getattr(nvml, name) == code:
            return name.removeprefix("NVML_ERROR_")
    return type(err).__name__


def shape(value: Any) -> str:
    """Types of a JSON value, struct fields by name: `int`, `[int, int]`, `{total: int, used: int}`."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {shape(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, list):
        kinds = sorted({shape(v) for v in value})
        return "[" + ", ".join(kinds) + "]"
    return "bool" if isinstance(value, bool) else type(value).__name__


def probe() -> dict:
    import pynvml as nvml

    try:
        nvml.nvmlInit()
    except nvml.NVMLError as err:
        return {"init": _error_name(nvml, err)}
    try:
        system = {
            "nvmlSystemGetDriverVersion": _answer(nvml, nvml.nvmlSystemGetDriverVersion),
            "nvmlSystemGetNVMLVersion": _answer(nvml, nvml.nvmlSystemGetNVMLVersion),
            "nvmlSystemGetCudaDriverVersion": _answer(nvml, nvml.nvmlSystemGetCudaDriverVersion),
        }
        count = nvml.nvmlDeviceGetCount()
        gpus = []
        for index in range(min(count, MAX_GPUS)):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append({name: _answer(nvml, lambda c=call, h=handle: c(h), in_range)
                         for name, call, in_range, _ in _calls(nvml)})
        return {"init": "SUCCESS", "count": count, "system": system, "gpus": gpus}
    finally:
        nvml.nvmlShutdown()


def gpm() -> dict:
    """Per GPU: GPM support, and SM activity and occupancy (percent) from two samples GPM_SAMPLE_SECONDS apart."""
    import pynvml as nvml

    try:
        nvml.nvmlInit()
    except nvml.NVMLError as err:
        return {"init": _error_name(nvml, err)}
    try:
        result = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            support = _answer(nvml, lambda h=handle: nvml.nvmlGpmQueryDeviceSupport(h))
            entry: dict[str, Any] = {"gpu": index, "support": support}
            if entry["support"].get("value", {}).get("isSupportedDevice") == 1:
                entry["metrics"] = _answer(nvml, lambda h=handle: _gpm_pair(nvml, h))
            result.append(entry)
        return {"init": "SUCCESS", "gpus": result}
    finally:
        nvml.nvmlShutdown()


def _gpm_pair(nvml, handle: Any) -> dict:
    first, second = nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()
    try:
        nvml.nvmlGpmSampleGet(handle, first)
        time.sleep(GPM_SAMPLE_SECONDS)
        nvml.nvmlGpmSampleGet(handle, second)
        request = nvml.c_nvmlGpmMetricsGet_t()
        request.version = nvml.NVML_GPM_METRICS_GET_VERSION
        request.sample1, request.sample2 = first, second
        wanted = {"sm_active_percent": nvml.NVML_GPM_METRIC_SM_UTIL,
                  "sm_occupancy_percent": nvml.NVML_GPM_METRIC_SM_OCCUPANCY,
                  "graphics_active_percent": nvml.NVML_GPM_METRIC_GRAPHICS_UTIL,
                  "tensor_active_percent": nvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL,
                  "dram_active_percent": nvml.NVML_GPM_METRIC_DRAM_BW_UTIL}
        request.numMetrics = len(wanted)
        for slot, metric in enumerate(wanted.values()):
            request.metrics[slot].metricId = metric
        nvml.nvmlGpmMetricsGet(request)
        return {name: (request.metrics[slot].value if request.metrics[slot].nvmlReturn == nvml.NVML_SUCCESS
                       else _error_name(nvml, nvml.NVMLError(request.metrics[slot].nvmlReturn)))
                for slot, name in enumerate(wanted)}
    finally:
        nvml.nvmlGpmSampleFree(first)
        nvml.nvmlGpmSampleFree(second)


# --- Comparing -----------------------------------------------------------------------------------------------
def _status(answer: dict) -> str:
    return answer.get("error", "SUCCESS")


def mismatches(real: dict | None, sim: dict) -> list[tuple[str, str, str, str, str]]:
    """(call, gpu, real, simulated, what differs) for every difference; with no real side, the simulated
    answers against the documented ranges alone."""
    rows: list[tuple[str, str, str, str, str]] = []
    if real is not None and (real.get("init") != "SUCCESS" or sim.get("init") != "SUCCESS"):
        return [("nvmlInit", "-", str(real.get("init")), str(sim.get("init")), "init")]
    sides = {"sim": sim} if real is None else {"real": real, "sim": sim}
    for side, probed in sides.items():
        for index, gpu in enumerate(probed["gpus"]):
            for call, answer in gpu.items():
                if answer.get("in_range") is False:
                    shown = json.dumps(answer["value"])[:60]
                    rows.append((call, str(index), shown if side == "real" else "", shown if side == "sim" else "",
                                 "out of range"))
    if real is None:
        return rows
    for name in sorted(set(real["system"]) | set(sim["system"])):
        rows += _compare(name, "-", real["system"].get(name, {"error": "absent"}),
                         sim["system"].get(name, {"error": "absent"}))
    for index in range(min(len(real["gpus"]), len(sim["gpus"]))):
        for call in real["gpus"][index]:
            rows += _compare(call, str(index), real["gpus"][index][call], sim["gpus"][index].get(call, {}))
    return rows


def _compare(call: str, gpu: str, real: dict, sim: dict) -> list[tuple[str, str, str, str, str]]:
    if _status(real) != _status(sim):
        return [(call, gpu, _status(real), _status(sim), "answer")]
    # An empty list (no processes) says nothing of its entries' types.
    if "shape" in real and real["shape"] != sim.get("shape") and "[]" not in (real["shape"], sim.get("shape")):
        return [(call, gpu, real["shape"][:60], str(sim.get("shape"))[:60], "type")]
    return []


def table(rows: list[tuple[str, str, str, str, str]]) -> str:
    header = ("call", "gpu", "real", "simulated", "differs in")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- Running the sides ---------------------------------------------------------------------------------------
def _run_side(mode: str, env: dict[str, str], timeout: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, f"--{mode}-here"], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"probe exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def real_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p and Path(p).resolve() != SIM_DIR.resolve()]
    env["LD_LIBRARY_PATH"] = ":".join(paths)
    env.pop("RAYRACK_NVML_SCENARIO", None)
    return env


def sim_env(config: Path) -> dict[str, str]:
    library = SIM_DIR / "libnvidia-ml.so.1"
    if not library.exists():
        raise RuntimeError(f"{library} is missing: run `make nvml-sim`")
    return {**os.environ, "LD_LIBRARY_PATH": str(SIM_DIR), "RAYRACK_NVML_SCENARIO": str(config)}


def compile_scenario(scenario: str, out: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ray_agent.cli", "nvml-sim", "compile", scenario, str(out)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])},
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {scenario}: {proc.stderr.strip()}")


def report_gpm(result: dict, json_path: Path | None) -> int:
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
    if result.get("init") != "SUCCESS":
        print(f"nvml_differential: the library did not initialise: {result.get('init')}", file=sys.stderr)
        return 2
    for entry in result["gpus"]:
        support, metrics = entry["support"], entry.get("metrics")
        print(f"GPU {entry['gpu']}: GPM support {json.dumps(support.get('value', support))}; "
              f"samples {json.dumps(metrics.get('value', metrics)) if metrics else 'not taken'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sim-only", action="store_true", help="only the simulated library, against the ranges")
    parser.add_argument("--gpm", action="store_true",
                        help="GPM support and one pair of samples per GPU (of the real library, or with --sim-only "
                             "of the simulated one)")
    parser.add_argument("--scenario", default="builtin:demo-8gpu", help="scenario the simulated library serves")
    parser.add_argument("--json", type=Path, help="also write both sides' answers and the mismatches here")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds each side may take")
    parser.add_argument("--probe-here", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gpm-here", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_here or args.gpm_here:
        print(json.dumps(probe() if args.probe_here else gpm()))
        return 0
    try:
        with tempfile.TemporaryDirectory(prefix="nvml-differential-") as tmp:
            config = Path(tmp) / "sim.conf"
            compile_scenario(args.scenario, config)
            if args.gpm:
                return report_gpm(_run_side("gpm", sim_env(config) if args.sim_only else real_env(), args.timeout),
                                  args.json)
            sim = _run_side("probe", sim_env(config), args.timeout)
        real = None if args.sim_only else _run_side("probe", real_env(), args.timeout)
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as err:
        print(f"nvml_differential: {err}", file=sys.stderr)
        return 2
    for side, probed in (("simulated", sim), ("real", real)):
        if probed is not None and probed.get("init") != "SUCCESS":
            print(f"nvml_differential: the {side} library did not initialise: {probed.get('init')}", file=sys.stderr)
            return 2
    rows = mismatches(real, sim)
    calls = len(sim["gpus"][0]) if sim["gpus"] else 0
    sides = "simulated" if real is None else f"real ({real['count']} GPUs) vs simulated"
    print(f"{sides} ({sim['count']} GPUs, {args.scenario}): {calls} calls per GPU, {len(rows)} mismatches")
    if rows:
        print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"real": real, "sim": sim, "mismatches": rows}, indent=2))
    return 1 if rows else 0


if __name__ == "__main__":
    sys.exit(main())
