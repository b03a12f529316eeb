"""Running a small Python script on a node over SSH, as Ansible would reach it, and reading its JSON answer.

The script runs with the node's system python3 as the SSH user (no sudo) and prints one line
``RAYRACK-PROBE <json>``; anything secret it needs arrives on stdin, never on a command line.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Sequence
from typing import Any

from rayrack.inventory import Host

MARKER = "RAYRACK-PROBE "


def quote(text: str) -> str:
    return shlex.quote(text) if text else "''"


def run_python(host: Host, script: str, args: Sequence[str] = (), input_text: str = "",
               timeout: float = 60) -> dict[str, Any]:
    """The script's answer, or {"error": why} when SSH, the script or the node did not answer."""
    remote = " ".join(["python3", "-c", quote(script), *(quote(str(a)) for a in args)])
    try:
        result = subprocess.run(host.ssh_command(remote), input=input_text, capture_output=True, text=True,
                                timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer in {timeout:g}s"}
    for line in result.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line.removeprefix(MARKER))
    return {"error": (result.stderr.strip().splitlines() or [f"ssh exited {result.returncode}"])[-1]}
