#!/usr/bin/env python3
"""On a machine with a real GPU: the GPU check's NVML source (rayrack/gpu_check.py, ctypes) against its
nvidia-smi parsers, fact by fact. Both reads are `rayrack gpu-check --live --json`, once with NVML first and once
with --nvml off; every --query-gpu field both give must agree (the PCIe generation and utilisation move with the
load, so they are left out), and so must every GPU's NVLink links and speeds. Exit status: 0 when they agree, 1
when a fact differs or the NVML read did not use NVML, 2 when a read failed. Standard library only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from rayrack.gpu_check import QUERY_FIELDS  # noqa: E402

MOVING = {"pcie.link.gen.current", "utilization.gpu"}


def read(nvml: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "rayrack", "gpu-check", "--live", "--json", "--dcgmi", "",
                           "--nvml", nvml], cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    if proc.returncode not in (0, 1):
        sys.exit(f"gpu-check --live --nvml {nvml} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)["observed"]


def main() -> int:
    nvml, smi = read("auto"), read("off")
    print("NVML read:", nvml["read"], "unread:", nvml["unread"])
    print("nvidia-smi read:", smi["read"], "unread:", smi["unread"])
    problems = [] if "NVML" in nvml["read"] else [f"the NVML read did not use NVML: {nvml['unread']}"]
    for a, b in zip(nvml["gpus"], smi["gpus"], strict=False):
        for field in QUERY_FIELDS:
            left, right = a.get(field), b.get(field)
            status = "same" if left == right else "one side only" if None in (left, right) else "DIFFERS"
            print(f"GPU{a['index']} {field:26} NVML={left!r:40} nvidia-smi={right!r} {status}")
            if status == "DIFFERS" and field not in MOVING:
                problems.append(f"GPU{a['index']} {field}: NVML {left!r}, nvidia-smi {right!r}")
    if len(nvml["gpus"]) != len(smi["gpus"]):
        problems.append(f"{len(nvml['gpus'])} GPUs through NVML, {len(smi['gpus'])} through nvidia-smi")
    for index, entry in sorted(smi["nvlink"].items()):
        theirs = entry["links"]
        ours = (nvml["nvlink"].get(index) or {}).get("links")
        print(f"GPU{index} NVLink: NVML={ours} nvidia-smi={theirs} unmeasured="
              f"{(nvml['nvlink'].get(index) or {}).get('unmeasured')}")
        if ours != theirs:
            problems.append(f"GPU{index} NVLink links: NVML {ours}, nvidia-smi {theirs}")
    print("\n".join(problems) if problems else "NVML and nvidia-smi agree")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
