"""The status table's pure parts: agent metrics -> GPU states, Ray's node list, the run record."""

import json
from datetime import UTC, datetime
from pathlib import Path

import yaml

from ray_agent.gpu_state import GpuState
from rayrack.inventory import ROLES, parse_listing
from rayrack.records import read_record, write_record
from rayrack.status import (
    COLUMN_OF_STATE,
    GPU_STATES,
    build_rows,
    describe_run,
    gpu_states,
    ray_states,
    ray_version_of,
    render,
)

METRICS = """\
# HELP rayrack_up 1 when the agent has a current collection.
# TYPE rayrack_up gauge
rayrack_up 1.0
# TYPE rayrack_agent_info gauge
rayrack_agent_info{version="0.1.0"} 1.0
# TYPE rayrack_gpu_up gauge
rayrack_gpu_up{gpu="0",uuid="GPU-a"} 1.0
rayrack_gpu_up{gpu="1",uuid="GPU-b"} 1.0
rayrack_gpu_up{gpu="2",uuid="GPU-c"} 1.0
rayrack_gpu_up{gpu="3",uuid="GPU-d"} 0.0
# TYPE rayrack_gpu_info gauge
rayrack_gpu_info{gpu="0",uuid="GPU-a",model="NVIDIA A100",driver_version="550.54.15",pci_bus_id="0"} 1.0
# TYPE rayrack_gpu_processes gauge
rayrack_gpu_processes{gpu="0",uuid="GPU-a"} 1.0
rayrack_gpu_processes{gpu="1",uuid="GPU-b"} 2.0
rayrack_gpu_processes{gpu="2",uuid="GPU-c"} 0.0
# TYPE rayrack_gpu_utilization_ratio gauge
rayrack_gpu_utilization_ratio{gpu="0",uuid="GPU-a"} 0.93
rayrack_gpu_utilization_ratio{gpu="1",uuid="GPU-b"} 0.0
rayrack_gpu_utilization_ratio{gpu="2",uuid="GPU-c"} 0.0
"""
# The agent's state of each GPU: busy, idle_held, free, lost.
STATES = """\
# TYPE rayrack_gpu_state gauge
rayrack_gpu_state{gpu="0",uuid="GPU-a",state="busy"} 1.0
rayrack_gpu_state{gpu="0",uuid="GPU-a",state="idle_held"} 0.0
rayrack_gpu_state{gpu="0",uuid="GPU-a",state="free"} 0.0
rayrack_gpu_state{gpu="0",uuid="GPU-a",state="unknown"} 0.0
rayrack_gpu_state{gpu="0",uuid="GPU-a",state="lost"} 0.0
rayrack_gpu_state{gpu="1",uuid="GPU-b",state="busy"} 0.0
rayrack_gpu_state{gpu="1",uuid="GPU-b",state="idle_held"} 1.0
rayrack_gpu_state{gpu="1",uuid="GPU-b",state="free"} 0.0
rayrack_gpu_state{gpu="1",uuid="GPU-b",state="unknown"} 0.0
rayrack_gpu_state{gpu="1",uuid="GPU-b",state="lost"} 0.0
rayrack_gpu_state{gpu="2",uuid="GPU-c",state="busy"} 0.0
rayrack_gpu_state{gpu="2",uuid="GPU-c",state="idle_held"} 0.0
rayrack_gpu_state{gpu="2",uuid="GPU-c",state="free"} 1.0
rayrack_gpu_state{gpu="2",uuid="GPU-c",state="unknown"} 0.0
rayrack_gpu_state{gpu="2",uuid="GPU-c",state="lost"} 0.0
rayrack_gpu_state{gpu="3",uuid="GPU-d",state="busy"} 0.0
rayrack_gpu_state{gpu="3",uuid="GPU-d",state="idle_held"} 0.0
rayrack_gpu_state{gpu="3",uuid="GPU-d",state="free"} 0.0
rayrack_gpu_state{gpu="3",uuid="GPU-d",state="unknown"} 0.0
rayrack_gpu_state{gpu="3",uuid="GPU-d",state="lost"} 1.0
"""


def test_gpu_states_from_the_agents_state():
    counts, agent, driver = gpu_states(METRICS + STATES)
    assert counts == {"busy": 1, "idle": 1, "free": 1, "down": 1}
    assert (agent, driver) == ("0.1.0", "550.54.15")


def test_the_agents_state_wins_over_utilisation():
    # gpu 0 computes at 93 % by its utilisation, but the agent (which sees its processes and its whole window)
    # says free; gpu 1 is held at 0 % but the agent does not know whether it works.
    changed = STATES.replace('gpu="0",uuid="GPU-a",state="busy"} 1.0', 'gpu="0",uuid="GPU-a",state="busy"} 0.0')
    changed = changed.replace('gpu="0",uuid="GPU-a",state="free"} 0.0', 'gpu="0",uuid="GPU-a",state="free"} 1.0')
    changed = changed.replace('gpu="1",uuid="GPU-b",state="idle_held"} 1.0',
                              'gpu="1",uuid="GPU-b",state="idle_held"} 0.0')
    changed = changed.replace('gpu="1",uuid="GPU-b",state="unknown"} 0.0', 'gpu="1",uuid="GPU-b",state="unknown"} 1.0')
    counts, _, _ = gpu_states(METRICS + changed)
    assert counts == {"busy": 0, "idle": 0, "free": 2, "down": 2}


def test_every_state_of_the_agent_has_a_column():
    assert set(COLUMN_OF_STATE) == set(GpuState)
    assert set(COLUMN_OF_STATE.values()) == set(GPU_STATES)


def test_an_agent_without_states_shows_its_gpus_down():
    # Nothing here judges utilisation: without the agent's state a GPU's work is not known.
    assert gpu_states(METRICS)[0] == {"busy": 0, "idle": 0, "free": 0, "down": 4}


def test_no_gpus_is_all_zero():
    assert gpu_states("# TYPE rayrack_up gauge\nrayrack_up 1.0\n")[0] == {"busy": 0, "idle": 0, "free": 0,
                                                                          "down": 0}


def nodes(*rows):
    return {"data": {"result": {"result": list(rows)}}}


def test_ray_states_prefer_the_live_entry_and_show_draining():
    states = ray_states(nodes(
        {"node_ip": "10.0.0.11", "state": "DEAD"},
        {"node_ip": "10.0.0.11", "state": "ALIVE"},
        {"node_ip": "10.0.0.11", "state": "DEAD"},
        {"node_ip": "10.0.0.12", "state": "ALIVE", "is_draining": True},
        {"node_ip": "10.0.0.13", "state": "DEAD"},
    ))
    assert states == {"10.0.0.11": "ALIVE", "10.0.0.12": "DRAINING", "10.0.0.13": "DEAD"}
    assert ray_states(None) == {}


def marker(version):
    """A Ray venv's marker as the venv tasks write it."""
    identity = {"package": "ray", "version": version, "python": "3.11", "arch": "x86_64", "lock": "0123456789ab"}
    return json.dumps(identity, indent=4, sort_keys=True) + "\n"


def test_ray_version_from_the_venv_marker():
    assert ray_version_of(marker("2.58.1")) == "2.58.1"
    assert ray_version_of(None) == "-"
    assert ray_version_of("something-else") == "-"
    # A marker of an older kit (a plain name) or of another venv is no Ray version.
    assert ray_version_of("ray-2.58.1-default-py3.11-x86_64") == "-"
    assert ray_version_of(marker("2.58.1").replace('"ray"', '"ray-agent"')) == "-"


LISTING = {
    "_meta": {"hostvars": {
        "head": {"ansible_host": "10.0.0.10", "rayrack_ray_version": "2.58.1", "rayrack_cluster_name": "rack"},
        "worker1": {"ansible_host": "192.168.0.11", "ray_node_ip": "10.0.0.11", "rayrack_ray_version": "2.58.1"},
        "worker2": {"ansible_host": "10.0.0.12", "rayrack_ray_version": "2.58.1"},
    }},
    "all": {"children": ["ungrouped", "ray_head", "ray_workers"]},
    "ray_head": {"hosts": ["head"]},
    "ray_workers": {"children": ["gpu_a100"], "hosts": ["worker2"]},
    "gpu_a100": {"hosts": ["worker1"]},
}


def test_inventory_listing_head_first_children_resolved_and_ray_address():
    inv = parse_listing(Path("/inv"), LISTING)
    assert [(h.name, h.role, h.address) for h in inv.hosts] == [
        ("head", "head", "10.0.0.10"), ("worker2", "worker", "10.0.0.12"), ("worker1", "worker", "10.0.0.11")]
    ssh = inv.get("worker1").ssh_command("true")
    assert ssh[-2:] == ["192.168.0.11", "true"]  # SSH goes where Ansible goes, not to the Ray address
    assert inv.setting("rayrack_agent_port") == 9489 and inv.setting("rayrack_cluster_name") == "rack"


def test_the_cli_reads_its_defaults_and_unit_names_from_the_roles():
    defaults = yaml.safe_load((ROLES / "rayrack" / "defaults" / "main.yml").read_text())
    inv = parse_listing(Path("/inv"), LISTING)
    head, worker = inv.get("head"), inv.get("worker1")
    assert inv.setting("rayrack_ray_dashboard_port") == defaults["rayrack_ray_dashboard_port"]
    assert inv.setting("prometheus_listen_address") == "127.0.0.1:9090"  # the prometheus role's default
    # A template of other settings resolves as Ansible would; the inventory's values win.
    assert head.setting("rayrack_venv_dir") == defaults["rayrack_prefix"] + "/venv"
    moved = parse_listing(Path("/inv"), {**LISTING, "_meta": {"hostvars": {
        **LISTING["_meta"]["hostvars"], "worker1": {"rayrack_prefix": "/srv/rack"}}}}).get("worker1")
    assert moved.ray_venv_marker == f"/srv/rack/venv/{defaults['rayrack_venv_marker']}"
    # Anything else (a filter, a fact) is Ansible's alone.
    assert head.setting("rayrack_ray_wheelhouse") is None
    assert (head.ray_unit, worker.ray_unit) == (defaults["rayrack_ray_units"]["head"],
                                                defaults["rayrack_ray_units"]["worker"])


def test_the_table_shows_every_node_and_who_is_behind():
    inv = parse_listing(Path("/inv"), LISTING)
    probes = {
        "head": {"active": "active", "wheelhouse": marker("2.58.0"),
                 "metrics": "rayrack_up 1.0\n", "version": {"ray_version": "2.58.0"},
                 "nodes": nodes({"node_ip": "10.0.0.10", "state": "ALIVE"}, {"node_ip": "10.0.0.12", "state": "ALIVE"}),
                 "jobs": [{"status": "RUNNING"}, {"status": "SUCCEEDED"}, {"status": "RUNNING"}]},
        "worker1": {"active": "activating", "wheelhouse": marker("2.58.1"), "metrics": METRICS + STATES},
        "worker2": {"error": "ssh: connect to host 10.0.0.12 port 22: No route to host"},
    }
    rows = build_rows(inv, probes)
    assert [(r.name, r.ray, r.version) for r in rows] == [
        ("head", "ALIVE", "2.58.0"), ("worker2", "?", "?"), ("worker1", "ABSENT", "2.58.1")]
    text = render(inv, rows, probes["head"], None)
    assert "worker1      worker  10.0.0.11       activating ABSENT    2.58.1   1/1/1/1" in text
    assert "worker2      worker  10.0.0.12       unreachable: ssh: connect" in text
    assert "cluster rack: head on Ray 2.58.0, 1/3 inventory nodes alive, jobs: 2 running, 1 succeeded" in text
    assert "not on the inventory's Ray 2.58.1: head" in text
    assert text.endswith("last run: none recorded")


def test_run_record_round_trip_and_description(tmp_path):
    assert read_record(tmp_path) is None
    write_record(tmp_path, {"command": "upgrade", "started": "2026-11-23T20:00:00+00:00", "status": "running",
                            "step": {"play": "Upgrade the head, last and alone", "task": "Stop Ray on the node"}})
    now = datetime(2026, 11, 23, 20, 3, 5, tzinfo=UTC)
    assert describe_run(read_record(tmp_path), now) == (
        "run in progress: upgrade since 2026-11-23 20:00:00 UTC (3m05s): Upgrade the head, last and alone / "
        "Stop Ray on the node")
    write_record(tmp_path, {"command": "upgrade", "started": "2026-11-23T20:00:00+00:00", "status": "failed",
                            "duration_seconds": 529.0, "hosts": {"head": {"failed": 2}, "worker1": {"failed": 0}}})
    assert describe_run(read_record(tmp_path), now) == (
        "last run: upgrade failed at 2026-11-23 20:00:00 UTC, took 8m49s; failed on head")
    assert list(tmp_path.joinpath(".rayrack").iterdir()) == [tmp_path / ".rayrack" / "last-run.json"]
