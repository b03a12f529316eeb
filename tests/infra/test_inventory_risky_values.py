"""Risky inventory values the validate play refuses before any host is touched, each naming its key: settings that
open the cluster without an explicit opt-in, short tokens, non-ASCII versions, IPv6 scope ids, port clashes,
paths that units read unquoted, and values that would reach a command line or a config file's syntax."""

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FILTERS, REPO, load_module
from .test_inventory_validation import cluster, errors, failure_message, inv

sys.path.insert(0, str(REPO / "tests" / "lab"))
import lab as labtool

ALL = "(on head, worker1, worker2)"
SPECS = inv.load_specs()
# Who may mount the NFS export, by whichever variable the storage roles name it.
NFS_CLIENTS = [name for name in ("nfs_server_clients", "rayrack_nfs_clients") if name in SPECS]


def everywhere(**values):
    """The cluster with VALUES set on every host, as group_vars/all would."""
    return cluster(head=values, worker1=values, worker2=values)


# --- Opening what the kit protects needs rayrack_accept_insecure ------------------------------------------
INSECURE = [
    ("rayrack_ray_auth_token_enabled", False,
     "rayrack_ray_auth_token_enabled: false turns token authentication off, so anyone who reaches Ray's ports runs "
     "code on every node"),
    ("rayrack_ray_tls", False,
     "rayrack_ray_tls: false sends Ray's gRPC, and the cluster token in every call, in clear text"),
    ("rayrack_cluster_cidr", "0.0.0.0/0",
     "rayrack_cluster_cidr: 0.0.0.0/0 counts every address as inside the cluster, for the firewall and NFS"),
    ("firewall_allowed_sources", ["10.0.0.0/24", "0.0.0.0/0"],
     "firewall_allowed_sources: 0.0.0.0/0 admits every address to Ray, the agent, Prometheus and NFS"),
    ("firewall_ssh_sources", ["::/0"], "firewall_ssh_sources: ::/0 admits every address to SSH"),
    ("firewall_monitoring_sources", ["0.0.0.0/0.0.0.0"],
     "firewall_monitoring_sources: 0.0.0.0/0.0.0.0 admits every address to the metrics ports and Prometheus"),
] + [(name, ["::/0"], f"{name}: ::/0 lets every address mount the shared tree") for name in NFS_CLIENTS]


@pytest.mark.parametrize(("key", "value", "why"), INSECURE, ids=[case[0] for case in INSECURE])
def test_insecure_setting_needs_its_key_in_accept_insecure(key, value, why):
    assert errors(*everywhere(**{key: value})) == [
        f"{why}; if that is meant, say so with rayrack_accept_insecure: [{key}] {ALL}"]
    # Named, it passes; naming another key does not accept this one.
    assert errors(*everywhere(**{key: value, "rayrack_accept_insecure": [key]})) == []
    other = next(k for k, _, _ in INSECURE if k != key)
    assert errors(*everywhere(**{key: value, "rayrack_accept_insecure": [other]})) != []


def test_accept_insecure_names_only_settings_that_need_it():
    assert errors(*everywhere(rayrack_accept_insecure=["rayrack_ray_tsl"])) == [
        "rayrack_accept_insecure: 'rayrack_ray_tsl' is not a setting that needs it; did you mean rayrack_ray_tls? "
        f"{ALL}"]
    (error,) = errors(*everywhere(rayrack_accept_insecure=["everything"]))
    assert error.startswith("rayrack_accept_insecure: 'everything' is not a setting that needs it; the settings it "
                            "takes are rayrack_ray_auth_token_enabled, rayrack_ray_tls, rayrack_cluster_cidr, ")


def test_a_wide_but_not_open_network_needs_no_opt_in():
    assert errors(*everywhere(firewall_allowed_sources=["10.0.0.0/8", "0.0.0.0/1"])) == []


# --- Tokens ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("token", ["s3cret", "x" * 31, "a" * 20 + " " + "b" * 20, " " * 40])
def test_cluster_token_is_long_and_never_shown(token):
    found = errors(*everywhere(rayrack_ray_token=token))
    assert found == ["rayrack_ray_token: must be a string of at least 32 characters without spaces "
                     f"(e.g. `openssl rand -hex 32`) {ALL}"]
    assert not token.strip() or token.strip() not in found[0]


def test_cluster_token_of_the_wrong_type_is_not_shown():
    assert errors(*everywhere(rayrack_ray_token=1234567890)) == [f"rayrack_ray_token: must be a string, got int {ALL}"]


def test_a_long_cluster_token_passes():
    assert errors(*everywhere(rayrack_ray_token="f" * 64)) == []


# --- Versions: ASCII digits only ------------------------------------------------------------------------------
FULL_WIDTH_SIX = "\uff16"  # FULLWIDTH DIGIT SIX
ARABIC_INDIC = "\u0662.\u0666\u0660.\u0660"  # 2.60.0 in ARABIC-INDIC DIGITs


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("rayrack_ray_version", f"2.{FULL_WIDTH_SIX}0.0", "a pinned Ray release X.Y.Z such as 2.60.0"),
    ("rayrack_ray_version", ARABIC_INDIC, "a pinned Ray release X.Y.Z such as 2.60.0"),
    ("rayrack_python_version", "3.\u0661\u0662",
     "auto (the head's python3) or a Python minor version 3.Y such as 3.12"),
    ("grafana_version", f"12.2.{FULL_WIDTH_SIX}", "empty, or a Grafana release such as 12.2.1"),
])
def test_versions_take_ascii_digits_only(key, value, allowed):
    assert errors(*everywhere(**{key: value})) == [f"{key}: must be {allowed}; got {value!r} {ALL}"]


def test_pinned_packages_take_ascii_digits_only():
    requirement = f"torch==2.{FULL_WIDTH_SIX}0.0"
    assert errors(*everywhere(rayrack_python_packages=[requirement])) == [
        "rayrack_python_packages: every entry must be a pinned requirement NAME==VERSION (or NAME[extra]==VERSION) "
        f"such as torch==2.13.0; got {requirement!r} {ALL}"]


def test_other_version_checks_take_ascii_digits_only():
    cuda = load_module(FILTERS / "cuda_toolkit.py", "cuda_toolkit_ascii")
    with pytest.raises(cuda.AnsibleFilterError, match=r"cuda_toolkit_versions: each must be major\.minor"):
        cuda.cuda_toolkit_packages([f"12.{FULL_WIDTH_SIX}"], f"12.{FULL_WIDTH_SIX}")
    plan = load_module(FILTERS / "nvidia_driver_plan.py", "nvidia_plan_ascii")
    assert plan.VERSION_RE.fullmatch(ARABIC_INDIC) is None and plan.VERSION_RE.fullmatch("535.309.01")


# --- IPv6 scope ids, wherever an address or network is read ----------------------------------------------------
SCOPE = "IPv6 scope ids (the %... of fe80::1%eth0) are not allowed; give a routable address without one"
SCOPED = ["fe80::1%eth0", "fe80::1%$(touch /tmp/pwned)"]


@pytest.mark.parametrize("address", SCOPED)
@pytest.mark.parametrize("key", ["ansible_host", "ray_node_ip"])
def test_scope_id_in_a_node_address(key, address):
    assert errors(*cluster(worker1={key: address})) == [f"worker1: {key}: {SCOPE}; got {address!r}"]


def test_scope_id_in_a_host_that_is_no_ray_node():
    groups, hostvars = cluster()
    hostvars["nas"] = {"ansible_host": SCOPED[1]}
    groups["all"].append("nas")
    groups["nfs_server"] = ["nas"]
    assert errors(groups, hostvars) == [f"nas: ansible_host: {SCOPE}; got {SCOPED[1]!r}"]


@pytest.mark.parametrize("address", SCOPED)
@pytest.mark.parametrize(("key", "value"), [
    ("firewall_allowed_sources", ["10.0.0.0/24", "{}/64"]),
    ("firewall_ssh_sources", ["{}"]),
    ("firewall_monitoring_sources", ["{}"]),
    ("rayrack_cluster_cidr", "{}/64"),
    ("rayrack_nfs_server", "{}"),
    ("rayrack_head_address", "{}"),
    ("rayrack_ray_dashboard_host", "{}"),
    ("grafana_http_addr", "{}"),
    ("prometheus_listen_address", "[{}]:9090"),
    ("prometheus_alertmanagers", ["[{}]:9093"]),
] + [(name, ["{}"]) for name in NFS_CLIENTS])
def test_scope_id_in_a_variable(key, value, address):
    value = [v.format(address) for v in value] if isinstance(value, list) else value.format(address)
    bad = value[-1] if isinstance(value, list) else value
    assert errors(*everywhere(**{key: value})) == [f"{key}: {SCOPE}; got {bad!r} {ALL}"]


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("firewall_allowed_sources", ["10.0.0.0/24", "head"], "every entry must be an address or a network (CIDR)"),
    ("rayrack_nfs_server", "nas;reboot", "must be an IP address or a host name"),
    ("prometheus_listen_address", "127.0.0.1:9090 --web.enable-admin-api", "must be host:port"),
    ("alertmanager_listen_address", "127.0.0.1:99999", "must be host:port"),
])
def test_addresses_of_the_wrong_form(key, value, allowed):
    (error,) = errors(*everywhere(**{key: value}))
    bad = value[-1] if isinstance(value, list) else value
    assert error.startswith(f"{key}: {allowed}") and error.endswith(f"; got {bad!r} {ALL}")


# --- Port clashes: every port the kit opens -----------------------------------------------------------------
@pytest.mark.parametrize(("values", "expected"), [
    ({"prometheus_node_exporter_port": 9489}, "prometheus_node_exporter_port: port 9489 is also rayrack_agent_port"),
    ({"firewall_node_exporter_port": 8265},
     "firewall_node_exporter_port: port 8265 is also rayrack_ray_dashboard_port"),
    ({"prometheus_listen_address": "127.0.0.1:6379"},
     "prometheus_listen_address: port 6379 is also rayrack_ray_gcs_port"),
    ({"firewall_prometheus_port": 8443}, "firewall_prometheus_port: port 8443 is also rayrack_gateway_port"),
    ({"alertmanager_listen_address": "127.0.0.1:9090"},
     "alertmanager_listen_address: port 9090 is also prometheus_listen_address"),
    ({"grafana_http_port": 9100}, "grafana_http_port: port 9100 is also prometheus_node_exporter_port"),
    ({"firewall_ssh_port": 6379}, "firewall_ssh_port: port 6379 is also rayrack_ray_gcs_port"),
    ({"rayrack_gateway_port": 2049}, "rayrack_gateway_port: port 2049 is also NFS (fixed)"),
    ({"firewall_ssh_port": 2049}, "firewall_ssh_port: port 2049 is also NFS (fixed)"),
    ({"rayrack_agent_port": 10500},
     "rayrack_agent_port: port 10500 lies inside the worker port range rayrack_ray_min_worker_port.."
     "rayrack_ray_max_worker_port, 10002-10999"),
    ({"grafana_http_port": 10002},
     "grafana_http_port: port 10002 lies inside the worker port range rayrack_ray_min_worker_port.."
     "rayrack_ray_max_worker_port, 10002-10999"),
    ({"rayrack_ray_min_worker_port": 2000, "rayrack_ray_max_worker_port": 2999},
     "NFS (fixed): port 2049 lies inside the worker port range rayrack_ray_min_worker_port.."
     "rayrack_ray_max_worker_port, 2000-2999"),
])
def test_port_clash_names_both_keys(values, expected):
    assert errors(*everywhere(**values)) == [f"{expected} {ALL}"]


def test_a_service_and_its_firewall_copy_share_their_port():
    # The default node_exporter and Prometheus ports appear twice (role and firewall): one service, no clash.
    ports = inv.kit_ports({}, SPECS)
    assert ("node_exporter", "prometheus_node_exporter_port", 9100) in ports
    assert ("node_exporter", "firewall_node_exporter_port", 9100) in ports
    assert ("Prometheus", "prometheus_listen_address", 9090) in ports
    assert ("SSH", "firewall_ssh_port", 22) in ports and ("NFS (fixed)", "NFS (fixed)", 2049) in ports
    assert errors(*cluster()) == []


def test_port_clash_on_one_host_names_that_host():
    assert errors(*cluster(worker2={"firewall_ssh_port": 8077})) == [
        "firewall_ssh_port: port 8077 is also rayrack_ray_node_manager_port (on worker2)"]


# --- Paths --------------------------------------------------------------------------------------------------
NODE_RULE = ("must be an absolute path of letters, digits and . _ / - only (^/[A-Za-z0-9._/-]+$): unit files and "
             "command lines on the nodes read it unquoted")
NODE_PATHS = sorted(name for name, spec in SPECS.items()
                    if spec.get("type") == "path" and name not in inv.CONTROLLER_PATHS)


@pytest.mark.parametrize("key", NODE_PATHS)
def test_node_paths_match_the_rule(key):
    path = "/srv/rayrack shared"
    assert errors(*everywhere(**{key: path})) == [f"{key}: {NODE_RULE}; got {path!r} {ALL}"]


@pytest.mark.parametrize("path", ["/srv/rayrack\nExecStartPre=/bin/sh", "srv/relative", "/srv/ray$HOME", "/srv/%h",
                                  "/srv/ray\u00e9", "/srv/\"x\""])
def test_node_path_rule_refuses(path):
    assert errors(*everywhere(rayrack_shared_dir=path)) == [f"rayrack_shared_dir: {NODE_RULE}; got {path!r} {ALL}"]


def test_the_path_rule_covers_the_shared_and_state_directories():
    assert {"rayrack_shared_dir", "rayrack_state_dir", "rayrack_scratch_dir", "rayrack_prefix", "rayrack_venv_dir",
            "rayrack_config_dir", "rayrack_nfs_export", "rayrack_package_dir"} <= set(NODE_PATHS)


@pytest.mark.parametrize("key", sorted(inv.CONTROLLER_PATHS - {"prometheus_extra_rule_files"}))
def test_controller_paths_are_absolute_without_control_characters(key):
    assert errors(*everywhere(**{key: "/home/Jo Smith/rack/.secrets"})) == []
    for bad in ["relative/.secrets", "/home/jo/.secrets\n/etc"]:
        assert errors(*everywhere(**{key: bad})) == [
            f"{key}: must be an absolute path on the controller, without newlines or other control characters; "
            f"got {bad!r} {ALL}"]


def test_cache_environment_names_and_paths():
    assert errors(*everywhere(rayrack_cache_env={"HF_HOME; id": "/srv/rayrack-shared/models"})) == [
        "rayrack_cache_env: every key must be an environment variable name (letters, digits and '_', no digit "
        f"first); got 'HF_HOME; id' {ALL}"]
    assert errors(*everywhere(rayrack_cache_env={"HF_HOME": "/srv/models $(id)"})) == [
        f"rayrack_cache_env[HF_HOME]: {NODE_RULE}; got '/srv/models $(id)' {ALL}"]


# --- Values that would reach a command line, $ARGS or a config file's syntax ------------------------------------------
DURATION = "must be a duration such as 30s, 5m or 4h (units ms, s, m, h, d, w, y)"
URL = "must be empty, or an http(s) URL without spaces or quotes"


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("prometheus_retention_time", "30d --web.enable-admin-api", DURATION),
    ("alertmanager_group_wait", "30s\nreceiver: x", DURATION),
    ("alertmanager_external_url", "http://am --cluster.peer=evil:9094", URL),
    ("rayrack_pip_index_url", "https://mirror/simple\nLD_PRELOAD=/tmp/x.so", URL),
    ("rayrack_ray_user", "ray\nUser=root",
     "must be a Linux user or group name (lowercase letters, digits, '_' and '-')"),
    ("network_tuning_interface", "eth0 mtu 1", "must be empty (found from the node's address), or an interface name "
     "such as eth0"),
    ("firewall_extra_tcp_ports", ["8080", "80 } accept; ip saddr 0.0.0.0/0 accept #"],
     "every entry must be a port or a range low-high such as 8080 or 9000-9010"),
    ("nfs_server_export_options", ["rw", "sync)\n/ *(rw,no_root_squash"],
     "every entry must be an option such as rw or sec=sys (letters, digits and _ . = : / + -)"),
    ("nfs_client_options", ["vers=4.2", "hard\nWhat=evil:/"],
     "every entry must be an option such as rw or sec=sys (letters, digits and _ . = : / + -)"),
])
def test_values_that_would_reach_syntax(key, value, allowed):
    bad = value[-1] if isinstance(value, list) else value
    assert errors(*everywhere(**{key: value})) == [f"{key}: {allowed}; got {bad!r} {ALL}"]


def test_a_user_name_with_a_trailing_newline():
    extra = {"rayrack_users": [{"name": "alice\n"}]}
    found = errors(*cluster(head=extra, worker1=extra, worker2=extra))
    assert found and found[0].startswith("rayrack_users[0].name: must match ")


# --- What ships still validates ----------------------------------------------------------------------------
def test_every_documented_default_passes_its_own_rules():
    problems = {name: inv.check_value(name, spec["default"], spec) for name, spec in SPECS.items()
                if "default" in spec and spec["default"] is not None}
    assert {name: p for name, p in problems.items() if p} == {}


def test_lab_inventory_validates(tmp_path):
    """The inventory `tests/lab/lab.py up` writes, through the validate play as site.yml runs it."""
    lab = labtool.Lab(name="validate", workers=2, subnet=ipaddress.ip_network("10.213.77.0/24"),
                      inventory_dir=tmp_path / "inventory", gpus_per_worker=2)
    lab.key.parent.mkdir(parents=True)
    labtool.write_inventory(lab, {node.name: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKey" for node in lab.nodes})
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="ansible.posix.json", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
               ANSIBLE_CACHE_PLUGIN_CONNECTION=str(tmp_path / ".facts"))
    result = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(lab.inventory_dir),
                             "playbooks/validate.yml"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    report = json.loads(result.stdout)
    assert result.returncode == 0, failure_message(report)
    assert set(report["stats"]) == {"localhost"}


def test_validate_play_refuses_a_risky_value(tmp_path):
    """The same refusal through Ansible's own hostvars (group_vars, templating), before any host is contacted."""
    lab = labtool.Lab(name="validate", workers=1, subnet=ipaddress.ip_network("10.213.78.0/24"),
                      inventory_dir=tmp_path / "inventory", gpus_per_worker=2)
    lab.key.parent.mkdir(parents=True)
    labtool.write_inventory(lab, {node.name: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKey" for node in lab.nodes})
    (lab.inventory_dir / "group_vars" / "all" / "risky.yml").write_text(json.dumps({
        "rayrack_ray_tls": False, "firewall_ssh_port": 2049}))
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="ansible.posix.json", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
               ANSIBLE_CACHE_PLUGIN_CONNECTION=str(tmp_path / ".facts"))
    result = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(lab.inventory_dir),
                             "playbooks/validate.yml"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    report = json.loads(result.stdout)
    assert result.returncode != 0
    message = failure_message(report)
    assert ("rayrack_ray_tls: false sends Ray's gRPC, and the cluster token in every call, in clear text; if that "
            "is meant, say so with rayrack_accept_insecure: [rayrack_ray_tls] (on head, worker1)") in message
    assert "firewall_ssh_port: port 2049 is also NFS (fixed) (on head, worker1)" in message
    assert set(report["stats"]) == {"localhost"}
