"""Inventory validation: every problem in an inventory, each naming its key, before any host is touched.

`rayrack_inventory_errors(groups, hostvars)` returns a list of readable errors (empty when the inventory is
good). Variable types and defaults come from the roles' own meta/argument_specs.yml, so a variable is
described and checked in one place.
"""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

ROLES_DIR = Path(__file__).resolve().parents[2] / "roles"
try:
    from ray_agent import config as agent_config
    from ray_agent.gpu_state import STATE_SETTINGS
    from ray_agent.users import RESERVED_USER_NAMES, USER_NAME, parse_contact
except ImportError:  # Ansible from outside the project's venv: the agent's source sits next to roles/
    import sys

    sys.path.insert(0, str(ROLES_DIR.parent))
    from ray_agent import config as agent_config
    from ray_agent.gpu_state import STATE_SETTINGS
    from ray_agent.users import RESERVED_USER_NAMES, USER_NAME, parse_contact
# The shared tree's rules, beside this file (Ansible does not put filter directories on sys.path).
_tree_spec = importlib.util.spec_from_file_location("rayrack_tree", Path(__file__).with_name("rayrack_tree.py"))
rayrack_tree = importlib.util.module_from_spec(_tree_spec)
_tree_spec.loader.exec_module(rayrack_tree)
CLUSTER_PREFIX = "rayrack_"
HEAD_GROUP = "ray_head"
WORKER_GROUP = "ray_workers"
# Settings of roles that are gone, with the name that replaced each: silently ignored otherwise.
RENAMED = {"ray_head_ready_timeout": "ray_node_ready_timeout"}
# The cluster-wide facts the rayrack role derives for every role (its vars, public names): an inventory that sets
# one would be overridden without a word, so it is refused.
DERIVED = sorted(name for name in yaml.safe_load((ROLES_DIR / "rayrack" / "vars" / "main.yml").read_text())
                 if not name.startswith("_"))
MIN_TOKEN_AUTH_RAY = (2, 52, 0)
# Head fault tolerance: the GCS in an external Redis given by RAY_REDIS_ADDRESS with a password (`ray start`), TLS
# to it (rediss://) and the raylets' reconnect timeout as Ray documents them.
MIN_GCS_FT_RAY = (2, 9, 0)
GCS_STORE_GROUP = "ray_gcs_store"
# The reconnect timeout: long enough for a head restart, short enough that a dead head is noticed.
GCS_RECONNECT_SECONDS = range(10, 3601)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

# Format rules beyond the type: (regex, what is allowed). Every rule is matched ASCII-only (re.ASCII): in Python
# \d and \w also match other scripts' digits and letters ("2.\uff160.0" would pass as a version).
URL = (r"(https?://[A-Za-z0-9._~:/?#\[\]@!&()*+,;=%-]+)?", "empty, or an http(s) URL without spaces or quotes")
DURATION = (r"([0-9]+(ms|s|m|h|d|w|y))+", "a duration such as 30s, 5m or 4h (units ms, s, m, h, d, w, y)")
ACCOUNT = (r"[a-z_][a-z0-9_-]{0,31}", "a Linux user or group name (lowercase letters, digits, '_' and '-')")
FORMATS = {
    "rayrack_ray_version": (r"[0-9]+\.[0-9]+\.[0-9]+", "a pinned Ray release X.Y.Z such as 2.60.0"),
    "rayrack_python_version": (r"auto|3\.[0-9]+",
                               "auto (the head's python3) or a Python minor version 3.Y such as 3.12"),
    "rayrack_cluster_name": (r"[a-z0-9][a-z0-9-]{0,62}", "lowercase letters, digits and '-'"),
    "grafana_version": (r"([0-9]+(\.[0-9]+){1,3})?", "empty, or a Grafana release such as 12.2.1"),
    # These reach unit files, environment files and Debian's $ARGS, which systemd splits at spaces without
    # reading quotes: nothing there can quote a space, a quote or a newline.
    "rayrack_ray_user": ACCOUNT,
    "rayrack_ray_group": ACCOUNT,
    "rayrack_pip_index_url": URL,
    "rayrack_prometheus_url": URL,
    "rayrack_gateway_url": URL,
    "grafana_prometheus_url": URL,
    "alertmanager_external_url": URL,
    "prometheus_retention_time": DURATION,
    "prometheus_scrape_interval": DURATION,
    "alertmanager_group_wait": DURATION,
    "alertmanager_group_interval": DURATION,
    "alertmanager_repeat_interval": DURATION,
    "network_tuning_interface": (r"[A-Za-z0-9_.:-]{0,15}",
                                 "empty (found from the node's address), or an interface name such as eth0"),
}
# Rules for each element of a list variable: (regex, what is allowed).
PINNED_REQUIREMENT = (r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?==[A-Za-z0-9][A-Za-z0-9.+!_-]*",
                      "a pinned requirement NAME==VERSION (or NAME[extra]==VERSION) such as torch==2.13.0")
MOUNT_OPTION = (r"[A-Za-z0-9_.=:/+-]+", "an option such as rw or sec=sys (letters, digits and _ . = : / + -)")
ELEMENT_FORMATS = {
    "firewall_extra_tcp_ports": (r"[0-9]{1,5}(-[0-9]{1,5})?", "a port or a range low-high such as 8080 or 9000-9010"),
    "nfs_client_options": MOUNT_OPTION,
    "nfs_server_export_options": MOUNT_OPTION,
    "rayrack_python_packages": PINNED_REQUIREMENT,
    "rayrack_shared_packages": PINNED_REQUIREMENT,
}
# rayrack_users: each entry's keys and their checks, the name's form (also a Linux login's), the contact's parts.
USER_KEYS = {"name": "a string", "uid": "a login ID 1000-59999 (the same on every node and the shared tree)",
             "contact": "a string", "admin": "a boolean (true/false, unquoted)",
             "max_gpus": "a whole number of GPUs (0 or more), or null for no limit"}
# Regular logins' IDs on Debian and RHEL (login.defs UID_MIN..UID_MAX): system accounts and nobody stay out.
USER_UIDS = range(1000, 60000)
MIN_USER_TOKEN_CHARS = 32
TYPE_NAMES = {"bool": "a boolean (true/false, unquoted)", "int": "an integer", "str": "a string",
              "path": "a path string", "list": "a list", "dict": "a mapping", "raw": "any value"}
# A boolean written as a string: what `-e NAME=true` passes (Ansible reads key=value extra vars as strings).
BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}

# Tokens given by the inventory (e.g. from Ansible Vault), held to the rule of users' tokens. Never printed.
TOKEN_VARIABLES = frozenset({"rayrack_ray_token"})
# The monitoring passwords: empty has them generated; one given is held to the tokens' rule, and to what bcrypt
# reads of it (Prometheus and Alertmanager keep its bcrypt hash).
PASSWORD_VARIABLES = frozenset({"rayrack_prometheus_password", "rayrack_alertmanager_password",
                                "grafana_admin_password", "rayrack_gcs_store_password"})
MAX_PASSWORD_BYTES = 72
# Paths on the nodes (every `type: path` variable) reach unit files unquoted (ReadWritePaths=, RequiresMountsFor=)
# and command lines. Paths on the controller reach only Ansible there, under any home directory.
NODE_PATH = (r"/[A-Za-z0-9._/-]+", "an absolute path of letters, digits and . _ / - only (^/[A-Za-z0-9._/-]+$): "
             "unit files and command lines on the nodes read it unquoted")
CONTROLLER_PATH = (r"/[^\x00-\x1f\x7f]*", "an absolute path on the controller, without newlines or other control "
                   "characters")
CONTROLLER_PATHS = frozenset({"rayrack_wheelhouse_dir", "rayrack_secrets_dir", "rayrack_ca_dir",
                              "rayrack_user_tokens_dir", "gpu_validate_cluster_report", "prometheus_extra_rule_files"})
# rayrack_cache_env: variable name -> node path, exported by a login shell profile and Ray's environment file.
ENV_NAME = (r"[A-Za-z_][A-Za-z0-9_]*", "an environment variable name (letters, digits and '_', no digit first)")

# Where the inventory names addresses, and what each holds: one network (CIDR) or empty, a list of addresses or
# networks, an address or host name (or empty), host:port, or a list of host:port.
ADDRESS_VARIABLES = {
    "rayrack_cluster_cidr": "network", "rayrack_nfs_server": "host", "rayrack_ray_dashboard_host": "host",
    "rayrack_head_address": "host", "ray_agent_listen_host": "host", "grafana_http_addr": "host",
    "prometheus_listen_address": "listen", "alertmanager_listen_address": "listen",
    "prometheus_alertmanagers": "listens",
    "firewall_allowed_sources": "networks", "firewall_ssh_sources": "networks",
    "firewall_monitoring_sources": "networks", "nfs_server_clients": "networks", "rayrack_nfs_clients": "networks",
    "rayrack_serve_allowed_sources": "networks",
}
ADDRESS_ALLOWED = {
    "network": "empty, or a network (CIDR) such as 10.0.0.0/24",
    "networks": "an address or a network (CIDR) such as 10.0.0.0/24",
    "host": "an IP address or a host name (letters, digits, '-' and '.')",
    "listen": "host:port such as 127.0.0.1:9090 ([addr]:port for IPv6)",
    "listens": "host:port such as 127.0.0.1:9093 ([addr]:port for IPv6)",
}
# Python's ipaddress accepts an IPv6 scope id (fe80::1%eth0) and keeps it in str(): the part after % would reach
# unit files and command lines, and a link-local address does not route between nodes anyway.
SCOPE_ID = "IPv6 scope ids (the %... of fe80::1%eth0) are not allowed; give a routable address without one"
HOST_NAME = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"


def _off(value: Any) -> bool:
    return value is False


def _off_loopback(value: Any) -> str | None:
    """A listen address that leaves the host, if it is one."""
    return str(value) if isinstance(value, str) and value and value not in LOOPBACK else None


def _open_to_all(value: Any) -> str | None:
    """The /0 (every address) among a network or a list of them, if any."""
    for entry in value if isinstance(value, list) else [value]:
        try:
            if str(entry).strip() and ipaddress.ip_network(str(entry).strip(), strict=False).prefixlen == 0:
                return str(entry)
        except ValueError:
            continue
    return None


# Settings that open what the kit protects: each passes only when rayrack_accept_insecure names its key.
# key -> (the risky part of a value, or None; what that exposes).
INSECURE = {
    "rayrack_ray_auth_token_enabled": (
        _off, "false turns token authentication off, so anyone who reaches Ray's ports runs code on every node"),
    "rayrack_ray_tls": (_off, "false sends Ray's gRPC, and the cluster token in every call, in clear text"),
    "rayrack_cluster_cidr": (_open_to_all, "{} counts every address as inside the cluster, for the firewall and NFS"),
    "firewall_allowed_sources": (_open_to_all, "{} admits every address to Ray, the agent, Prometheus and NFS"),
    "firewall_monitoring_sources": (_open_to_all, "{} admits every address to the metrics ports and Prometheus"),
    "firewall_ssh_sources": (_open_to_all, "{} admits every address to SSH"),
    "nfs_server_clients": (_open_to_all, "{} lets every address mount the shared tree"),
    "rayrack_nfs_clients": (_open_to_all, "{} lets every address mount the shared tree"),
    "rayrack_serve_allowed_sources": (_open_to_all, "{} lets every address send requests to every model served"),
    "rayrack_ray_dashboard_host": (
        _off_loopback, "{} serves Ray's dashboard and Jobs API beyond the head over plain HTTP, so the cluster "
        "token of every call to it (the agents' state queries, the guard's job stops) crosses the network in clear"),
}
ACCEPT_INSECURE = "rayrack_accept_insecure"

# Every port the kit opens, each service once: the rayrack_*_port variables (each a service of its own, the
# worker port range apart), then these services with the variables that set their port (a port, or host:port;
# a role's and the firewall's copy of it), or a port that cannot be changed.
NFS_PORT = 2049
KIT_PORTS: dict[str, tuple[str, ...] | int] = {
    "NFS (fixed)": NFS_PORT,
    "node_exporter": ("prometheus_node_exporter_port", "firewall_node_exporter_port"),
    "Prometheus": ("prometheus_listen_address", "firewall_prometheus_port"),
    "Alertmanager": ("alertmanager_listen_address", "firewall_alertmanager_port"),
    "Grafana": ("grafana_http_port", "firewall_grafana_port"),
    "SSH": ("firewall_ssh_port",),
}
WORKER_PORTS = ("rayrack_ray_min_worker_port", "rayrack_ray_max_worker_port")


def load_specs(roles_dir: Path = ROLES_DIR) -> dict[str, dict[str, Any]]:
    """Variable name -> its argument spec, from every role's meta/argument_specs.yml (entry point main)."""
    specs: dict[str, dict[str, Any]] = {}
    for path in sorted(roles_dir.glob("*/meta/argument_specs.yml")):
        data = yaml.safe_load(path.read_text()) or {}
        options = data.get("argument_specs", {}).get("main", {}).get("options", {}) or {}
        for name, spec in options.items():
            specs[name] = dict(spec or {}, role=path.parents[1].name)
    return specs


def _type_ok(value: Any, spec: Mapping[str, Any]) -> bool:
    kind = spec.get("type", "str")
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in ("str", "path"):
        return isinstance(value, str)
    if kind == "list":
        return isinstance(value, list) and all(_type_ok(v, {"type": spec.get("elements", "raw")}) for v in value)
    if kind == "dict":
        return isinstance(value, Mapping)
    return True


def _fullmatch(pattern: str, value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(pattern, value, re.ASCII) is not None


def _ip_or_none(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_host(text: str) -> bool:
    return _ip_or_none(text) is not None or (len(text) <= 253 and _fullmatch(HOST_NAME, text))


def listen_port(text: str) -> int | None:
    """The port of host:port ([v6]:port, or :port for every address), or None when it is not one."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]*):([0-9]{1,5})", text, re.ASCII)
    if not match:
        return None
    host, port = match.group(1), int(match.group(2))
    if host.startswith("["):
        host = host[1:-1]
        if not isinstance(_ip_or_none(host), ipaddress.IPv6Address):
            return None
    elif host and not _is_host(host):
        return None
    return port if 1 <= port <= 65535 else None


def _address_ok(kind: str, text: str) -> bool:
    if kind in ("network", "networks"):
        if kind == "network" and not text:
            return True
        try:
            ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            return False
        return True
    if kind == "host":
        return not text or _is_host(text)
    return listen_port(text) is not None


def address_error(name: str, value: Any, kind: str) -> str | None:
    """An address variable (see ADDRESS_VARIABLES) against its kind; None when it is fine."""
    many = kind in ("networks", "listens")
    for item in value if many else [value]:
        if not isinstance(item, str):
            continue  # the type check reports it
        if "%" in item:
            return f"{name}: {SCOPE_ID}; got {item!r}"
        if not _address_ok(kind, item):
            return f"{name}: {'every entry ' if many else ''}must be {ADDRESS_ALLOWED[kind]}; got {item!r}"
    return None


def token_ok(token: Any) -> bool:
    """A token long enough not to be guessed, and without spaces (it travels in a header and a file)."""
    return isinstance(token, str) and len(token.strip()) >= MIN_USER_TOKEN_CHARS and \
        not any(c.isspace() for c in token.strip())


def _token_rule(name: str) -> str:
    return (f"{name}: must be a string of at least {MIN_USER_TOKEN_CHARS} characters without spaces "
            "(e.g. `openssl rand -hex 32`)")


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}"


def _boolean_hint(name: str, value: Any, spec: Mapping[str, Any]) -> str:
    """For a boolean given as a word: the forms that pass a real boolean."""
    if spec.get("type") != "bool" or not isinstance(value, str) or value.strip().lower() not in BOOLEAN_WORDS:
        return ""
    meant = json.dumps({name: BOOLEAN_WORDS[value.strip().lower()]})
    return (f"; -e NAME=VALUE (like a quoted value) gives a string: write it unquoted in the inventory, "
            f"or pass -e '{meant}'")


def check_value(name: str, value: Any, spec: Mapping[str, Any]) -> str | None:
    """One variable against its spec; None when it is fine."""
    if not _type_ok(value, spec):
        wanted = TYPE_NAMES.get(spec.get("type", "str"), spec.get("type"))
        if spec.get("type") == "list" and isinstance(value, list):
            wanted = f"a list of {TYPE_NAMES.get(spec.get('elements', 'raw'), 'values')}"
        # A secret's value never reaches the output, even a mistyped one.
        got = type(value).__name__ if spec.get("no_log") else _describe(value)
        return f"{name}: must be {wanted}, got {got}{_boolean_hint(name, value, spec)}"
    if name in TOKEN_VARIABLES:
        return None if token_ok(value) else _token_rule(name)
    if name in PASSWORD_VARIABLES and value != "":
        if token_ok(value) and len(value.strip().encode()) <= MAX_PASSWORD_BYTES:
            return None
        return (f"{name}: empty to have it generated, or a string of {MIN_USER_TOKEN_CHARS} characters up to "
                f"{MAX_PASSWORD_BYTES} bytes without spaces (bcrypt reads no more; e.g. `openssl rand -hex 20`)")
    if "choices" in spec and value not in spec["choices"]:
        return f"{name}: must be one of {', '.join(map(str, spec['choices']))}; got {value!r}"
    if name in FORMATS:
        pattern, allowed = FORMATS[name]
        if not _fullmatch(pattern, value):
            return f"{name}: must be {allowed}; got {value!r}"
    if name in ELEMENT_FORMATS:
        pattern, allowed = ELEMENT_FORMATS[name]
        for item in value:
            if not _fullmatch(pattern, item):
                return f"{name}: every entry must be {allowed}; got {item!r}"
    if name in ADDRESS_VARIABLES:
        error = address_error(name, value, ADDRESS_VARIABLES[name])
        if error:
            return error
    if spec.get("type") == "path" or (spec.get("type") == "list" and spec.get("elements") == "path"):
        pattern, allowed = CONTROLLER_PATH if name in CONTROLLER_PATHS else NODE_PATH
        for item in value if isinstance(value, list) else [value]:
            if item and not _fullmatch(pattern, item):
                return f"{name}: {'every entry ' if isinstance(value, list) else ''}must be {allowed}; got {item!r}"
    if name == "rayrack_cache_env":
        for key, path in value.items():
            if not _fullmatch(ENV_NAME[0], key):
                return f"{name}: every key must be {ENV_NAME[1]}; got {key!r}"
            if not _fullmatch(NODE_PATH[0], path):
                return f"{name}[{key}]: must be {NODE_PATH[1]}; got {path!r}"
    if name == "rayrack_gcs_reconnect_timeout" and value not in GCS_RECONNECT_SECONDS:
        return (f"{name}: must be {GCS_RECONNECT_SECONDS.start}-{GCS_RECONNECT_SECONDS.stop - 1} seconds (how long "
                f"workers wait for a restarting head); got {value}")
    if name.endswith("_port") and not 1 <= value <= 65535:
        return f"{name}: must be a port number 1-65535; got {value}"
    return None


def _user_value_ok(key: str, value: Any) -> bool:
    if key in ("name", "contact"):
        return isinstance(value, str)
    if key == "admin":
        return isinstance(value, bool)
    if key == "uid":
        return isinstance(value, int) and not isinstance(value, bool) and value in USER_UIDS
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def users_errors(users: list[Mapping[str, Any]], tokens: Mapping[str, Any], admin_gid: Any = None) -> list[str]:
    """rayrack_users (a list of mappings) and rayrack_user_tokens (a mapping): each problem naming its entry.
    admin_gid: rayrack_admin_gid, which no user's own group (gid = uid) may take."""
    errors: list[str] = []
    first: dict[str, int] = {}
    uids: dict[int, int] = {}
    for index, user in enumerate(users):
        where = f"rayrack_users[{index}]"
        for key in user:
            if key not in USER_KEYS:
                close = difflib.get_close_matches(str(key), list(USER_KEYS), n=1)
                hint = f"; did you mean {close[0]}?" if close else f"; the keys are {', '.join(USER_KEYS)}"
                errors.append(f"{where}: unknown key {key!r}{hint}")
            elif not _user_value_ok(key, user[key]):
                errors.append(f"{where}.{key}: must be {USER_KEYS[key]}, got {_describe(user[key])}")
        name = user.get("name")
        if "name" not in user:
            errors.append(f"{where}: has no name")
        elif isinstance(name, str) and not USER_NAME.fullmatch(name):
            errors.append(f"{where}.name: must match {USER_NAME.pattern} (lowercase letter first, then lowercase "
                          f"letters, digits, '_' or '-', 32 at most); got {name!r}")
        elif name in RESERVED_USER_NAMES:
            errors.append(f"{where}.name: {name!r} is reserved for jobs submitted around the gateway")
        elif isinstance(name, str) and name in first:
            errors.append(f"rayrack_users[{first[name]}] and {where} are both {name}")
        elif isinstance(name, str):
            first[name] = index
        uid = user.get("uid")
        if "uid" not in user:
            errors.append(f"{where}: has no uid; give each user the numeric ID their files have on every node and "
                          f"the shared tree (1000-59999)")
        elif _user_value_ok("uid", uid):
            if uid in uids:
                errors.append(f"rayrack_users[{uids[uid]}] and {where} both have uid {uid}")
            elif uid == admin_gid:
                errors.append(f"{where}.uid: {uid} is rayrack_admin_gid; a user's own group takes the uid as its ID")
            uids.setdefault(uid, index)
        contact = user.get("contact")
        if isinstance(contact, str):
            try:
                parse_contact(contact)
            except ValueError as err:
                errors.append(f"{where}.contact: {err}")
    for name, token in tokens.items():
        # Never the token itself in a message: only which user's and what is wrong with it.
        if name not in first:
            errors.append(f"rayrack_user_tokens: {name!r} is not a name in rayrack_users")
        elif not token_ok(token):
            errors.append(_token_rule(f"rayrack_user_tokens[{name}]"))
    return errors


def _known_prefixes(specs: Mapping[str, Mapping[str, Any]]) -> set[str]:
    return {CLUSTER_PREFIX} | {spec["role"] + "_" for spec in specs.values()}


def _resolve(host_vars: Mapping[str, Any], name: str) -> tuple[Any, str | None]:
    try:
        return host_vars[name], None
    except Exception as exc:
        return None, f"{name}: cannot be resolved: {exc}"


def _host_address(host: str, host_vars: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The IP Ray uses for a node: ray_node_ip, else ansible_host. (address, error)."""
    for key in ("ray_node_ip", "ansible_host"):
        if key in host_vars:
            value, error = _resolve(host_vars, key)
            if error:
                return None, f"{host}: {error}"
            if "%" in str(value):
                return None, _scope_id_error(host, key, value)
            try:
                return str(ipaddress.ip_address(str(value))), None
            except ValueError:
                return None, (f"{host}: {key} must be the IP address Ray should use for this node; "
                              f"got {value!r}")
    return None, (f"{host}: has no address: set ansible_host (or ray_node_ip) to the IP address Ray "
                  "should use for this node")


def _scope_id_error(host: str, key: str, value: Any) -> str:
    return f"{host}: {key}: {SCOPE_ID}; got {value!r}"


def _setting(host_vars: Mapping[str, Any], specs: Mapping[str, Mapping[str, Any]], name: str) -> Any:
    """A variable as a host sees it: its inventory value, else the documented default (role defaults are not in
    hostvars here); None when it has neither."""
    if name in host_vars:
        return host_vars[name]
    return (specs.get(name) or {}).get("default")


def kit_ports(host_vars: Mapping[str, Any], specs: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, int]]:
    """The ports the kit opens on a host, from KIT_PORTS: (service, the variable that sets it, port)."""
    ports = []
    for service, source in KIT_PORTS.items():
        if isinstance(source, int):
            ports.append((service, service, source))
    for name in sorted(specs):
        if name.startswith(CLUSTER_PREFIX) and name.endswith("_port") and name not in WORKER_PORTS:
            port = _setting(host_vars, specs, name)
            if isinstance(port, int):
                ports.append((name, name, port))
    for service, source in KIT_PORTS.items():
        for name in () if isinstance(source, int) else source:
            if name not in specs:
                continue
            value = _setting(host_vars, specs, name)
            port = listen_port(value) if isinstance(value, str) else value
            if isinstance(port, int):
                ports.append((service, name, port))
    return ports


def _port_errors(host_vars: Mapping[str, Any], specs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Two services on one port, or a service inside Ray's worker port range, each naming both variables."""
    errors = []
    ports = kit_ports(host_vars, specs)
    seen: dict[int, tuple[str, str]] = {}
    for service, name, port in ports:
        if port in seen and seen[port][0] != service:
            errors.append(f"{name}: port {port} is also {seen[port][1]}")
        seen.setdefault(port, (service, name))
    low, high = (_setting(host_vars, specs, name) for name in WORKER_PORTS)
    if isinstance(low, int) and isinstance(high, int):
        if low >= high:
            errors.append(f"{WORKER_PORTS[0]}: must be below {WORKER_PORTS[1]} ({low} >= {high})")
        for _, name, port in ports:
            if low <= port <= high:
                errors.append(f"{name}: port {port} lies inside the worker port range {WORKER_PORTS[0]}.."
                              f"{WORKER_PORTS[1]}, {low}-{high}")
    return errors


def _insecure_errors(host_vars: Mapping[str, Any], specs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Each setting that opens what the kit protects, unless rayrack_accept_insecure names it; and names there
    that are no such setting."""
    errors = []
    known = [name for name in INSECURE if name in specs]
    accepted = _setting(host_vars, specs, ACCEPT_INSECURE) or []
    for name in accepted:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"the settings it takes are {', '.join(known)}"
            errors.append(f"{ACCEPT_INSECURE}: {name!r} is not a setting that needs it; {hint}")
    for name in known:
        risky, exposes = INSECURE[name]
        found = risky(_setting(host_vars, specs, name))
        if found and name not in accepted:
            errors.append(f"{name}: {exposes.format(found)}; if that is meant, say so with "
                          f"{ACCEPT_INSECURE}: [{name}]")
    return errors


def _group(groups: Mapping[str, Iterable[str]], name: str) -> list[str]:
    return list(groups.get(name) or [])


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _gcs_ft_errors(groups: Mapping[str, Iterable[str]], cluster: Mapping[str, Any]) -> list[str]:
    """Head fault tolerance: one Redis, and a Ray that supports it."""
    stores = _group(groups, GCS_STORE_GROUP)
    if not cluster.get("rayrack_gcs_ft"):
        return [f"group {GCS_STORE_GROUP}: holds {', '.join(stores)}, but rayrack_gcs_ft is false; set it to true, "
                "or remove the group"] if stores else []
    errors = []
    if GCS_STORE_GROUP in groups and not stores:
        errors.append(f"rayrack_gcs_ft: true needs a Redis host, but group {GCS_STORE_GROUP} is empty; put one host in "
                      "it, or remove the group to run Redis on the head")
    if len(stores) > 1:
        errors.append(f"group {GCS_STORE_GROUP}: must hold one host (rayrack runs one Redis, without replicas); found "
                      f"{len(stores)} ({', '.join(stores)})")
    version = cluster.get("rayrack_ray_version")
    if version and _version_tuple(version) < MIN_GCS_FT_RAY:
        errors.append(f"rayrack_gcs_ft: true needs Ray >= {'.'.join(map(str, MIN_GCS_FT_RAY))} (an external Redis "
                      f"with a password and TLS); rayrack_ray_version is {version}")
    return errors


def rayrack_inventory_errors(groups: Mapping[str, Iterable[str]], hostvars: Mapping[str, Mapping[str, Any]],
                             specs: Mapping[str, Mapping[str, Any]] | None = None,
                             derived: Mapping[str, Any] | None = None) -> list[str]:
    """derived: defaults that are templates of other settings (rayrack_package_dir), as the play resolved them."""
    specs = load_specs() if specs is None else specs
    prefixes = _known_prefixes(specs)
    errors: list[str] = []

    heads, workers = _group(groups, HEAD_GROUP), _group(groups, WORKER_GROUP)
    if len(heads) != 1:
        found = ", ".join(heads) if heads else "none"
        errors.append(f"group {HEAD_GROUP}: must hold exactly one host; found {len(heads)} ({found})")
    for host in sorted(set(heads) & set(workers)):
        errors.append(f"{host}: is in both {HEAD_GROUP} and {WORKER_GROUP}; a node is the head or a worker")

    # Variables: the same bad value set in group_vars is reported once, with the hosts it applies to.
    bad: dict[str, list[str]] = {}
    for host in _group(groups, "all"):
        host_vars = hostvars[host]
        for name in sorted(set(host_vars) & set(RENAMED)):
            bad.setdefault(f"{name}: renamed to {RENAMED[name]}", []).append(host)
        for name in sorted(set(host_vars) & set(DERIVED)):
            bad.setdefault(f"{name}: derived by the rayrack role from other settings; remove it from the inventory",
                           []).append(host)
        for name in sorted(k for k in host_vars if any(k.startswith(p) for p in prefixes)):
            if name in DERIVED:
                continue
            if name not in specs:
                close = difflib.get_close_matches(name, list(specs), n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                bad.setdefault(f"{name}: unknown variable{hint}", []).append(host)
                continue
            value, error = _resolve(host_vars, name)
            error = error or check_value(name, value, specs[name])
            if error:
                bad.setdefault(error, []).append(host)
    for error, hosts in bad.items():
        errors.append(f"{error} (on {', '.join(hosts)})")
    if bad:
        return errors  # the checks below rely on well-typed values

    # Per host, as each one will use them: its own addresses, then what it opens.
    per_host: dict[str, list[str]] = {}
    for host in _group(groups, "all"):
        host_vars = hostvars[host]
        for key in ("ansible_host", "ray_node_ip"):
            value, _ = _resolve(host_vars, key) if key in host_vars else (None, None)
            if isinstance(value, str) and "%" in value:
                errors.append(_scope_id_error(host, key, value))
        agent = agent_config_errors(host_vars, specs) if host in heads + workers else []
        for error in _insecure_errors(host_vars, specs) + _port_errors(host_vars, specs) + agent:
            per_host.setdefault(error, []).append(host)
    for error, hosts in per_host.items():
        errors.append(f"{error} (on {', '.join(hosts)})")

    addresses: dict[str, str] = {}
    for host in heads + [w for w in workers if w not in heads]:
        address, error = _host_address(host, hostvars[host])
        if error:
            errors.append(error)
        elif address in addresses:
            errors.append(f"{host}: address {address} is also {addresses[address]}'s; every node needs its own")
        else:
            addresses[address] = host

    anchor = heads[0] if heads else next(iter(_group(groups, "all")), None)
    if anchor is None:
        return errors
    # Cluster-wide values: the inventory's, else the documented default (role defaults are not in hostvars here).
    cluster = {name: spec["default"] for name, spec in specs.items() if name.startswith(CLUSTER_PREFIX)
               and "default" in spec}
    cluster.update(derived or {})
    cluster.update({k: v for k, v in hostvars[anchor].items() if k.startswith(CLUSTER_PREFIX)})
    cidr = cluster.get("rayrack_cluster_cidr", "")
    if cidr:
        network = ipaddress.ip_network(cidr, strict=False)  # its form was checked with the variables
        for address, host in addresses.items():
            if ipaddress.ip_address(address) not in network:
                errors.append(f"{host}: address {address} is outside rayrack_cluster_cidr {cidr}")

    version = cluster.get("rayrack_ray_version")
    if cluster.get("rayrack_ray_auth_token_enabled") and version and \
            _version_tuple(version) < MIN_TOKEN_AUTH_RAY:
        errors.append(f"rayrack_ray_version: token authentication needs Ray >= 2.52.0; got {version} (or turn it "
                      f"off: rayrack_ray_auth_token_enabled: false, with {ACCEPT_INSECURE}: "
                      "[rayrack_ray_auth_token_enabled])")

    errors.extend(_gcs_ft_errors(groups, cluster))

    shared, packages = cluster.get("rayrack_shared_dir"), cluster.get("rayrack_package_dir")
    if shared and packages and not str(packages).startswith(str(shared).rstrip("/") + "/"):
        errors.append(f"rayrack_package_dir: must lie inside rayrack_shared_dir ({shared}), where every node sees "
                      f"it; got {packages!r}")
    elif shared and packages and str(packages)[len(str(shared).rstrip("/")) + 1:].strip("/") in \
            cluster.get("rayrack_shared_layout", []):
        errors.append(f"rayrack_package_dir: {packages} is one of rayrack_shared_layout, which the admin group "
                      "writes; keep it root's alone, so pip installs only what root put there")
    errors.extend(rayrack_tree.layout_errors(cluster.get("rayrack_shared_layout") or []))
    # Caches every login and job trusts: only where no user or job writes (the admin-curated layout, packages).
    trusted = [f"{str(shared).rstrip('/')}/{entry}" for entry in cluster.get("rayrack_shared_layout") or []]
    trusted += [str(packages)] if packages else []
    for name, path in sorted((cluster.get("rayrack_cache_env") or {}).items()):
        if not any(str(path) == t or str(path).startswith(t.rstrip("/") + "/") for t in trusted):
            errors.append(f"rayrack_cache_env: {name} points at {path!r}, which users or jobs may write; point it into "
                          f"rayrack_shared_layout or rayrack_package_dir ({', '.join(trusted)}), or leave it out "
                          "(each login then caches in its own home)")
    if cluster.get("rayrack_shared_packages") and cluster.get("rayrack_nfs_server"):
        errors.append("rayrack_shared_packages: rayrack does not write into an existing NAS (rayrack_nfs_server); "
                      f"copy the wheels into {packages or 'the package directory'} on the NAS as root, and leave "
                      "rayrack_shared_packages empty")

    errors.extend(users_errors(cluster.get("rayrack_users") or [], cluster.get("rayrack_user_tokens") or {},
                               cluster.get("rayrack_admin_gid")))

    # The idle guard stops jobs through the Jobs API on the head: workers must be able to reach it.
    dashboard = cluster.get("rayrack_ray_dashboard_host")
    stoppers = [h for h in workers if hostvars[h].get("ray_agent_guard_enabled")
                and hostvars[h].get("ray_agent_guard_stop_after") is not None]
    if stoppers and dashboard in LOOPBACK:
        errors.append(f"ray_agent_guard_stop_after: stopping Ray jobs from {', '.join(stoppers)} needs the Jobs API "
                      f"there, but rayrack_ray_dashboard_host is {dashboard}; set it to the head's cluster address, "
                      f"and name it in {ACCEPT_INSECURE} (the Jobs API is plain HTTP)")
    return list(dict.fromkeys(errors))  # a node's address is read twice: by its own name and as a Ray node


AGENT_PREFIX = "ray_agent_"
# The ray_agent role's variables that are none of the agent's settings: the role derives settings from them.
AGENT_ROLE_VARIABLES = frozenset({"ray_agent_listen_host", "ray_agent_guard_webhook_url", "ray_agent_extra_config"})


def agent_setting(name: str) -> str | None:
    """The agent's setting (dotted path) a ray_agent_* variable sets: ray_agent_ and one of
    ray_agent.config.SETTING_NAMES (ray_agent_guard_window: guard.window); None for any other name."""
    return agent_config.SETTING_NAMES.get(name.removeprefix(AGENT_PREFIX)) if name.startswith(AGENT_PREFIX) else None


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        current = merged.get(key)
        merged[key] = _merge(current, value) if isinstance(current, Mapping) and isinstance(value, Mapping) else value
    return merged


def rayrack_agent_config(variables: Mapping[str, Any], derived: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The agent's configuration file: each ray_agent_* variable that names a setting (agent_setting), then the
    settings the role derives (dotted paths), then ray_agent_extra_config over all. An empty string is the agent's
    default; a section that is off (enabled: false) holds only what the agent reads of it still, and the scenario
    only the fake backend."""
    flat = {path: None if value == "" else value for name, value in variables.items()
            if (path := agent_setting(name)) is not None}
    flat.update(derived or {})
    # A section that is off keeps only what the agent still reads: the guard's settings judge each GPU's state.
    kept = {"attribution": ("enabled",), "guard": ("enabled", *STATE_SETTINGS)}
    for section, keys in kept.items():
        if flat.get(f"{section}.enabled") is False:
            flat = {path: value for path, value in flat.items() if not path.startswith(f"{section}.")
                    or path.split(".", 1)[1] in keys}
    if flat.get("gpu.backend", agent_config.GpuConfig().backend) != "fake":
        flat.pop("gpu.fake_scenario", None)
    return _merge(agent_config.nest(flat), variables.get(f"{AGENT_PREFIX}extra_config") or {})


def _flatten(document: Mapping[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, value in document.items():
        paths.add(prefix + str(key))
        if isinstance(value, Mapping):
            paths |= _flatten(value, f"{prefix}{key}.")
    return paths


def agent_config_errors(host_vars: Mapping[str, Any], specs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The agent's own validation of the configuration the ray_agent role would write for a host, its files apart
    (they are on the node): the error names the variable that sets the key at fault."""
    variables = {name: _setting(host_vars, specs, name) for name, spec in specs.items() if spec["role"] == "ray_agent"}
    try:
        agent_config.build_config(rayrack_agent_config(variables), "ray-agent.yml", local_files=False)
    except agent_config.ConfigError as err:
        extra = variables.get(f"{AGENT_PREFIX}extra_config") or {}
        if err.key in _flatten(extra):
            return [f"{AGENT_PREFIX}extra_config: {err.key}: {err.reason}"]
        names = [name for name in variables if agent_setting(name) == err.key]
        where = f"{names[0]} (the agent's {err.key})" if names else f"the agent's {err.key or 'configuration'}"
        return [f"{where}: {err.reason}"]
    return []


def rayrack_node_addresses(groups: Mapping[str, Iterable[str]], hostvars: Mapping[str, Mapping[str, Any]]
                           ) -> dict[str, str]:
    """Ray node inventory name -> the IP Ray uses for it (head first). Assumes a validated inventory."""
    heads = _group(groups, HEAD_GROUP)
    nodes = heads + [w for w in _group(groups, WORKER_GROUP) if w not in heads]
    return {host: _host_address(host, hostvars[host])[0] for host in nodes}


def rayrack_gpu_workers(groups: Mapping[str, Iterable[str]], hostvars: Mapping[str, Mapping[str, Any]]
                        ) -> dict[str, str]:
    """Workers that offer GPUs to Ray -> their IP: ray_node_num_gpus from the inventory, else the GPU fact."""
    addresses = rayrack_node_addresses(groups, hostvars)
    workers = {}
    for host in _group(groups, WORKER_GROUP):
        host_vars = hostvars[host]
        if "ray_node_num_gpus" in host_vars:
            gpus = int(host_vars["ray_node_num_gpus"])
        else:
            local_facts = (host_vars.get("ansible_facts") or {}).get("ansible_local") or {}
            gpus = int(local_facts.get("gpus", {}).get("count", 0))
        if gpus > 0:
            workers[host] = addresses[host]
    return workers


def rayrack_alive_node_ips(nodes_response: Mapping[str, Any]) -> list[str]:
    """IPs of the ALIVE nodes in a registered uri result of Ray's state API GET /api/v0/nodes."""
    payload = nodes_response.get("json") or {}
    rows = ((payload.get("data") or {}).get("result") or {}).get("result") or []
    return sorted({row["node_ip"] for row in rows if row.get("state") == "ALIVE" and row.get("node_ip")})


def rayrack_is_loopback(host: str) -> bool:
    """Whether a listen address keeps a service on its own host (the dashboard's default)."""
    return str(host) in LOOPBACK


# Listen hosts that mean every address of the host.
WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def rayrack_local_address(listen: str) -> str:
    """host:port where a client on the same host reaches a server listening on `listen` (host:port): loopback
    for a wildcard host, else the host it listens on."""
    host, _, port = str(listen).rpartition(":")
    return f"{'127.0.0.1' if host in WILDCARD_HOSTS else host}:{port}"


def rayrack_cert_sans(names: Iterable[Any]) -> list[str]:
    """A certificate's subjectAltName entries for a node's addresses and names: IP:... or DNS:..., each once."""
    sans: list[str] = []
    for name in names:
        if not name:
            continue
        try:
            entry = f"IP:{ipaddress.ip_address(str(name))}"
        except ValueError:
            entry = f"DNS:{name}"
        if entry not in sans:
            sans.append(entry)
    return sans


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"rayrack_inventory_errors": rayrack_inventory_errors, "rayrack_node_addresses": rayrack_node_addresses,
                "rayrack_is_loopback": rayrack_is_loopback, "rayrack_local_address": rayrack_local_address,
                "rayrack_alive_node_ips": rayrack_alive_node_ips, "rayrack_gpu_workers": rayrack_gpu_workers,
                "rayrack_cert_sans": rayrack_cert_sans, "rayrack_agent_config": rayrack_agent_config}
