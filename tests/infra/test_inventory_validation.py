"""The inventory validation filter, and the validate play stopping a run before any host is contacted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import FILTERS, REPO, load_module

inv = load_module(FILTERS / "rayrack_inventory.py", "rayrack_inventory")


def cluster(workers=2, **overrides):
    """groups and hostvars of a good 1-head cluster; overrides: host -> vars to merge (None deletes)."""
    hostvars = {"head": {"ansible_host": "10.0.0.10"}}
    for i in range(1, workers + 1):
        hostvars[f"worker{i}"] = {"ansible_host": f"10.0.0.{10 + i}", "ray_node_num_gpus": 2}
    for host, extra in overrides.items():
        hostvars.setdefault(host, {})
        for key, value in extra.items():
            if value is None:
                hostvars[host].pop(key, None)
            else:
                hostvars[host][key] = value
    groups = {"all": list(hostvars), "ray_head": ["head"], "ray_workers": [h for h in hostvars if h != "head"]}
    return groups, hostvars


def errors(groups, hostvars):
    return inv.rayrack_inventory_errors(groups, hostvars)


def test_good_inventory_has_no_errors():
    assert errors(*cluster()) == []


def test_two_heads():
    groups, hostvars = cluster()
    groups["ray_head"] = ["head", "worker1"]
    groups["ray_workers"] = ["worker2"]
    assert errors(groups, hostvars) == ["group ray_head: must hold exactly one host; found 2 (head, worker1)"]


def test_no_head():
    groups, hostvars = cluster()
    groups["ray_head"] = []
    assert errors(groups, hostvars)[0] == "group ray_head: must hold exactly one host; found 0 (none)"


def test_worker_also_head():
    groups, hostvars = cluster()
    groups["ray_workers"].append("head")
    assert "head: is in both ray_head and ray_workers; a node is the head or a worker" in errors(groups, hostvars)


def test_worker_without_address():
    groups, hostvars = cluster(worker2={"ansible_host": None})
    assert errors(groups, hostvars) == [
        "worker2: has no address: set ansible_host (or ray_node_ip) to the IP address Ray should use for this node"]


def test_hostname_is_not_an_ip():
    groups, hostvars = cluster(worker1={"ansible_host": "gpu-01.example.org"})
    assert errors(groups, hostvars) == [
        "worker1: ansible_host must be the IP address Ray should use for this node; got 'gpu-01.example.org'"]


def test_ray_node_ip_wins_over_ansible_host():
    groups, hostvars = cluster(worker1={"ansible_host": "gpu-01.example.org", "ray_node_ip": "10.0.0.21"})
    assert errors(groups, hostvars) == []
    assert inv.rayrack_node_addresses(groups, hostvars)["worker1"] == "10.0.0.21"


def test_duplicate_address():
    groups, hostvars = cluster(worker2={"ansible_host": "10.0.0.11"})
    assert errors(groups, hostvars) == ["worker2: address 10.0.0.11 is also worker1's; every node needs its own"]


def test_ray_version_latest_is_reported_once_for_all_hosts():
    groups, hostvars = cluster()
    for host_vars in hostvars.values():
        host_vars["rayrack_ray_version"] = "latest"
    assert errors(groups, hostvars) == [
        "rayrack_ray_version: must be a pinned Ray release X.Y.Z such as 2.60.0; got 'latest' "
        "(on head, worker1, worker2)"]


def test_ray_too_old_for_token_auth():
    groups, hostvars = cluster(head={"rayrack_ray_version": "2.40.0", "rayrack_ray_auth_token_enabled": True})
    assert errors(groups, hostvars) == [
        "rayrack_ray_version: token authentication needs Ray >= 2.52.0; got 2.40.0 (or turn it off: "
        "rayrack_ray_auth_token_enabled: false, with rayrack_accept_insecure: [rayrack_ray_auth_token_enabled])"]


def test_old_ray_is_fine_without_token_auth():
    groups, hostvars = cluster(head={"rayrack_ray_version": "2.40.0", "rayrack_ray_auth_token_enabled": False,
                                     "rayrack_accept_insecure": ["rayrack_ray_auth_token_enabled"]})
    assert errors(groups, hostvars) == []


@pytest.mark.parametrize("value", ["auto", "3.12", "3.10"])
def test_python_version_auto_or_a_minor_version(value):
    groups, hostvars = cluster(head={"rayrack_python_version": value})
    assert errors(groups, hostvars) == []


def test_python_version_must_be_a_minor_version():
    groups, hostvars = cluster(head={"rayrack_python_version": "3.12.1"})
    assert errors(groups, hostvars) == [
        "rayrack_python_version: must be auto (the head's python3) or a Python minor version 3.Y such as 3.12; "
        "got '3.12.1' (on head)"]


@pytest.mark.parametrize("requirement", ["torch==2.13.0+cpu", "deepspeed==0.18.1", "ray[train]==2.60.0"])
def test_pinned_python_packages_pass(requirement):
    groups, hostvars = cluster(head={"rayrack_python_packages": [requirement]})
    assert errors(groups, hostvars) == []


@pytest.mark.parametrize(("name", "requirement"), [
    ("rayrack_python_packages", "torch"), ("rayrack_python_packages", "torch>=2.0"),
    ("rayrack_shared_packages", "einops==0.8.1; python_version<'3.8'"), ("rayrack_shared_packages", "-e ."),
])
def test_unpinned_packages_are_refused_naming_the_entry(name, requirement):
    groups, hostvars = cluster(head={name: ["numpy==2.4.6", requirement]})
    assert errors(groups, hostvars) == [
        f"{name}: every entry must be a pinned requirement NAME==VERSION (or NAME[extra]==VERSION) such as "
        f"torch==2.13.0; got {requirement!r} (on head)"]


def test_package_directory_must_be_on_the_shared_tree():
    groups, hostvars = cluster(head={"rayrack_package_dir": "/opt/wheels"})
    assert errors(groups, hostvars) == [
        "rayrack_package_dir: must lie inside rayrack_shared_dir (/srv/rayrack-shared), where every node sees it; "
        "got '/opt/wheels'"]


def test_package_directory_must_not_be_a_group_writable_one():
    groups, hostvars = cluster(head={"rayrack_package_dir": "/srv/rayrack-shared/wheelhouse"})
    assert errors(groups, hostvars) == [
        "rayrack_package_dir: /srv/rayrack-shared/wheelhouse is one of rayrack_shared_layout, which the admin group "
        "writes; keep it root's alone, so pip installs only what root put there"]


@pytest.mark.parametrize(("entry", "why"), [
    ("../etc", "must be a relative path of names (letters, digits, '.', '_', '-'; no '..')"),
    ("models/with space", "must be a relative path of names (letters, digits, '.', '_', '-'; no '..')"),
    ("scratch/shared", "lies in scratch/, which rayrack lays out itself (users' directories, the smoke job)"),
    ("ray/working_dirs", "lies in ray/, which rayrack lays out itself (users' directories, the smoke job)"),
])
def test_shared_layout_entries(entry, why):
    groups, hostvars = cluster(head={"rayrack_shared_layout": ["datasets", entry]})
    assert errors(groups, hostvars) == [f"rayrack_shared_layout: {entry!r} {why}"]


def test_shared_packages_are_not_written_into_an_existing_nas():
    groups, hostvars = cluster(head={"rayrack_shared_packages": ["einops==0.8.1"], "rayrack_nfs_server": "10.0.0.99"})
    (error,) = errors(groups, hostvars)
    assert error.startswith("rayrack_shared_packages: rayrack does not write into an existing NAS")


@pytest.mark.parametrize("value", ["true", "yes", 1])
def test_booleans_must_be_real(value):
    groups, hostvars = cluster(head={"rayrack_ray_auth_token_enabled": value})
    (error,) = errors(groups, hostvars)
    assert error.startswith("rayrack_ray_auth_token_enabled: must be a boolean (true/false, unquoted), got ")
    assert error.endswith("(on head)")


@pytest.mark.parametrize(("value", "meant"), [("true", "true"), ("False", "false"), (" yes", "true"),
                                            ("off", "false")])
def test_a_boolean_word_in_a_string_gets_the_json_form(value, meant):
    groups, hostvars = cluster(head={"rayrack_ray_auth_token_enabled": value})
    (error,) = errors(groups, hostvars)
    assert error.endswith(f"""or pass -e '{{"rayrack_ray_auth_token_enabled": {meant}}}' (on head)"""), error


@pytest.mark.parametrize(("name", "value"), [("rayrack_ray_auth_token_enabled", "maybe"),
                                             ("rayrack_ray_auth_token_enabled", 1), ("rayrack_ray_gcs_port", "true")])
def test_no_boolean_hint_where_no_boolean_was_meant(name, value):
    groups, hostvars = cluster(head={name: value})
    (error,) = errors(groups, hostvars)
    assert "-e" not in error, error


def test_unknown_variable_with_suggestion():
    groups, hostvars = cluster(worker1={"rayrack_ray_verison": "2.60.0"})
    assert errors(groups, hostvars) == [
        "rayrack_ray_verison: unknown variable; did you mean rayrack_ray_version? (on worker1)"]


def test_a_setting_of_a_removed_role_names_its_replacement():
    groups, hostvars = cluster(head={"ray_head_ready_timeout": 300})
    assert errors(groups, hostvars) == ["ray_head_ready_timeout: renamed to ray_node_ready_timeout (on head)"]


def test_a_derived_fact_set_in_the_inventory_is_refused():
    groups, hostvars = cluster(head={"rayrack_head_api_url": "http://10.0.0.1:8265"})
    assert errors(groups, hostvars) == [
        "rayrack_head_api_url: derived by the rayrack role from other settings; remove it from the inventory (on head)"]


def test_role_variables_are_checked_from_their_argument_specs():
    groups, hostvars = cluster(worker1={"ray_node_num_gpus": "two"})
    assert errors(groups, hostvars) == ["ray_node_num_gpus: must be an integer, got the string 'two' (on worker1)"]


def test_port_collision_and_worker_range():
    groups, hostvars = cluster(head={"rayrack_ray_dashboard_port": 6379, "rayrack_ray_client_port": 10500})
    found = errors(groups, hostvars)
    assert found == [
        "rayrack_ray_gcs_port: port 6379 is also rayrack_ray_dashboard_port (on head)",
        "rayrack_ray_client_port: port 10500 lies inside the worker port range rayrack_ray_min_worker_port.."
        "rayrack_ray_max_worker_port, 10002-10999 (on head)"]


def test_port_out_of_range():
    groups, hostvars = cluster(head={"rayrack_ray_gcs_port": 70000})
    assert errors(groups, hostvars) == ["rayrack_ray_gcs_port: must be a port number 1-65535; got 70000 (on head)"]


def test_cluster_cidr():
    groups, hostvars = cluster(head={"rayrack_cluster_cidr": "10.0.0.8/30"})
    assert errors(groups, hostvars) == ["worker2: address 10.0.0.12 is outside rayrack_cluster_cidr 10.0.0.8/30"]
    groups, hostvars = cluster(head={"rayrack_cluster_cidr": "10.0.0/33"})
    assert errors(groups, hostvars) == [
        "rayrack_cluster_cidr: must be empty, or a network (CIDR) such as 10.0.0.0/24; got '10.0.0/33' (on head)"]


def test_gpu_workers_from_inventory_or_fact():
    groups, hostvars = cluster(worker1={"ray_node_num_gpus": None,
                                        "ansible_facts": {"ansible_local": {"gpus": {"count": 8}}}},
                               worker2={"ray_node_num_gpus": 0})
    assert inv.rayrack_gpu_workers(groups, hostvars) == {"worker1": "10.0.0.11"}


def test_alive_node_ips_from_state_api_response():
    response = {"json": {"data": {"result": {"result": [
        {"node_ip": "10.0.0.10", "state": "ALIVE"},
        {"node_ip": "10.0.0.11", "state": "DEAD"},
        {"node_ip": "10.0.0.11", "state": "ALIVE"},
        {"node_ip": "10.0.0.12", "state": "DEAD"},
    ]}}}}
    assert inv.rayrack_alive_node_ips(response) == ["10.0.0.10", "10.0.0.11"]
    assert inv.rayrack_alive_node_ips({"status": -1, "msg": "connection refused"}) == []


# --- The validate play, through ansible-playbook ----------------------------------------------------------

def write_inventory(tmp_path: Path, heads: dict, workers: dict, group_vars: dict | None = None) -> Path:
    """An inventory whose hosts can only be reached on a closed loopback port: contacting one shows in the stats."""
    unreachable = {"ansible_host": "127.0.0.1", "ansible_port": 1}
    inventory = {"all": {"vars": group_vars or {}, "children": {
        "ray_head": {"hosts": {h: ({**unreachable, **v} if v is not None else {}) for h, v in heads.items()}},
        "ray_workers": {"hosts": {h: ({**unreachable, **v} if v is not None else {}) for h, v in workers.items()}},
    }}}
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory))
    return path


def run_playbook(inventory: Path, playbook: str = "site.yml", *options: str) -> tuple[int, dict]:
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="ansible.posix.json", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
               ANSIBLE_CACHE_PLUGIN_CONNECTION=str(inventory.parent / ".facts"))
    ansible_playbook = Path(sys.executable).parent / "ansible-playbook"
    result = subprocess.run([str(ansible_playbook), "-i", str(inventory), playbook, *options], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    return result.returncode, json.loads(result.stdout)


def failure_message(report: dict) -> str:
    """The failed tasks' messages, one line each (the validate play's message is a list of lines)."""
    msgs = [task["hosts"]["localhost"].get("msg", "") for play in report["plays"] for task in play["tasks"]
            if task["hosts"].get("localhost", {}).get("failed")]
    return "\n".join(line for msg in msgs for line in (msg if isinstance(msg, list) else [str(msg)]))


GOOD_NODE = {"ray_node_ip": "10.0.0.10"}


@pytest.mark.parametrize(("case", "heads", "workers", "group_vars", "expected"), [
    ("two heads", {"head1": {"ray_node_ip": "10.0.0.10"}, "head2": {"ray_node_ip": "10.0.0.11"}},
     {"worker1": {"ray_node_ip": "10.0.0.12"}}, {}, "group ray_head: must hold exactly one host; found 2"),
    ("worker without address", {"head": GOOD_NODE}, {"worker1": None}, {},
     "worker1: has no address: set ansible_host (or ray_node_ip)"),
    ("ray_version latest", {"head": GOOD_NODE}, {"worker1": {"ray_node_ip": "10.0.0.11"}},
     {"rayrack_ray_version": "latest"}, "rayrack_ray_version: must be a pinned Ray release X.Y.Z"),
])
def test_site_stops_in_validation_before_touching_any_host(tmp_path, case, heads, workers, group_vars, expected):
    rc, report = run_playbook(write_inventory(tmp_path, heads, workers, group_vars))
    assert rc != 0, case
    assert expected in failure_message(report), case
    # Only the controller ran anything: no inventory host was contacted, so none can have changed.
    assert set(report["stats"]) == {"localhost"}, case


def test_validate_play_passes_a_good_inventory(tmp_path):
    rc, report = run_playbook(write_inventory(tmp_path, {"head": GOOD_NODE}, {"worker1": {"ray_node_ip": "10.0.0.11"}}),
                              "playbooks/validate.yml")
    assert rc == 0, failure_message(report)
    assert set(report["stats"]) == {"localhost"}


def test_a_boolean_from_e_key_value_is_refused_showing_the_form_that_works(tmp_path):
    inventory = write_inventory(tmp_path, {"head": GOOD_NODE}, {"worker1": {"ray_node_ip": "10.0.0.11"}})
    rc, report = run_playbook(inventory, "playbooks/validate.yml", "-e", "ray_agent_dcgm_compat=true")
    assert rc != 0
    assert ("ray_agent_dcgm_compat: must be a boolean (true/false, unquoted), got the string 'true'; "
            "-e NAME=VALUE (like a quoted value) gives a string: write it unquoted in the inventory, "
            """or pass -e '{"ray_agent_dcgm_compat": true}' (on head, worker1)""") in failure_message(report)
    assert set(report["stats"]) == {"localhost"}
    rc, report = run_playbook(inventory, "playbooks/validate.yml", "-e", '{"ray_agent_dcgm_compat": true}')
    assert rc == 0, failure_message(report)


def test_validate_play_runs_the_agents_validation_before_any_host_changes(tmp_path):
    inventory = write_inventory(tmp_path, {"head": GOOD_NODE}, {"worker1": {"ray_node_ip": "10.0.0.11"}})
    rc, report = run_playbook(inventory, "playbooks/validate.yml", "-e", '{"ray_agent_call_timeout": "10s"}')
    assert rc != 0
    assert ("ray_agent_call_timeout (the agent's collection.call_timeout): (10s) must not exceed "
            "collection.interval (5s) (on head, worker1)") in failure_message(report)
    assert set(report["stats"]) == {"localhost"}


def test_shipped_example_inventory_is_valid(tmp_path):
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="ansible.posix.json", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
               ANSIBLE_CACHE_PLUGIN_CONNECTION=str(tmp_path / ".facts"))
    result = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "inventories/example",
                             "playbooks/validate.yml"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    report = json.loads(result.stdout)
    assert result.returncode == 0, failure_message(report)
    assert set(report["stats"]) == {"localhost"}


def test_the_agents_own_rules_name_the_variable():
    groups, hostvars = cluster(worker1={"ray_agent_call_timeout": "10s"})
    assert errors(groups, hostvars) == [
        "ray_agent_call_timeout (the agent's collection.call_timeout): (10s) must not exceed collection.interval "
        "(5s) (on worker1)"]
    stages = {"ray_agent_guard_enabled": True, "ray_agent_guard_stop_after": "1h", "ray_agent_guard_kill_after": "30m"}
    groups, hostvars = cluster(head=stages)
    assert errors(groups, hostvars) == [
        "ray_agent_guard_kill_after (the agent's guard.stages.kill_after): (1800s) must not be earlier than "
        "stop_after (3600s) (on head)"]


def test_the_agents_rules_cover_its_extra_config():
    extra = {"ray_agent_guard_enabled": True, "ray_agent_extra_config": {"guard": {"max_gap": "2h"}}}
    groups, hostvars = cluster(worker2=extra)
    assert errors(groups, hostvars) == [
        "ray_agent_extra_config: guard.max_gap: (7200s) must not exceed guard.window (1800s) (on worker2)"]
    groups, hostvars = cluster(worker2={"ray_agent_extra_config": {"exporter": {"dcgm": True}}})
    assert errors(groups, hostvars) == [
        "ray_agent_extra_config: exporter.dcgm: unknown key; allowed keys: dcgm_compat, hostname, process_metrics "
        "(on worker2)"]


def test_the_guard_off_writes_none_of_its_settings():
    stages = {"ray_agent_guard_stop_after": "1h", "ray_agent_guard_kill_after": "30m"}
    assert errors(*cluster(worker1=stages)) == []
    assert errors(*cluster(worker1={**stages, "ray_agent_guard_enabled": True})) != []


def test_guard_stop_needs_a_reachable_jobs_api():
    guard = {"ray_agent_guard_enabled": True, "ray_agent_guard_stop_after": "15m"}
    groups, hostvars = cluster(worker1=guard, worker2=guard)
    assert errors(groups, hostvars) == [
        "ray_agent_guard_stop_after: stopping Ray jobs from worker1, worker2 needs the Jobs API there, but "
        "rayrack_ray_dashboard_host is 127.0.0.1; set it to the head's cluster address, and name it in "
        "rayrack_accept_insecure (the Jobs API is plain HTTP)"]
    # Off loopback the token crosses the network in clear: only on purpose.
    open_dashboard = {"rayrack_ray_dashboard_host": "10.0.0.10"}
    groups, hostvars = cluster(head=open_dashboard, worker1=guard, worker2=guard)
    assert [e.split(";")[0] for e in errors(groups, hostvars)] == [
        "rayrack_ray_dashboard_host: 10.0.0.10 serves Ray's dashboard and Jobs API beyond the head over plain HTTP, "
        "so the cluster token of every call to it (the agents' state queries, the guard's job stops) crosses the "
        "network in clear"]
    accepted = {**open_dashboard, "rayrack_accept_insecure": ["rayrack_ray_dashboard_host"]}
    groups, hostvars = cluster(head=accepted, worker1=guard, worker2=guard)
    assert errors(groups, hostvars) == []


# --- rayrack_users and rayrack_user_tokens ---------------------------------------------------------------
GOOD_USERS = [{"name": "alice", "uid": 2002, "contact": "alice@example.org U0ALICE1"},
              {"name": "bob", "uid": 2003, "contact": "bob@example.org", "max_gpus": 1},
              {"name": "ops", "uid": 2004, "admin": True, "max_gpus": None}]


def users_cluster(users, tokens=None):
    extra = {"rayrack_users": users} | ({"rayrack_user_tokens": tokens} if tokens is not None else {})
    return cluster(head=extra, worker1=extra, worker2=extra)


def test_good_users_and_tokens():
    assert errors(*users_cluster(GOOD_USERS, {"alice": "a" * 64})) == []


def test_user_bad_name():
    assert errors(*users_cluster([{"name": "Alice", "uid": 2005}])) == [
        "rayrack_users[0].name: must match ^[a-z][a-z0-9_-]{0,31}$ (lowercase letter first, then lowercase letters, "
        "digits, '_' or '-', 32 at most); got 'Alice'"]


def test_user_name_unknown_is_reserved():
    assert errors(*users_cluster([{"name": "unknown", "uid": 2006}])) == [
        "rayrack_users[0].name: 'unknown' is reserved for jobs submitted around the gateway"]


def test_user_without_name():
    assert errors(*users_cluster([{"contact": "x@example.org", "uid": 2001}])) == ["rayrack_users[0]: has no name"]


def test_duplicate_user_names_both_entries():
    users = [{"name": "alice", "uid": 2007}, {"name": "bob", "uid": 2008}, {"name": "alice", "uid": 2009}]
    assert errors(*users_cluster(users)) == ["rayrack_users[0] and rayrack_users[2] are both alice"]


def test_user_unknown_key_with_hint():
    assert errors(*users_cluster([{"name": "bob", "uid": 2010, "maxgpus": 1}])) == [
        "rayrack_users[0]: unknown key 'maxgpus'; did you mean max_gpus?"]


@pytest.mark.parametrize(("key", "value", "wanted"), [
    ("admin", "yes", "a boolean (true/false, unquoted)"),
    ("max_gpus", -1, "a whole number of GPUs (0 or more), or null for no limit"),
    ("max_gpus", True, "a whole number of GPUs (0 or more), or null for no limit"),
    ("contact", ["a@b.org"], "a string"),
])
def test_user_wrong_types(key, value, wanted):
    described = f"the string {value!r}" if isinstance(value, str) else f"{type(value).__name__} {value!r}"
    assert errors(*users_cluster([{"name": "bob", "uid": 2011, key: value}])) == [
        f"rayrack_users[0].{key}: must be {wanted}, got {described}"]


def test_user_entry_not_a_mapping():
    assert errors(*users_cluster(["alice"])) == [
        "rayrack_users: must be a list of a mapping, got list ['alice'] (on head, worker1, worker2)"]


def test_user_bad_contact():
    assert errors(*users_cluster([{"name": "bob", "uid": 2012, "contact": "bob at example"}])) == [
        "rayrack_users[0].contact: must be an e-mail address and/or a Slack member id such as U0123ABCD (at most "
        "one of each), separated by a space; got 'bob at example'"]


def test_token_too_short_never_shown():
    found = errors(*users_cluster(GOOD_USERS, {"alice": "s3cret-short"}))
    assert found == ["rayrack_user_tokens[alice]: must be a string of at least 32 characters without spaces "
                     "(e.g. `openssl rand -hex 32`)"]
    assert "s3cret" not in " ".join(found)


def test_token_for_unknown_user():
    assert errors(*users_cluster(GOOD_USERS, {"carol": "c" * 64})) == [
        "rayrack_user_tokens: 'carol' is not a name in rayrack_users"]


def test_tokens_of_the_wrong_type_are_not_printed():
    found = errors(*users_cluster(GOOD_USERS, "alice-token-" + "x" * 40))
    assert found == ["rayrack_user_tokens: must be a mapping, got str (on head, worker1, worker2)"]


def test_cert_sans_addresses_and_names_once():
    assert inv.rayrack_cert_sans(["10.0.0.10", "10.0.0.10", "head", "", None, "head.example.org", "fd00::1"]) == [
        "IP:10.0.0.10", "DNS:head", "DNS:head.example.org", "IP:fd00::1"]


def test_user_without_uid():
    assert errors(*users_cluster([{"name": "alice"}])) == [
        "rayrack_users[0]: has no uid; give each user the numeric ID their files have on every node and the shared "
        "tree (1000-59999)"]


@pytest.mark.parametrize("uid", [0, 999, 60000, 65534, "2001", True])
def test_user_uid_outside_the_login_range(uid):
    assert errors(*users_cluster([{"name": "alice", "uid": uid}])) == [
        f"rayrack_users[0].uid: must be a login ID 1000-59999 (the same on every node and the shared tree), got "
        f"{'the string ' + repr(uid) if isinstance(uid, str) else type(uid).__name__ + ' ' + repr(uid)}"]


def test_two_users_with_one_uid():
    users = [{"name": "alice", "uid": 2001}, {"name": "bob", "uid": 2002}, {"name": "carol", "uid": 2001}]
    assert errors(*users_cluster(users)) == ["rayrack_users[0] and rayrack_users[2] both have uid 2001"]


def test_a_uid_may_not_be_the_admin_groups_id():
    assert errors(*users_cluster([{"name": "alice", "uid": 2900}])) == [
        "rayrack_users[0].uid: 2900 is rayrack_admin_gid; a user's own group takes the uid as its ID"]


@pytest.mark.parametrize("path", ["/var/cache/rayrack/pip", "/srv/rayrack-shared/scratch/pip", "/tmp/hf",
                                  "/srv/rayrack-shared/modelsx"])
def test_a_cache_anyone_may_write_is_refused(path):
    env = {"HF_HOME": "/srv/rayrack-shared/models/huggingface", "PIP_CACHE_DIR": path,
           "PIP_FIND_LINKS": "/srv/rayrack-shared/packages"}
    groups, hostvars = cluster(head={"rayrack_cache_env": env})
    derived = {"rayrack_package_dir": "/srv/rayrack-shared/packages"}  # as the validate play resolves the default
    assert inv.rayrack_inventory_errors(groups, hostvars, derived=derived) == [
        f"rayrack_cache_env: PIP_CACHE_DIR points at {path!r}, which users or jobs may write; point it into "
        "rayrack_shared_layout or rayrack_package_dir (/srv/rayrack-shared/datasets, /srv/rayrack-shared/models, "
        "/srv/rayrack-shared/models/huggingface, /srv/rayrack-shared/models/torch, /srv/rayrack-shared/wheelhouse, "
        "/srv/rayrack-shared/packages), or leave it out (each login then caches in its own home)"]


@pytest.mark.parametrize("name", ["rayrack_prometheus_password", "rayrack_alertmanager_password",
                                  "grafana_admin_password"])
def test_monitoring_passwords_are_generated_or_long_enough_for_bcrypt(name):
    assert errors(*cluster(head={name: ""})) == []
    assert errors(*cluster(head={name: "a" * 40})) == []
    for bad in ("short", "a" * 73, "with a space and long enough to pass the length rule"):
        (error,) = errors(*cluster(head={name: bad}))
        assert error.startswith(f"{name}: empty to have it generated, or a string of 32 characters up to 72 bytes")
        assert bad not in error


@pytest.mark.parametrize(("listen", "local"), [
    ("127.0.0.1:9090", "127.0.0.1:9090"), ("0.0.0.0:9093", "127.0.0.1:9093"), (":3000", "127.0.0.1:3000"),
    ("[::]:9090", "127.0.0.1:9090"), ("10.0.0.10:9090", "10.0.0.10:9090"), ("[::1]:9090", "[::1]:9090"),
])
def test_a_client_on_the_host_reaches_a_wildcard_listener_on_loopback(listen, local):
    assert inv.rayrack_local_address(listen) == local


def ft(groups, hostvars, **settings):
    for host_vars in hostvars.values():
        host_vars.update({"rayrack_gcs_ft": True, **settings})
    return errors(groups, hostvars)


def test_fault_tolerance_runs_redis_on_the_head_or_one_gcs_store_host():
    groups, hostvars = cluster()
    assert ft(groups, hostvars) == []
    groups, hostvars = cluster(store={"ansible_host": "10.0.0.20"})
    groups["ray_gcs_store"] = ["store"]
    assert ft(groups, hostvars) == []


def test_fault_tolerance_with_an_empty_gcs_store_group_names_the_conflict():
    groups, hostvars = cluster()
    groups["ray_gcs_store"] = []
    assert ft(groups, hostvars) == [
        "rayrack_gcs_ft: true needs a Redis host, but group ray_gcs_store is empty; put one host in it, or remove the "
        "group to run Redis on the head"]


def test_fault_tolerance_with_two_gcs_store_hosts_is_refused():
    groups, hostvars = cluster(a={"ansible_host": "10.0.0.20"}, b={"ansible_host": "10.0.0.21"})
    groups["ray_gcs_store"] = ["a", "b"]
    assert ft(groups, hostvars) == [
        "group ray_gcs_store: must hold one host (rayrack runs one Redis, without replicas); found 2 (a, b)"]


def test_a_gcs_store_host_without_fault_tolerance_is_refused():
    groups, hostvars = cluster(store={"ansible_host": "10.0.0.20"})
    groups["ray_gcs_store"] = ["store"]
    assert errors(groups, hostvars) == [
        "group ray_gcs_store: holds store, but rayrack_gcs_ft is false; set it to true, or remove the group"]


def test_fault_tolerance_needs_a_ray_that_supports_it():
    groups, hostvars = cluster()
    assert ft(groups, hostvars, rayrack_ray_version="2.8.0", rayrack_ray_auth_token_enabled=False,
              rayrack_accept_insecure=["rayrack_ray_auth_token_enabled"]) == [
        "rayrack_gcs_ft: true needs Ray >= 2.9.0 (an external Redis with a password and TLS); rayrack_ray_version "
        "is 2.8.0"]


@pytest.mark.parametrize("seconds", [0, 9, 3601])
def test_the_reconnect_timeout_must_be_a_sensible_number_of_seconds(seconds):
    groups, hostvars = cluster()
    assert ft(groups, hostvars, rayrack_gcs_reconnect_timeout=seconds) == [
        f"rayrack_gcs_reconnect_timeout: must be 10-3600 seconds (how long workers wait for a restarting head); "
        f"got {seconds} (on head, worker1, worker2)"]


def test_the_gcs_store_port_may_not_be_the_gcs_port():
    groups, hostvars = cluster()
    found = ft(groups, hostvars, rayrack_gcs_store_port=6379)
    assert len(found) == 1 and "6379" in found[0] and "rayrack_gcs_store_port" in found[0], found
