"""Two distributions: the node agent's wheel (all that nodes install) and the controller's rayrack, which depends
on it. The agent's fingerprint covers exactly the files its wheel ships."""

import email.parser
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO, ROLES, load_module, play_with_role_vars, run_play

FILES = ROLES / "rayrack" / "files"
AGENT = REPO / "packaging" / "ray-agent"
sys.path.insert(0, str(FILES))  # build_wheelhouse.py imports dist_files.py from beside it, as when run
dist_files = load_module(FILES / "dist_files.py", "dist_files")
build_wheelhouse = load_module(FILES / "build_wheelhouse.py", "build_wheelhouse")


def wheel_contents(wheel: Path) -> tuple[set[str], dict[str, list[str]], str]:
    """(the files outside .dist-info, METADATA's headers, entry_points.txt)."""
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        (info,) = {name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info")}
        headers = email.parser.Parser().parsestr(whl.read(f"{info}/METADATA").decode())
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    metadata: dict[str, list[str]] = {}
    for key, value in headers.items():
        metadata.setdefault(key, []).append(value)
    return {name for name in names if not name.split("/")[0].endswith(".dist-info")}, metadata, entry_points


@pytest.fixture(scope="module")
def agent_wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("agent-wheel")
    build_wheelhouse.build_wheel(AGENT, out)
    (wheel,) = out.glob("*.whl")
    return wheel


def test_the_agent_wheel_ships_exactly_the_fingerprinted_files(agent_wheel):
    files, metadata, entry_points = wheel_contents(agent_wheel)
    assert files == set(dist_files.shipped(AGENT)) - {"pyproject.toml"}
    assert {name.split("/")[0] for name in files} == {"ray_agent"}
    assert "ray_agent/gpu/scenarios/lab-2gpu.yml" in files
    # The simulator's C source lives in the package's tree but nodes get it from the nvml_sim role, not the wheel.
    assert not any(name.startswith("ray_agent/gpu/nvml_sim/") and not name.endswith(".py") for name in files)
    assert metadata["Name"] == ["ray-agent"]
    assert metadata["Provides-Extra"] == ["gateway"]
    assert any(req.startswith("aiohttp") and "extra == \"gateway\"" in req for req in metadata["Requires-Dist"])
    assert "ray-agent = ray_agent.cli:main" in entry_points
    assert "rayrack-gateway = ray_agent.gateway.cli:main" in entry_points
    assert "rayrack =" not in entry_points


def test_the_controller_distribution_is_the_cli_and_monitoring_and_needs_the_agent(tmp_path):
    # Built from a copy: a build writes its build/ and egg-info beside the pyproject.
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    for package in ("rayrack", "monitoring"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", "wheel", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(tmp_path / "out"), str(source)], check=True)
    (wheel,) = (tmp_path / "out").glob("*.whl")
    files, metadata, entry_points = wheel_contents(wheel)
    assert {name.split("/")[0] for name in files} == {"rayrack", "monitoring"}
    assert {"rayrack/cli.py", "rayrack/gpu_profiles.json", "monitoring/grafana/sync.py"} <= files
    assert any(name.startswith("monitoring/grafana/dashboards/") and name.endswith(".json") for name in files)
    assert metadata["Name"] == ["rayrack"]
    assert "ray-agent" in metadata["Requires-Dist"]
    assert entry_points.split("[console_scripts]")[1].split() == ["rayrack", "=", "rayrack.cli:main"]


def copy_agent(tmp_path: Path) -> Path:
    """The agent's project and the rest of the tree beside it, as files (no link), to change them."""
    project = tmp_path / "ray-agent"
    project.mkdir()
    shutil.copy(AGENT / "pyproject.toml", project)
    shutil.copytree(REPO / "ray_agent", project / "ray_agent", ignore=shutil.ignore_patterns("__pycache__"))
    return project


def test_the_fingerprint_follows_shipped_files_and_nothing_else(tmp_path):
    project = copy_agent(tmp_path)
    base = dist_files.fingerprint(project)
    assert base == dist_files.fingerprint(AGENT)
    assert len(base) == 12
    # Not shipped: the simulator's C source, a README, byte code, a stray file.
    (project / "ray_agent" / "gpu" / "nvml_sim" / "nvml_sim.c").write_text("/* changed */\n")
    (project / "ray_agent" / "__pycache__").mkdir()
    (project / "ray_agent" / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"\0")
    (project / "ray_agent" / "notes.txt").write_text("draft\n")
    assert dist_files.fingerprint(project) == base
    # Shipped: a module, a scenario, the metadata.
    for name in ("ray_agent/units.py", "ray_agent/gpu/scenarios/lab-2gpu.yml", "pyproject.toml"):
        path = project / name
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        assert dist_files.fingerprint(project) != base, name
        path.write_bytes(original)
    (project / "ray_agent" / "extra.py").write_text("")
    assert dist_files.fingerprint(project) != base


def test_a_selection_the_fingerprint_cannot_follow_is_refused(tmp_path):
    project = copy_agent(tmp_path)
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text()
    pyproject.write_text(text.replace("include-package-data = false", "include-package-data = true"))
    with pytest.raises(dist_files.ProjectError, match="include-package-data = false"):
        dist_files.shipped(project)
    pyproject.write_text(text.replace("[tool.setuptools]\n", "[tool.setuptools]\npy-modules = [\"extra\"]\n"))
    with pytest.raises(dist_files.ProjectError, match=r"tool\.setuptools\.py-modules is not supported"):
        dist_files.shipped(project)


PLAY = play_with_role_vars(["rayrack"], """\
    - name: Keep the agent's source and fingerprint as the roles see them
      ansible.builtin.copy:
        content: "{{ {'source': rayrack_agent_source, 'hash': rayrack_agent_source_hash} | to_json }}"
        dest: "{{ out }}"
        mode: "0644"
""")


def test_the_roles_fingerprint_is_the_scripts(tmp_path):
    inventory = {"all": {"hosts": {"localhost": {"ansible_connection": "local",
                                                 "ansible_python_interpreter": sys.executable}}}}
    # role_path as in the roles that install the wheel (the vars are read lazily, in the role that uses them).
    run_play(tmp_path, inventory, PLAY, {"out": str(tmp_path / "out.json"), "role_path": str(ROLES / "ray_agent")}, {})
    seen = json.loads((tmp_path / "out.json").read_text())
    assert Path(seen["source"]).resolve() == AGENT.resolve()
    assert seen["hash"] == dist_files.fingerprint(AGENT)
