"""Building the simulated libnvidia-ml and running NVML clients against it in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import yaml

from ray_agent.gpu.fake import parse_scenario
from ray_agent.gpu.nvml_sim.compiler import compile_scenario

REPO = Path(__file__).resolve().parents[2]
LIBRARY = REPO / "build" / "nvml-sim" / "libnvidia-ml.so.1"


def build_library() -> Path:
    """`make nvml-sim`: the same build the lab and the benchmark use."""
    result = subprocess.run(
        ["make", "--no-print-directory", "nvml-sim"], cwd=REPO, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"make nvml-sim failed:\n{result.stdout}\n{result.stderr}")
    return LIBRARY


def write_config(path: Path, scenario: dict[str, Any] | str, scenario_time: float = 0.0) -> float:
    """Compile `scenario` into `path` so that scenario time is `scenario_time` now; returns the epoch."""
    text = scenario if isinstance(scenario, str) else yaml.safe_dump(scenario)
    epoch = time.time() - scenario_time
    path.write_text(compile_scenario(parse_scenario(text, str(path)), epoch), encoding="utf-8")
    return epoch


def client_env(config: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(LIBRARY.parent)
    env["RAYRACK_NVML_SCENARIO"] = str(config)
    return env


def run_client(config: Path, body: str, timeout: float = 60.0) -> Any:
    """Run `body` (Python using pynvml) against the library; it leaves its answer in `result`, sent as JSON."""
    code = "import json, sys, time\nimport pynvml\nresult = None\n" + textwrap.dedent(body)
    code += "\nprint('RESULT ' + json.dumps(result))\n"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=client_env(config),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"client failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))
