"""The wheelhouse identity: one filter makes it, the venv's marker holds it, the same filter reads it back."""

import base64
import json
import sys

from rayrack.inventory import DEFAULTS
from rayrack.status import ray_version_of

from .conftest import FILTERS, REPO, ROLES, load_module, play_with_role_vars, run_play

wh = load_module(FILTERS / "rayrack_wheelhouse.py", "rayrack_wheelhouse_filters")


def identity(requirements=("ray[default]==2.60.0",), **kw):
    args = {"package": "ray", "version": "2.60.0", "python": "3.11", "arch": "x86_64", **kw}
    return wh.rayrack_wheelhouse(list(requirements), **args)


def test_the_identity_holds_version_python_architecture_and_a_lock_hash():
    ident = identity()
    assert set(ident) == {"package", "version", "python", "arch", "lock"}
    assert (ident["version"], ident["python"], ident["arch"], len(ident["lock"])) == ("2.60.0", "3.11", "x86_64", 12)
    assert wh.rayrack_wheelhouse_name(ident) == f"ray-2.60.0-py3.11-x86_64-{ident['lock']}"


def test_the_lock_hash_follows_what_is_installed_not_its_order():
    base = identity(["ray[default]==2.60.0", "torch==2.13.0"])
    assert identity(["torch==2.13.0", "ray[default]==2.60.0"]) == base
    assert identity(["ray[default,train]==2.60.0", "torch==2.13.0"])["lock"] != base["lock"]
    assert identity(["ray[default]==2.60.0", "torch==2.14.0"])["lock"] != base["lock"]
    # A lock file, when there is one, is what the hash covers.
    assert identity(lock_text="ray==2.60.0 --hash=sha256:00")["lock"] != identity()["lock"]


def test_the_marker_reads_back_what_the_venv_tasks_write():
    ident = identity()
    text = json.dumps(ident, indent=4, sort_keys=True) + "\n"  # to_nice_json
    assert wh.rayrack_wheelhouse_marker(text) == ident
    slurped = {"content": base64.b64encode(text.encode()).decode(), "encoding": "base64"}
    assert wh.rayrack_wheelhouse_marker(slurped) == ident


def test_no_marker_or_an_older_kits_marker_is_no_identity():
    assert wh.rayrack_wheelhouse_marker({"failed": True, "msg": "file not found"}) == {}
    assert wh.rayrack_wheelhouse_marker("ray-2.60.0-default-py3.11-x86_64") == {}
    assert wh.rayrack_wheelhouse_marker(json.dumps({"version": "2.60.0"})) == {}
    assert wh.rayrack_wheelhouse_marker(None) == {}
    assert wh.rayrack_wheelhouse_name({}) == "none"


PLAY = play_with_role_vars(["rayrack"], f"""\
    - name: Write the marker as the venv tasks do
      ansible.builtin.copy:
        content: "{{{{ rayrack_ray_wheelhouse | to_nice_json }}}}\\n"
        dest: "{{{{ rayrack_venv_path }}}}/{{{{ rayrack_venv_marker }}}}"
        mode: "0644"
    - name: Read it as the venv tasks and the upgrade plan do
      ansible.builtin.include_tasks: {ROLES}/rayrack/tasks/venv_marker.yml
    - name: Keep what was read and what was wanted
      ansible.builtin.copy:
        content: "{{{{ {{'read': rayrack_venv_installed, 'wanted': rayrack_ray_wheelhouse,
                       'name': rayrack_ray_wheelhouse | rayrack.cluster.rayrack_wheelhouse_name}} | to_json }}}}"
        dest: "{{{{ rayrack_venv_path }}}}/result.json"
        mode: "0644"
""")


def test_the_ray_venv_marker_round_trips_through_ansible_and_the_cli(tmp_path):
    inventory = {"all": {"vars": {"ansible_connection": "local"}, "children": {
        "ray_head": {"hosts": {"head": {"ansible_host": "127.0.0.1", "ansible_python_interpreter": sys.executable}}}}}}
    run_play(tmp_path, inventory, PLAY, {
        "rayrack_venv_path": str(tmp_path), "rayrack_python_version": "3.11",
        "rayrack_python_packages": ["torch==2.13.0"], "ansible_facts": {"architecture": "aarch64"}},
        {})
    result = json.loads((tmp_path / "result.json").read_text())
    version = DEFAULTS["rayrack_ray_version"]
    assert result["read"] == result["wanted"]
    assert result["wanted"] == identity([f"ray[default]=={version}", "torch==2.13.0"], version=version,
                                        arch="aarch64")
    assert result["name"] == f"ray-{version}-py3.11-aarch64-{result['wanted']['lock']}"
    # `rayrack status` reads the same file with the same filter.
    assert ray_version_of((tmp_path / ".rayrack-wheelhouse").read_text()) == version


def test_the_controllers_ray_is_the_nodes_default_ray():
    """The role default is the one place; the controller's pin (its Ray client, the gateway's tests) follows it."""
    pins = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("ray[")]
    assert pins == [f"ray[default,serve]=={DEFAULTS['rayrack_ray_version']}"]
