#!/usr/bin/python3
"""Ansible module: check a node's GPUs for self-consistency and against an expected profile, from NVML and
nvidia-smi (and dcgmi when present).

The parsers and checks are plugins/module_utils/rayrack_gpu_check.py (rayrack/gpu_check.py, also behind
`rayrack gpu-check`); this module only runs them, writes the JSON report and turns error findings into a failed
task with a readable table.
"""

from __future__ import annotations

import json
import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.rayrack.cluster.plugins.module_utils.rayrack_gpu_check import (
    NVML_MODES,
    check,
    empty_observation,
    observe,
    table,
)

DOCUMENTATION = r"""
module: gpu_validate
short_description: Check a node's NVIDIA GPUs, NVLink topology and health for consistency and against a profile
description:
  - Reads the GPUs through NVML (C(libnvidia-ml.so.1)) where it loads and initialises, and the GPU-pair topology
    and CPU/NUMA affinity from C(nvidia-smi topo -m); without NVML (or with O(nvml=off)) runs
    C(nvidia-smi --query-gpu), C(nvidia-smi topo -m) and C(nvidia-smi nvlink --status). Runs C(dcgmi diag -r 1)
    when C(dcgmi) is found. Checks that the node is consistent with itself (one model, even
    NVLink, PCIe links at their top width, ECC on data-centre GPUs, no pending remaps, fabric registered) and
    compares against O(profile).
  - Fails with a table of every error finding; writes a JSON report either way when O(report_path) is set. The
    report's C(observed.sources) names where each fact came from (C(NVML) or the nvidia-smi command),
    C(observed.unread) what could not be read (a note each, such as the topology where nvidia-smi is absent).
options:
  profile:
    description:
      - Name of the expected profile in O(profiles), or C(auto) for the profile whose C(model) pattern matches the
        GPUs found and whose C(count) equals their number; with none matching only the self-consistency checks
        run.
    type: str
    default: auto
  profiles:
    description: Profiles by name; each holds count, model, nvlink, pcie, ecc, persistence, driver_version.
    type: dict
    required: true
  nvml:
    description:
      - C(auto) reads NVML first and falls back to nvidia-smi where NVML does not load or initialise; C(off) uses
        nvidia-smi only.
    type: str
    choices: [auto, "off"]
    default: auto
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
    description: Seconds each command may take, and NVML's reads together.
    type: int
    default: 120
"""

# Readings that follow the load (utilisation, the PCIe link as trained now): a report differing only in these
# is the same report, so a re-run on a busy node changes nothing and the file keeps the earlier readings.
LOAD_READINGS = ("utilization.gpu", "pcie.link.gen.current", "pcie.link.width.current")


def steady(report: dict) -> dict:
    """The report without the readings that follow the load."""
    observed = dict(report.get("observed") or {})
    observed["gpus"] = [{k: v for k, v in gpu.items() if k not in LOAD_READINGS} for gpu in observed.get("gpus") or []]
    observed.pop("samples", None)
    return dict(report, observed=observed)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "profile": {"type": "str", "default": "auto"},
            "profiles": {"type": "dict", "required": True},
            "nvml": {"type": "str", "choices": list(NVML_MODES), "default": "auto"},
            "nvidia_smi": {"type": "str", "default": "nvidia-smi"},
            "dcgmi": {"type": "str", "default": "dcgmi"},
            "report_path": {"type": "path"},
            "timeout": {"type": "int", "default": 120},
        },
        supports_check_mode=True,
    )
    p = module.params
    try:
        observed, errors = observe(p["nvidia_smi"], p["dcgmi"], p["timeout"], p["nvml"])
        report = check(observed, p["profile"], p["profiles"], errors)
    except Exception as exc:  # whatever went wrong, the report is written and names it
        report = check(empty_observation(), p["profile"], p["profiles"],
                       [f"checking the outputs failed: {type(exc).__name__}: {exc}"])
    differences = [f for f in report["findings"] if f["severity"] == "error"]
    changed = False
    if p["report_path"]:
        text = json.dumps(report, indent=2, sort_keys=True) + "\n"
        try:
            with open(p["report_path"], encoding="utf-8") as fh:
                # Both as JSON has them (tuples are lists there).
                changed = steady(json.load(fh)) != steady(json.loads(text))
        except (OSError, ValueError):
            changed = True
        if changed and not module.check_mode:
            os.makedirs(os.path.dirname(p["report_path"]) or ".", exist_ok=True)
            with open(p["report_path"], "w", encoding="utf-8") as fh:
                fh.write(text)
    result = {"changed": changed, "report": report, "differences": differences,
              "driver_versions": report["driver_versions"]}
    if differences:
        module.fail_json(msg=f"{len(differences)} difference(s) from the expected GPU profile or within the node:\n"
                         f"{table(report['findings'])}", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
