"""Inventory validation: every problem in an inventory, each naming its key, before any host is touched.

`rayrack_inventory_errors(groups, hostvars)` returns a list of readable errors (empty when the inventory is
good). Variable types and defaults come from the roles' own meta/argument_specs.yml, so a variable is
described and checked in one place.
"""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

ROLES_DIR = Path(__file__).resolve().parents[2]
try:
    from ray_agent.users import RESERVED_USER_NAMES, USER_NAME, parse_contact
except ImportError:  # Ansible from outside the project's venv: the agent's source sits next to roles/
    import sys

    sys.path.insert(0, str(ROLES_DIR.parent))
    from ray_agent.users import RESERVED_USER_NAMES, USER_NAME, parse_contact
# The shared tree's rules, beside this file (Ansible does not put filter directories on sys.path).
_tree_spec = importlib.util.spec_from_file_location("rayrack_tree", Path(__file__).with_name("rayrack_tree.py"))
rayrack_tree = importlib.util.module_from_spec(_tree_spec)
_tree_spec.loader.exec_module(rayrack_tree)
CLUSTER_PREFIX = "rayrack_"
HEAD_GROUP, WORKER_GROUP = "ray_head", "ray_workers"
MIN_TOKEN_AUTH_RAY = (2, 52, 0)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

# Format rules beyond the type: (regex, what is allowed).
FORMATS = {
    "rayrack_ray_version": (r"\d+\.\d+\.\d+", "a pinned Ray release X.Y.Z such as 2.60.0"),
    "rayrack_python_version": (r"auto|3\.\d+", "auto (the head's python3) or a Python minor version 3.Y such as 3.12"),
    "rayrack_cluster_name": (r"[a-z0-9][a-z0-9-]{0,62}", "lowercase letters, digits and '-'"),
}
# Rules for each element of a list variable: (regex, what is allowed).
PINNED_REQUIREMENT = (r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?==[A-Za-z0-9][A-Za-z0-9.+!_-]*",
                      "a pinned requirement NAME==VERSION (or NAME[extra]==VERSION) such as torch==2.13.0")
ELEMENT_FORMATS = {
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


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}"


def check_value(name: str, value: Any, spec: Mapping[str, Any]) -> str | None:
    """One variable against its spec; None when it is fine."""
    if not _type_ok(value, spec):
        wanted = TYPE_NAMES.get(spec.get("type", "str"), spec.get("type"))
        if spec.get("type") == "list" and isinstance(value, list):
            wanted = f"a list of {TYPE_NAMES.get(spec.get('elements', 'raw'), 'values')}"
        # A secret's value never reaches the output, even a mistyped one.
        got = type(value).__name__ if spec.get("no_log") else _describe(value)
        return f"{name}: must be {wanted}, got {got}"
    if "choices" in spec and value not in spec["choices"]:
        return f"{name}: must be one of {', '.join(map(str, spec['choices']))}; got {value!r}"
    if name in FORMATS:
        pattern, allowed = FORMATS[name]
        if not re.fullmatch(pattern, value):
            return f"{name}: must be {allowed}; got {value!r}"
    if name in ELEMENT_FORMATS:
        pattern, allowed = ELEMENT_FORMATS[name]
        for item in value:
            if not re.fullmatch(pattern, item):
                return f"{name}: every entry must be {allowed}; got {item!r}"
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
        elif isinstance(name, str) and not USER_NAME.match(name):
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
        elif not isinstance(token, str) or len(token.strip()) < MIN_USER_TOKEN_CHARS or \
                any(c.isspace() for c in token.strip()):
            errors.append(f"rayrack_user_tokens[{name}]: must be a string of at least {MIN_USER_TOKEN_CHARS} "
                          "characters without spaces (e.g. `openssl rand -hex 32`)")
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
            try:
                return str(ipaddress.ip_address(str(value))), None
            except ValueError:
                return None, (f"{host}: {key} must be the IP address Ray should use for this node; "
                              f"got {value!r}")
    return None, (f"{host}: has no address: set ansible_host (or ray_node_ip) to the IP address Ray "
                  "should use for this node")


def _group(groups: Mapping[str, Iterable[str]], name: str) -> list[str]:
    return list(groups.get(name) or [])


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


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
        for name in sorted(k for k in host_vars if any(k.startswith(p) for p in prefixes)):
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
        try:
            network = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            errors.append(f"rayrack_cluster_cidr: must be a network such as 10.0.0.0/24; got {cidr!r}")
        else:
            for address, host in addresses.items():
                if ipaddress.ip_address(address) not in network:
                    errors.append(f"{host}: address {address} is outside rayrack_cluster_cidr {cidr}")

    version = cluster.get("rayrack_ray_version")
    if cluster.get("rayrack_ray_auth_token_enabled") and version and \
            _version_tuple(version) < MIN_TOKEN_AUTH_RAY:
        errors.append(f"rayrack_ray_version: token authentication needs Ray >= 2.52.0; got {version} "
                      "(or set rayrack_ray_auth_token_enabled: false)")

    ports = {name: cluster[name] for name in specs if name.startswith(CLUSTER_PREFIX) and name.endswith("_port")
             and name in cluster and "worker_port" not in name}
    seen: dict[int, str] = {}
    for name, port in sorted(ports.items()):
        if port in seen:
            errors.append(f"{name}: port {port} is also {seen[port]}")
        seen[port] = name
    low, high = cluster.get("rayrack_ray_min_worker_port"), cluster.get("rayrack_ray_max_worker_port")
    if low is not None and high is not None:
        if low >= high:
            errors.append(f"rayrack_ray_min_worker_port: must be below rayrack_ray_max_worker_port ({low} >= {high})")
        for name, port in ports.items():
            if low <= port <= high:
                errors.append(f"{name}: port {port} lies inside the worker port range {low}-{high}")

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
                      f"there, but rayrack_ray_dashboard_host is {dashboard}; set it to the head's cluster address "
                      "(token authentication protects it)")
    return errors


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
                "rayrack_is_loopback": rayrack_is_loopback,
                "rayrack_alive_node_ips": rayrack_alive_node_ips, "rayrack_gpu_workers": rayrack_gpu_workers,
                "rayrack_cert_sans": rayrack_cert_sans}
