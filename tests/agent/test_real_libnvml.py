"""The agent against the real libnvidia-ml from Debian's non-free `libnvidia-ml1`, on a host without the driver.

The library loads but NVML init fails. The agent must still start with `gpu.backend: nvml`, keep running, report
the failure as metrics, serve host metrics, and `ray-agent check` must print the error and exit with
EXIT_FAILURE. The failure code is not assumed: the same library is asked directly (ctypes, nvmlInit_v2) in the
same container, and the agent's report must match it.

Runs in a podman container from `localhost/rayrack-nvml-test:12`: the lab node image plus `libnvidia-ml1` and
a venv holding the agent, installed from wheels built on this host (the container needs no PyPI). The image is
built once and reused until its recipe, the base image or the agent's sources change.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import required

from agent.support import metric_lines, sample_value
from ray_agent.cli import EXIT_FAILURE, EXIT_OK
from ray_agent.gpu.base import NVML_ERROR_CODES, NVML_ERROR_NAMES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab"))
import lab as labtool

# The agent's distribution as the roles build it: its shipped files and their wheel.
sys.path.insert(0, str(labtool.REPO / "roles" / "rayrack" / "files"))
import build_wheelhouse
import dist_files

pytestmark = pytest.mark.slow

REPO = labtool.REPO
BASE_IMAGE = labtool.IMAGE
IMAGE = "localhost/rayrack-nvml-test:12"
RECIPE_LABEL = f"{labtool.LABEL}.nvml-test.recipe"
RECIPE_VERSION = "1"
APT_PACKAGES = ["libnvidia-ml1"]
VENV = "/opt/ray-agent"
CONFIG = "/etc/rayrack/agent.yml"
PID_FILE = "/run/ray-agent.pid"
LISTEN = "127.0.0.1:9489"
INTERVAL_SECONDS = 0.2

CONTAINERFILE = f"""\
FROM {{base}}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -qq \\
 && apt-get install -y -qq --no-install-recommends {" ".join(APT_PACKAGES)} \\
 && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY deps/ /tmp/wheels/deps/
RUN python3 -m venv {VENV} \\
 && {VENV}/bin/pip install -q --no-index --no-cache-dir --disable-pip-version-check \\
      --find-links /tmp/wheels/deps /tmp/wheels/deps/*.whl
COPY agent/ /tmp/wheels/agent/
RUN {VENV}/bin/pip install -q --no-index --no-deps --no-cache-dir --disable-pip-version-check \\
      /tmp/wheels/agent/*.whl \\
 && rm -rf /tmp/wheels
LABEL {RECIPE_LABEL}={{digest}}
CMD ["sleep", "infinity"]
"""

# Asks the library itself, bypassing the agent and pynvml: what does nvmlInit_v2 return here?
NVML_PROBE = """\
import ctypes
lib = ctypes.CDLL("libnvidia-ml.so.1")
lib.nvmlErrorString.restype = ctypes.c_char_p
code = lib.nvmlInit_v2()
print(code, lib.nvmlErrorString(code).decode())
"""

# Polls /metrics from inside the container until the agent has published a collection.
FETCH = f"""\
import sys, time, urllib.request
deadline, last = time.monotonic() + 20, None
while time.monotonic() < deadline:
    try:
        body = urllib.request.urlopen("http://{LISTEN}/metrics", timeout=2).read().decode()
        if "rayrack_last_collection_timestamp_seconds" in body:
            sys.stdout.write(body)
            sys.exit(0)
    except OSError as err:
        last = err
    time.sleep(0.1)
sys.exit(f"no metrics from {LISTEN}: {{last}}")
"""

AGENT_CONFIG = f"""\
collection:
  interval: {int(INTERVAL_SECONDS * 1000)}ms
  call_timeout: {int(INTERVAL_SECONDS * 1000)}ms
  backend_retry_interval: {int(INTERVAL_SECONDS * 1000)}ms
gpu:
  backend: nvml
attribution:
  enabled: false
"""


def podman_argv(*args: str) -> list[str]:
    runtime = ["--runtime", "runc"] if labtool.cgroup_hybrid() else []
    return ["podman", *runtime, *args]


def podman(*args: str, input_text: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(podman_argv(*args), input=input_text, capture_output=True, text=True, timeout=timeout)


def image_value(image: str, template: str) -> str | None:
    res = podman("image", "inspect", "--format", template, image)
    return res.stdout.strip() if res.returncode == 0 else None


AGENT = REPO / "packaging" / "ray-agent"


def pinned_dependencies() -> list[str]:
    return list(tomllib.loads((AGENT / "pyproject.toml").read_text())["project"]["dependencies"])


def recipe_digest(base_id: str) -> str:
    h = hashlib.sha256()
    for part in (RECIPE_VERSION, base_id, CONTAINERFILE, *APT_PACKAGES, *pinned_dependencies()):
        h.update(part.encode() + b"\0")
    h.update(dist_files.fingerprint(AGENT).encode() + b"\0")
    return h.hexdigest()[:16]


def checked(res: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    if res.returncode != 0:
        pytest.fail(f"{what} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def container_python(base_id: str) -> str:
    """The base image's CPython as pip's `--python-version` (e.g. 3.11)."""
    res = checked(
        podman("run", "--rm", "--network", "none", base_id, "python3", "-c",
               "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"),
        "reading the base image's Python version",
    )
    return res.stdout.strip()


def build_wheels(base_id: str, context: Path) -> None:
    """The agent's wheel and its pinned dependencies' wheels for the container's CPython, made on this host."""
    build_wheelhouse.build_wheel(AGENT, context / "agent")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    version = container_python(base_id)
    machine = platform.machine()
    checked(
        subprocess.run(
            [*pip, "download", "--only-binary=:all:", "--python-version", version, "--implementation", "cp",
             "--abi", f"cp{version.replace('.', '')}", "--platform", f"manylinux_2_17_{machine}",
             "--platform", f"manylinux2014_{machine}", "--dest", str(context / "deps"), *pinned_dependencies()],
            capture_output=True, text=True, timeout=300,
        ),
        "downloading the agent's dependencies",
    )


def ensure_base_image() -> str:
    cas = labtool.ca_files(Path("/usr/local/share/ca-certificates"))
    if labtool.image_digest() != labtool.recipe_digest(cas):
        if os.geteuid() != 0 or shutil.which("debootstrap") is None:
            required.missing(f"{BASE_IMAGE} needs building, which takes root and debootstrap "
                             "(tests/lab/lab.py host-deps)")
        labtool.build_image(cas)
    base_id = image_value(BASE_IMAGE, "{{.Id}}")
    assert base_id, f"{BASE_IMAGE} missing after building it"
    return base_id


@pytest.fixture(scope="module")
def nvml_image() -> str:
    required.binary("podman", "tests/lab/lab.py host-deps")
    base_id = ensure_base_image()
    digest = recipe_digest(base_id)
    previous = image_value(IMAGE, "{{.Id}}")
    if image_value(IMAGE, "{{ index .Labels \"" + RECIPE_LABEL + "\" }}") == digest:
        return IMAGE
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rayrack-nvml-image-") as tmp:
        context = Path(tmp)
        build_wheels(base_id, context)
        (context / "Containerfile").write_text(CONTAINERFILE.format(base=base_id, digest=digest))
        checked(podman("build", "--layers", "--network", "host", "-f", str(context / "Containerfile"),
                       "-t", IMAGE, str(context), timeout=900), f"podman build {IMAGE}")
    if previous and previous != image_value(IMAGE, "{{.Id}}"):
        # The superseded image; still in use elsewhere is fine, it is then left alone.
        podman("rmi", previous)
    print(f"built {IMAGE} (recipe {digest}) in {time.monotonic() - started:.0f}s")
    return IMAGE


@pytest.fixture
def container(nvml_image: str) -> Iterator[str]:
    name = f"rayrack-nvml-test-{uuid.uuid4().hex[:10]}"
    res = podman("run", "-d", "--rm", "--name", name, "--network", "none", nvml_image)
    try:
        checked(res, "starting the test container (podman host fixes: tests/lab/lab.py host-deps)")
        checked(podman("exec", "-i", name, "sh", "-c", f"mkdir -p {Path(CONFIG).parent} && cat > {CONFIG}",
                       input_text=AGENT_CONFIG), "writing the agent config")
        yield name
    finally:
        podman("rm", "-f", "-t", "0", name)


@dataclass
class RunningAgent:
    process: subprocess.Popen
    stdout: Path
    stderr: Path

    def logs(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()


@pytest.fixture
def agent(container: str, tmp_path: Path) -> Iterator[RunningAgent]:
    out, err = tmp_path / "agent.stdout", tmp_path / "agent.stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            podman_argv("exec", "-e", "PYTHONUNBUFFERED=1", container, "sh", "-c",
                        f"echo $$ > {PID_FILE} && exec {VENV}/bin/ray-agent --config.file {CONFIG} "
                        f"--web.listen-address {LISTEN}"),
            stdout=stdout, stderr=stderr,
        )
    try:
        yield RunningAgent(process, out, err)
    finally:
        if process.poll() is None:
            podman("exec", container, "sh", "-c", f"kill -TERM $(cat {PID_FILE})")
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def fetch_metrics(container: str, agent: RunningAgent) -> str:
    res = podman("exec", container, f"{VENV}/bin/python", "-c", FETCH, timeout=60)
    if res.returncode != 0:
        state = "running" if agent.process.poll() is None else f"exited with {agent.process.returncode}"
        pytest.fail(f"agent ({state}) served no metrics: {res.stderr}\n{agent.logs()}")
    return res.stdout


def direct_init_error(container: str) -> tuple[int, str]:
    res = checked(podman("exec", container, "python3", "-c", NVML_PROBE), "nvmlInit_v2 through ctypes")
    code, text = res.stdout.strip().split(" ", 1)
    return int(code), text


def expected_error(container: str) -> tuple[int, str]:
    """What the real library says here, checked to be a library that loaded and then failed to init."""
    version = checked(podman("exec", container, "dpkg-query", "-W", "-f", "${Version}", "libnvidia-ml1"),
                      "dpkg-query libnvidia-ml1").stdout
    assert version, "libnvidia-ml1 is not installed in the image"
    code, text = direct_init_error(container)
    assert code != 0, f"nvmlInit_v2 succeeded ({text}); this test is about a host without the NVIDIA driver"
    assert code not in (NVML_ERROR_CODES["LIBRARY_NOT_FOUND"], NVML_ERROR_CODES["FUNCTION_NOT_FOUND"]), text
    if not Path("/proc/driver/nvidia").exists():
        # No kernel module on the host: the library must say exactly that.
        assert (code, text) == (NVML_ERROR_CODES["DRIVER_NOT_LOADED"], "Driver Not Loaded"), (code, text)
    return code, NVML_ERROR_NAMES[code]


def test_agent_serves_the_real_nvml_failure_and_keeps_running(container: str, agent: RunningAgent) -> None:
    code, name = expected_error(container)

    first = fetch_metrics(container, agent)
    assert sample_value(first, "rayrack_up") == 1.0, first
    assert sample_value(first, "rayrack_gpu_backend_up", backend="nvml") == 0.0, first
    assert metric_lines(first, "rayrack_gpu_backend_error_info") == [
        f'rayrack_gpu_backend_error_info{{backend="nvml",code="{code}",error="{name}"}} 1.0'
    ], first
    assert metric_lines(first, "rayrack_gpu_backend_info") == [], first
    assert sample_value(first, "rayrack_collector_success", collector="gpu") == 0.0, first
    failures = sample_value(first, "rayrack_gpu_backend_init_failures_total", backend="nvml")
    assert failures is not None and failures >= 1, first
    collected_at = sample_value(first, "rayrack_last_collection_timestamp_seconds")

    time.sleep(6 * INTERVAL_SECONDS)
    assert agent.process.poll() is None, f"agent exited with {agent.process.returncode}:\n{agent.logs()}"
    alive = podman("exec", container, "sh", "-c", f"kill -0 $(cat {PID_FILE})")
    assert alive.returncode == 0, alive.stderr

    later = fetch_metrics(container, agent)
    assert sample_value(later, "rayrack_up") == 1.0, later
    assert sample_value(later, "rayrack_gpu_backend_up", backend="nvml") == 0.0, later
    assert f'code="{code}",error="{name}"' in later
    # Still collecting, and still retrying the library on its schedule rather than giving up or crashing.
    later_collected_at = sample_value(later, "rayrack_last_collection_timestamp_seconds")
    assert collected_at is not None and later_collected_at is not None and later_collected_at > collected_at
    later_failures = sample_value(later, "rayrack_gpu_backend_init_failures_total", backend="nvml")
    assert later_failures is not None and later_failures > failures, (failures, later_failures)
    assert sample_value(later, "rayrack_collector_success", collector="gpu") == 0.0, later

    stop = podman("exec", container, "sh", "-c", f"kill -TERM $(cat {PID_FILE})")
    assert stop.returncode == 0, stop.stderr
    assert agent.process.wait(timeout=20) == EXIT_OK, agent.logs()
    logs = agent.logs()
    assert "Traceback" not in logs, logs
    # Logged when the error first appears, not on every retry.
    assert logs.count(f"GPU backend nvml unavailable: {name}") == 1, logs
    assert "msg=stopped" in logs, logs


def test_check_prints_the_real_nvml_error_and_fails(container: str) -> None:
    code, name = expected_error(container)
    res = podman("exec", container, f"{VENV}/bin/ray-agent", "check", "--config.file", CONFIG,
                 "--web.listen-address", LISTEN)
    assert res.returncode == EXIT_FAILURE, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert f"GPU backend  nvml: DOWN, {name} ({code})" in lines, res.stdout
    # The rest of the check still runs with the GPU backend down.
    assert [line for line in lines if line.startswith("Attribution ")], res.stdout
    assert "Traceback" not in res.stderr, res.stderr
