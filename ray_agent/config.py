"""The agent's configuration: one frozen dataclass tree, loaded and validated here and nowhere else.

Example (every key optional)::

    web:
      listen_address: "10.0.0.5:9489"   # HOST:PORT, HOST, or :PORT; HOST defaults to the default-route IP
      tls:                              # optional; both files, or neither
        cert_file: /etc/ray-agent/tls.crt
        key_file: /etc/ray-agent/tls.key
        client_ca_file: /etc/ray-agent/ca.crt   # optional
        client_auth_required: false
    collection:
      interval: 5s                      # how often GPUs and the host are read
      call_timeout: 2s                  # how long one GPU read (or init) may take before it is abandoned
      backend_retry_interval: 30s       # how often a failed GPU library is initialised again
    gpu:
      backend: nvml                     # nvml | fake
      fake_scenario: null               # fake only (and then required): a path relative to this file,
                                        # or builtin:NAME (builtin:demo-8gpu) for a scenario shipped with the agent
    host:
      proc_path: /proc
    attribution:
      enabled: true
      dashboard_url: http://127.0.0.1:8265
      token_file: /etc/ray/auth_token   # optional; sent as "Authorization: Bearer <token>"
      state_api: true                   # ask dashboard_url's state API for actor and task names (and, without a
                                        # gateway, its Jobs API for the jobs' owners); false where it is unreachable
      gateway_url: null                 # rayrack-gateway (https://HEAD:8443): the jobs' owners, with the token
      ca_file: null                     # the CA that signed the gateway's certificate (default: system CAs)
      ttl: 10s                          # how often Ray's state is fetched
      request_timeout: 2s
      node_ip: null                     # this node's Ray address; default: the listen host
    users:                              # the cluster's users (rayrack_users): contacts for guard notices, limits
      - name: alice
        contact: alice@example.org U0123ABCD   # e-mail address and/or Slack member id (ray_agent.users)
        max_gpus: 2                     # optional; rayrack_user_max_gpus, for the over-limit alert
    exporter:
      dcgm_compat: false                # also export dcgm-exporter metric names and labels
      hostname: null                    # Hostname label of dcgm names; default: this host's name
      process_metrics: true             # the agent's own process_* metrics
    guard:                              # the idle-GPU guard (see ray_agent/guard); off unless enabled, but its
                                        # idle_threshold, signal, window, min_samples and max_gap define each
                                        # GPU's state (ray_agent.gpu_state) either way
      enabled: false
      dry_run: true                     # decide and audit, but never stop a job or kill a process
      idle_threshold: 0.05              # activity ratio below which a held GPU counts as idle
      signal: auto                      # the activity compared: utilization (NVML's "a kernel was running"),
                                        # sm_active (GPM's SM activity; GPUs without GPM are then unknown), or
                                        # auto: sm_active where the GPU reports GPM, else utilization
      window: 30m                       # a held GPU idle for this long becomes idle_held
      min_samples: 3                    # ... and only after at least this many idle samples
      max_gap: 2m                       # unobserved time longer than this (stalls, restarts) restarts the clock
      stages:                           # delays after the GPU became idle_held; null turns a stage off
        notify_after: 0s                # log line, metrics, webhook
        stop_after: null                # stop the Ray job through the Jobs API (attribution's URL and token)
        kill_after: null                # SIGTERM the holding processes, SIGKILL after kill_grace
        kill_grace: null                # required with kill_after
      webhook_url_file: null            # a file holding a Slack-compatible webhook URL, or
      webhook_url_env: null             # the name of an environment variable holding it
      webhook_retries: 3                # retries after a failed delivery, with doubling backoff
      webhook_backoff: 1s               # first retry delay
      request_timeout: 5s               # per webhook / Jobs API request
      allow_users: []                   # Linux users never acted on (fnmatch patterns)
      allow_job_patterns: []            # matched against submission id, job id, entrypoint, metadata name
      allow_processes: []               # matched against the process name (comm) and argv[0]'s base name
      opt_out_metadata_key: rayrack.idle_guard   # job metadata {key: "off"} opts a job out
      notice_template: null             # the notice's wording, str.format fields (ray_agent.guard.notice)
      audit_log: /var/lib/ray-agent/guard-audit.jsonl
      state_file: /var/lib/ray-agent/guard-state.json
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import yaml

from ray_agent.gpu.fake import ScenarioError, resolve_scenario_path
from ray_agent.units import parse_duration
from ray_agent.users import Contact, User, parse_contact

DEFAULT_PORT = 9489
BACKENDS = ("nvml", "fake")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and what is allowed."""

    def __init__(self, message: str, key: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.key = key  # the dotted path at fault, "" for the whole document
        self.reason = reason or message  # the message without the source and the key


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str | None  # None: the default-route interface's address, decided at start-up
    port: int

    def __str__(self) -> str:
        host = self.host or ""
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth_required: bool = False


@dataclass(frozen=True, slots=True)
class WebConfig:
    listen_address: ListenAddress = ListenAddress(None, DEFAULT_PORT)
    tls: TlsConfig | None = None


@dataclass(frozen=True, slots=True)
class CollectionConfig:
    interval: float = 5.0
    call_timeout: float = 2.0
    backend_retry_interval: float = 30.0


@dataclass(frozen=True, slots=True)
class GpuConfig:
    backend: str = "nvml"
    fake_scenario: Path | None = None


@dataclass(frozen=True, slots=True)
class HostConfig:
    proc_path: Path = Path("/proc")


@dataclass(frozen=True, slots=True)
class AttributionConfig:
    enabled: bool = True
    dashboard_url: str = "http://127.0.0.1:8265"
    token_file: Path | None = None
    state_api: bool = True
    gateway_url: str | None = None
    ca_file: Path | None = None
    ttl: float = 10.0
    request_timeout: float = 2.0
    node_ip: str | None = None


@dataclass(frozen=True, slots=True)
class ExporterConfig:
    dcgm_compat: bool = False
    hostname: str | None = None
    process_metrics: bool = True


@dataclass(frozen=True, slots=True)
class GuardStages:
    """Delays, counted from the moment a GPU became idle_held; None turns a stage off."""

    notify_after: float | None = 0.0
    stop_after: float | None = None
    kill_after: float | None = None
    kill_grace: float | None = None


# What the idle guard compares with idle_threshold (see ray_agent.guard.tracker.activity).
GUARD_SIGNALS = ("auto", "utilization", "sm_active")


@dataclass(frozen=True, slots=True)
class GuardConfig:
    enabled: bool = False
    dry_run: bool = True
    idle_threshold: float = 0.05
    signal: str = "auto"
    window: float = 1800.0
    min_samples: int = 3
    max_gap: float = 120.0
    stages: GuardStages = field(default_factory=GuardStages)
    webhook_url_file: Path | None = None
    webhook_url_env: str | None = None
    webhook_retries: int = 3
    webhook_backoff: float = 1.0
    request_timeout: float = 5.0
    allow_users: tuple[str, ...] = ()
    allow_job_patterns: tuple[str, ...] = ()
    allow_processes: tuple[str, ...] = ()
    opt_out_metadata_key: str = "rayrack.idle_guard"
    notice_template: str | None = None  # None: the built-in wording (ray_agent.guard.actions.DEFAULT_NOTICE)
    audit_log: Path = Path("/var/lib/ray-agent/guard-audit.jsonl")
    state_file: Path = Path("/var/lib/ray-agent/guard-state.json")


@dataclass(frozen=True, slots=True)
class Config:
    web: WebConfig = field(default_factory=WebConfig)
    collection: CollectionConfig = field(default_factory=CollectionConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    host: HostConfig = field(default_factory=HostConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    exporter: ExporterConfig = field(default_factory=ExporterConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    users: tuple[User, ...] = ()

    def user(self, name: str) -> User | None:
        return next((u for u in self.users if u.name == name), None)


# --- the settings, from the dataclasses above -----------------------------------------------------


def keys(cls: type) -> tuple[str, ...]:
    """A section's allowed keys: the fields of its dataclass."""
    return tuple(f.name for f in fields(cls))


def _section(cls: type, name: str) -> type | None:
    """The dataclass a key holds when it is a section of its own (web.tls, guard.stages), else None."""
    hint = get_type_hints(cls)[name]
    if get_origin(hint) is tuple:
        return None  # a list of entries (users), one setting
    return next((t for t in (hint, *get_args(hint)) if is_dataclass(t) and t is not ListenAddress), None)


def settings(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every setting's dotted path -> its default (None for a file a section needs, such as web.tls.cert_file)."""
    found: dict[str, Any] = {}
    for f in fields(cls):
        section = _section(cls, f.name)
        if section is not None:
            found.update(settings(section, f"{prefix}{f.name}."))
        elif f.default is not MISSING:
            found[prefix + f.name] = f.default
        else:
            found[prefix + f.name] = None if f.default_factory is MISSING else f.default_factory()
    return found


def _flat_names() -> dict[str, str]:
    """A setting named in one word: SECTION_KEY (guard_window, guard_notify_after for guard.stages.notify_after),
    or KEY alone where no other section has that key (call_timeout) -> its dotted path."""
    paths = list(settings())
    leaf = {path: path.rsplit(".", 1)[-1] for path in paths}
    names = {f"{path.split('.')[0]}_{leaf[path]}" if "." in path else path: path for path in paths}
    if len(names) != len(paths):
        raise RuntimeError("two settings share a SECTION_KEY name")
    for path in paths:
        if "." in path and [leaf[p] for p in paths].count(leaf[path]) == 1:
            names.setdefault(leaf[path], path)
    return names


SETTING_NAMES = _flat_names()


def nest(dotted: Mapping[str, Any], document: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`document` (not changed) with each dotted key's value set at its path: {"guard.window": "1h"} gives
    {"guard": {"window": "1h"}}."""
    result = dict(document or {})
    for path, value in dotted.items():
        head, _, rest = path.partition(".")
        if rest:
            current = result.get(head)
            result[head] = nest({rest: value}, current if isinstance(current, Mapping) else None)
        else:
            result[head] = value
    return result


def parse_listen_address(text: str) -> ListenAddress:
    """HOST:PORT, [V6]:PORT, :PORT or HOST (default port)."""
    text = text.strip()
    if not text:
        raise ValueError("expected HOST:PORT, :PORT or HOST")
    host: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r} has an unclosed [")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"expected [HOST]:PORT, got {text!r}")
        port_text = rest[1:] if rest else ""
    elif text.count(":") > 1:
        host, port_text = text, ""  # a bare IPv6 address
    else:
        host, _, port_text = text.partition(":")
    port = DEFAULT_PORT
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"port must be a number from 1 to 65535, got {port_text!r}")
        port = int(port_text)
    return ListenAddress(host or None, port)


# --- validation helpers ---------------------------------------------------------------------------


class _Reader:
    """Reads one section, naming keys by their dotted path in every error."""

    def __init__(self, source: str, section: str, node: Any, cls: type) -> None:
        allowed = keys(cls)
        self.source = source
        self.section = section
        if node is None:
            node = {}
        if not isinstance(node, Mapping):
            raise self.error("", f"expected a mapping, got {type(node).__name__}")
        unknown = [k for k in node if k not in allowed]
        if unknown:
            raise self.error(str(unknown[0]), f"unknown key; allowed keys: {', '.join(allowed)}")
        self.node = node

    def error(self, key: str, message: str) -> ConfigError:
        path = ".".join(p for p in (self.section, key) if p)
        return ConfigError(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}", path, message)

    def get(self, key: str, default: Any, parse: Callable[[Any], Any]) -> Any:
        if key not in self.node or self.node[key] is None:
            return default
        try:
            return parse(self.node[key])
        except (TypeError, ValueError) as err:
            raise self.error(key, str(err)) from None

    def duration(self, key: str, default: float, minimum: float) -> float:
        value = self.get(key, default, parse_duration)
        if value < minimum:
            raise self.error(key, f"must be at least {minimum:g}s, got {value:g}s")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        def parse(value: Any) -> bool:
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            return value

        return self.get(key, default, parse)

    def string(self, key: str, default: str | None) -> str | None:
        def parse(value: Any) -> str:
            if not isinstance(value, str) or not value:
                raise ValueError(f"expected a non-empty string, got {value!r}")
            return value

        return self.get(key, default, parse)

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        def parse(value: Any) -> str:
            if value not in allowed:
                raise ValueError(f"{value!r} is not allowed; allowed values: {', '.join(allowed)}")
            return value

        return self.get(key, default, parse)

    def integer(self, key: str, default: int, minimum: int) -> int:
        def parse(value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"expected an integer, got {value!r}")
            if value < minimum:
                raise ValueError(f"must be at least {minimum}, got {value}")
            return value

        return self.get(key, default, parse)

    def ratio(self, key: str, default: float) -> float:
        def parse(value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                raise ValueError(f"expected a ratio above 0 and at most 1, got {value!r}")
            return float(value)

        return self.get(key, default, parse)

    def strings(self, key: str) -> tuple[str, ...]:
        def parse(value: Any) -> tuple[str, ...]:
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"expected a list of non-empty strings, got {value!r}")
            return tuple(value)

        return self.get(key, (), parse)

    def optional_duration(self, key: str) -> float | None:
        """A duration, or None when the key is absent or null (a stage that is off)."""
        return self.get(key, None, parse_duration)

    def path(self, key: str, base_dir: Path) -> Path | None:
        text = self.string(key, None)
        if text is None:
            return None
        path = Path(text)
        return path if path.is_absolute() else base_dir / path


def _ip(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected an IP address, got {value!r}")
    return str(ipaddress.ip_address(value))


def _url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http(s) URL such as http://127.0.0.1:8265, got {value!r}")
    return value.rstrip("/")


def build_config(
    document: Any, source: str = "<config>", base_dir: Path | None = None, local_files: bool = True
) -> Config:
    """Validate a parsed YAML document into a Config. Paths are resolved against `base_dir`.

    local_files=False checks a node's configuration elsewhere (on the controller): its files are not looked for."""
    base_dir = base_dir or Path.cwd()
    top = _Reader(source, "", document, Config)

    web = _Reader(source, "web", top.node.get("web"), WebConfig)
    listen = web.get("listen_address", WebConfig().listen_address, _listen_from_yaml)
    tls = None
    if web.node.get("tls") is not None:
        tls_reader = _Reader(source, "web.tls", web.node["tls"], TlsConfig)
        cert = tls_reader.path("cert_file", base_dir)
        key = tls_reader.path("key_file", base_dir)
        if cert is None or key is None:
            raise tls_reader.error(
                "cert_file" if cert is None else "key_file", "TLS needs both cert_file and key_file"
            )
        client_ca = tls_reader.path("client_ca_file", base_dir)
        auth_required = tls_reader.boolean("client_auth_required", settings(TlsConfig)["client_auth_required"])
        if auth_required and client_ca is None:
            raise tls_reader.error("client_auth_required", "needs client_ca_file to verify clients against")
        tls = TlsConfig(cert, key, client_ca, auth_required)

    col = _Reader(source, "collection", top.node.get("collection"), CollectionConfig)
    interval = col.duration("interval", CollectionConfig().interval, 0.05)
    call_timeout = col.duration("call_timeout", min(CollectionConfig().call_timeout, interval), 0.01)
    if call_timeout > interval:
        raise col.error(
            "call_timeout", f"({call_timeout:g}s) must not exceed collection.interval ({interval:g}s)"
        )
    retry = col.duration("backend_retry_interval", CollectionConfig().backend_retry_interval, 0.05)

    gpu = _Reader(source, "gpu", top.node.get("gpu"), GpuConfig)
    backend = gpu.choice("backend", GpuConfig().backend, BACKENDS)
    scenario_ref = gpu.string("fake_scenario", None)
    scenario = None
    if backend == "fake":
        if scenario_ref is None:
            raise gpu.error("fake_scenario", "is required when gpu.backend is fake")
        try:
            scenario = resolve_scenario_path(scenario_ref, base_dir)
        except ScenarioError as err:
            raise gpu.error("fake_scenario", str(err)) from None
        if local_files and not scenario.is_file():
            raise gpu.error("fake_scenario", f"{scenario} does not exist")
    elif scenario_ref is not None:
        raise gpu.error("fake_scenario", "is only used when gpu.backend is fake")

    host = _Reader(source, "host", top.node.get("host"), HostConfig)
    proc_path = host.path("proc_path", base_dir) or HostConfig().proc_path

    att = _Reader(source, "attribution", top.node.get("attribution"), AttributionConfig)
    att_defaults = AttributionConfig()
    attribution = AttributionConfig(
        enabled=att.boolean("enabled", att_defaults.enabled),
        dashboard_url=att.get("dashboard_url", att_defaults.dashboard_url, _url),
        token_file=att.path("token_file", base_dir),
        state_api=att.boolean("state_api", att_defaults.state_api),
        gateway_url=att.get("gateway_url", att_defaults.gateway_url, _url),
        ca_file=att.path("ca_file", base_dir),
        ttl=att.duration("ttl", att_defaults.ttl, 0.1),
        request_timeout=att.duration("request_timeout", att_defaults.request_timeout, 0.05),
        node_ip=att.get("node_ip", att_defaults.node_ip, _ip),
    )

    exp = _Reader(source, "exporter", top.node.get("exporter"), ExporterConfig)
    exp_defaults = ExporterConfig()
    exporter = ExporterConfig(
        dcgm_compat=exp.boolean("dcgm_compat", exp_defaults.dcgm_compat),
        hostname=exp.string("hostname", exp_defaults.hostname),
        process_metrics=exp.boolean("process_metrics", exp_defaults.process_metrics),
    )

    guard = _guard_config(source, top.node.get("guard"), base_dir, interval)
    users = _users(source, top.node.get("users"))

    return Config(
        web=WebConfig(listen, tls),
        collection=CollectionConfig(interval, call_timeout, retry),
        gpu=GpuConfig(backend, scenario),
        host=HostConfig(proc_path),
        attribution=attribution,
        exporter=exporter,
        guard=guard,
        users=users,
    )


def _users(source: str, node: Any) -> tuple[User, ...]:
    if node is None:
        return ()
    if not isinstance(node, list):
        reason = f"expected a list of {{{', '.join(keys(User))}}}, got {type(node).__name__}"
        raise ConfigError(f"{source}: users: {reason}", "users", reason)
    users: list[User] = []
    for index, entry in enumerate(node):
        reader = _Reader(source, f"users[{index}]", entry, User)
        name = reader.string("name", None)
        if name is None:
            raise reader.error("name", "is required")
        if any(u.name == name for u in users):
            raise reader.error("name", f"{name!r} is listed twice")
        contact = reader.get("contact", None, lambda v: parse_contact(_text(v)))
        max_gpus = reader.get("max_gpus", None, _max_gpus)
        users.append(User(name, contact or Contact(), max_gpus))
    return tuple(users)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _max_gpus(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number of GPUs (0 or more), got {value!r}")
    return value


def _guard_config(source: str, node: Any, base_dir: Path, interval: float) -> GuardConfig:
    defaults = GuardConfig()
    reader = _Reader(source, "guard", node, GuardConfig)
    window = reader.duration("window", defaults.window, 1.0)
    max_gap = reader.duration("max_gap", min(defaults.max_gap, window), interval)
    if max_gap > window:
        raise reader.error("max_gap", f"({max_gap:g}s) must not exceed guard.window ({window:g}s)")

    stages_reader = _Reader(source, "guard.stages", reader.node.get("stages"), GuardStages)
    stage_defaults = GuardStages()
    # An absent key keeps its default; an explicit null turns the stage off.
    notify_after = (
        stages_reader.optional_duration("notify_after")
        if "notify_after" in stages_reader.node
        else stage_defaults.notify_after
    )
    stop_after = stages_reader.optional_duration("stop_after")
    kill_after = stages_reader.optional_duration("kill_after")
    kill_grace = stages_reader.optional_duration("kill_grace")
    if kill_after is not None and kill_grace is None:
        raise stages_reader.error("kill_grace", "is required when kill_after is set (e.g. 30s)")
    if kill_grace is not None and kill_grace > 600:
        raise stages_reader.error("kill_grace", f"must be at most 600s, got {kill_grace:g}s")
    previous: tuple[str, float] | None = None
    for key, delay in (("notify_after", notify_after), ("stop_after", stop_after), ("kill_after", kill_after)):
        if delay is None:
            continue
        if previous is not None and delay < previous[1]:
            raise stages_reader.error(key, f"({delay:g}s) must not be earlier than {previous[0]} ({previous[1]:g}s)")
        previous = (key, delay)

    url_file = reader.path("webhook_url_file", base_dir)
    url_env = reader.string("webhook_url_env", None)
    if url_file is not None and url_env is not None:
        raise reader.error("webhook_url_env", "use either webhook_url_file or webhook_url_env, not both")

    return GuardConfig(
        enabled=reader.boolean("enabled", defaults.enabled),
        dry_run=reader.boolean("dry_run", defaults.dry_run),
        idle_threshold=reader.ratio("idle_threshold", defaults.idle_threshold),
        signal=reader.choice("signal", defaults.signal, GUARD_SIGNALS),
        window=window,
        min_samples=reader.integer("min_samples", defaults.min_samples, 1),
        max_gap=max_gap,
        stages=GuardStages(notify_after, stop_after, kill_after, kill_grace),
        webhook_url_file=url_file,
        webhook_url_env=url_env,
        webhook_retries=reader.integer("webhook_retries", defaults.webhook_retries, 0),
        webhook_backoff=reader.duration("webhook_backoff", defaults.webhook_backoff, 0.0),
        request_timeout=reader.duration("request_timeout", defaults.request_timeout, 0.05),
        allow_users=reader.strings("allow_users"),
        allow_job_patterns=reader.strings("allow_job_patterns"),
        allow_processes=reader.strings("allow_processes"),
        opt_out_metadata_key=reader.string("opt_out_metadata_key", None) or defaults.opt_out_metadata_key,
        notice_template=reader.get("notice_template", None, _notice_template),
        audit_log=reader.path("audit_log", base_dir) or defaults.audit_log,
        state_file=reader.path("state_file", base_dir) or defaults.state_file,
    )


def _notice_template(value: Any) -> str:
    # Imported here: the guard's wording lives with the guard, which imports this module.
    from ray_agent.guard.notice import check_template

    return check_template(_text(value))


def _listen_from_yaml(value: Any) -> ListenAddress:
    if not isinstance(value, str):
        raise ValueError(f'expected a string such as "10.0.0.5:{DEFAULT_PORT}", got {value!r}')
    return parse_listen_address(value)


def load_config(path: Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read the YAML file (or start from defaults) and apply dotted-key overrides from the command line."""
    document: dict[str, Any] = {}
    source = "<defaults>"
    base_dir = Path.cwd()
    if path is not None:
        source = str(path)
        base_dir = path.resolve().parent
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config file: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        document = loaded or {}
    return build_config(nest(overrides or {}, document), source, base_dir)
