"""Configuration: defaults, every error names its key and what is allowed, flags override files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from agent.support import SCENARIOS
from ray_agent.config import (
    DEFAULT_PORT,
    SETTING_NAMES,
    Config,
    ConfigError,
    GuardConfig,
    ListenAddress,
    build_config,
    keys,
    load_config,
    nest,
    parse_listen_address,
    settings,
)
from ray_agent.users import Contact, parse_contact


def test_defaults() -> None:
    config = build_config({})
    assert config == Config()
    assert config.web.listen_address == ListenAddress(None, 9489)
    assert config.gpu.backend == "nvml" and config.exporter.dcgm_compat is False
    assert (config.collection.interval, config.collection.call_timeout) == (5.0, 2.0)


def test_full_example_from_the_docstring(tmp_path: Path) -> None:
    document = _example()
    (tmp_path / "tls.crt").write_text("x")
    config = build_config(document, "example.yml", tmp_path)
    assert config.web.listen_address == ListenAddress("10.0.0.5", 9489)
    assert config.web.tls is not None and config.web.tls.client_ca_file == Path("/etc/ray-agent/ca.crt")
    assert config.gpu.backend == "nvml"
    assert config.attribution.token_file == Path("/etc/ray/auth_token")
    alice = config.user("alice")
    assert alice is not None and alice.max_gpus == 2
    assert (alice.contact.email, alice.contact.slack_member_id, alice.contact.mention) == (
        "alice@example.org",
        "U0123ABCD",
        "<@U0123ABCD>",
    )


@pytest.mark.parametrize(
    ("text", "email", "member"),
    [
        ("alice@example.org", "alice@example.org", ""),
        ("U0123ABCD", "", "U0123ABCD"),
        ("U0123ABCD  alice@example.org", "alice@example.org", "U0123ABCD"),
        ("", "", ""),
    ],
)
def test_contacts(text: str, email: str, member: str) -> None:
    assert parse_contact(text) == Contact(email, member)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"colection": {}}, r"colection: unknown key; allowed keys: web, collection, gpu, host, attribution"),
        (
            {"collection": {"intervall": "1s"}},
            r"collection\.intervall: unknown key; allowed keys: interval, call_timeout",
        ),
        ({"gpu": {"backend": "cuda"}}, r"gpu\.backend: 'cuda' is not allowed; allowed values: nvml, fake"),
        ({"gpu": {"backend": "fake"}}, r"gpu\.fake_scenario: is required when gpu\.backend is fake"),
        ({"gpu": {"fake_scenario": "x.yml"}}, r"gpu\.fake_scenario: is only used when gpu\.backend is fake"),
        (
            {"gpu": {"backend": "fake", "fake_scenario": "nope.yml"}},
            r"gpu\.fake_scenario: .*nope\.yml does not exist",
        ),
        (
            {"gpu": {"backend": "fake", "fake_scenario": "builtin:nope"}},
            r"gpu\.fake_scenario: no bundled scenario",
        ),
        ({"collection": {"interval": "fast"}}, r"collection\.interval: expected a duration"),
        ({"collection": {"interval": "10ms"}}, r"collection\.interval: must be at least 0\.05s"),
        (
            {"collection": {"interval": "1s", "call_timeout": "2s"}},
            r"collection\.call_timeout: \(2s\) must not exceed collection\.interval \(1s\)",
        ),
        (
            {"web": {"listen_address": "host:99999"}},
            r"web\.listen_address: port must be a number from 1 to 65535",
        ),
        ({"web": {"listen_address": 9489}}, r"web\.listen_address: expected a string"),
        (
            {"web": {"tls": {"cert_file": "c.pem"}}},
            r"web\.tls\.key_file: TLS needs both cert_file and key_file",
        ),
        (
            {"web": {"tls": {"cert_file": "c", "key_file": "k", "client_auth_required": True}}},
            r"web\.tls\.client_auth_required: needs client_ca_file",
        ),
        ({"attribution": {"enabled": "yes"}}, r"attribution\.enabled: expected true or false, got 'yes'"),
        (
            {"attribution": {"dashboard_url": "localhost:8265"}},
            r"attribution\.dashboard_url: expected an http\(s\) URL",
        ),
        (
            {"attribution": {"node_ip": "node-7"}},
            r"attribution\.node_ip: .*does not appear to be an IPv4 or IPv6",
        ),
        ({"exporter": {"dcgm_compat": 1}}, r"exporter\.dcgm_compat: expected true or false"),
        ({"exporter": []}, r"exporter: expected a mapping"),
        ({"users": {"alice": {}}}, r"users: expected a list"),
        ({"users": [{"contact": "a@b.org"}]}, r"users\[0\]\.name: is required"),
        ({"users": [{"name": "a"}, {"name": "a"}]}, r"users\[1\]\.name: 'a' is listed twice"),
        ({"users": [{"name": "a", "admin": True}]}, r"users\[0\]\.admin: unknown key"),
        ({"users": [{"name": "a", "contact": "@alice"}]}, r"users\[0\]\.contact: must be .*; got '@alice'"),
        ({"users": [{"name": "a", "contact": "U0123ABCD U0999ZZZZ"}]}, r"users\[0\]\.contact: .*one of each.*U0999"),
        ({"users": [{"name": "a", "max_gpus": -1}]}, r"users\[0\]\.max_gpus: expected a whole number"),
        ({"guard": {"notice_template": "{user} idles"}}, r"guard\.notice_template: unknown field \{user\}"),
        ({"guard": {"notice_template": "GPU {gpu"}}, r"guard\.notice_template: not a valid format string"),
        ({"attribution": {"gateway_url": "head:8443"}}, r"attribution\.gateway_url: expected an http\(s\) URL"),
    ],
)
def test_errors_name_the_key(document: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(document, "agent.yml", SCENARIOS)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("web: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yml: not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yml"
    scalar.write_text("just text\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(scalar)


def test_paths_are_relative_to_the_config_file_and_flags_override(tmp_path: Path) -> None:
    (tmp_path / "s.yml").write_text("gpus: []\n")
    path = tmp_path / "agent.yml"
    path.write_text("gpu: {backend: fake, fake_scenario: s.yml}\nweb: {listen_address: '10.1.2.3:9000'}\n")
    config = load_config(path)
    assert config.gpu.fake_scenario == tmp_path / "s.yml"
    overridden = load_config(
        path, {"web.listen_address": "127.0.0.1:9100", "gpu.fake_scenario": "builtin:lab-2gpu"}
    )
    assert overridden.web.listen_address == ListenAddress("127.0.0.1", 9100)
    assert overridden.gpu.fake_scenario.name == "lab-2gpu.yml"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":9100", ListenAddress(None, 9100)),
        ("10.0.0.5", ListenAddress("10.0.0.5", DEFAULT_PORT)),
        ("[::1]:9100", ListenAddress("::1", 9100)),
        ("::1", ListenAddress("::1", DEFAULT_PORT)),
        ("node-a:80", ListenAddress("node-a", 80)),
    ],
)
def test_listen_addresses(text: str, expected: ListenAddress) -> None:
    assert parse_listen_address(text) == expected


@given(host=st.ip_addresses(v=4).map(str), port=st.integers(min_value=1, max_value=65535))
def test_listen_address_round_trip(host: str, port: int) -> None:
    address = ListenAddress(host, port)
    assert parse_listen_address(str(address)) == address


@pytest.mark.parametrize("text", ["", "h:0", "h:x", "[::1", "[::1]9100"])
def test_bad_listen_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen_address(text)


def _example() -> dict:
    import ray_agent.config as module

    example = module.__doc__.split("Example (every key optional)::", 1)[1]
    return yaml.safe_load("\n".join(line[4:] for line in example.splitlines()))


def _paths(document: dict, prefix: str = "") -> set[str]:
    found = set()
    for key, value in document.items():
        if isinstance(value, dict):
            found |= _paths(value, f"{prefix}{key}.")
        else:
            found.add(prefix + key)
    return found


def test_the_docstring_example_shows_every_setting_of_the_dataclasses() -> None:
    assert _paths(_example()) == set(settings())


def test_allowed_keys_are_the_dataclass_fields() -> None:
    # A field added to the dataclass is allowed at once: its slots are its fields.
    assert keys(GuardConfig) == GuardConfig.__slots__ and "state_file" in keys(GuardConfig)
    with pytest.raises(ConfigError) as err:
        build_config({"guard": {"windw": "1h"}})
    assert str(err.value) == f"<config>: guard.windw: unknown key; allowed keys: {', '.join(GuardConfig.__slots__)}"
    assert (err.value.key, err.value.reason.split(";")[0]) == ("guard.windw", "unknown key")


def test_every_setting_has_its_dataclass_default() -> None:
    defaults = settings()
    assert defaults["collection.interval"] == Config().collection.interval == 5.0
    assert defaults["guard.stages.notify_after"] == 0.0 and defaults["web.tls.cert_file"] is None
    assert defaults["users"] == () and "web.tls" not in defaults


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("guard_window", "guard.window"),
        ("guard_notify_after", "guard.stages.notify_after"),
        ("call_timeout", "collection.call_timeout"),
        ("collection_call_timeout", "collection.call_timeout"),
        ("dcgm_compat", "exporter.dcgm_compat"),
        ("users", "users"),
    ],
)
def test_settings_named_in_one_word(name: str, path: str) -> None:
    assert SETTING_NAMES[name] == path


def test_a_key_two_sections_have_needs_its_section() -> None:
    assert "enabled" not in SETTING_NAMES and "request_timeout" not in SETTING_NAMES
    assert SETTING_NAMES["guard_request_timeout"] == "guard.request_timeout"


def test_nest_sets_dotted_paths_without_changing_the_document() -> None:
    document = {"guard": {"window": "1h"}}
    assert nest({"guard.stages.kill_after": "2h", "users": []}, document) == {
        "guard": {"window": "1h", "stages": {"kill_after": "2h"}},
        "users": [],
    }
    assert document == {"guard": {"window": "1h"}}


def test_flags_override_nested_sections(tmp_path: Path) -> None:
    path = tmp_path / "agent.yml"
    path.write_text("guard: {stages: {kill_after: 2h, kill_grace: 10s}}\n")
    config = load_config(path, {"guard.stages.kill_after": "3h"})
    assert (config.guard.stages.kill_after, config.guard.stages.kill_grace) == (10800.0, 10.0)


def test_call_timeout_over_interval_names_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"collection": {"interval": "5s", "call_timeout": "10s"}}, "ray-agent.yml")
    assert err.value.key == "collection.call_timeout"
    assert err.value.reason == "(10s) must not exceed collection.interval (5s)"
    assert str(err.value) == "ray-agent.yml: collection.call_timeout: (10s) must not exceed collection.interval (5s)"


def test_a_node_scenario_path_is_checked_only_where_its_files_are(tmp_path: Path) -> None:
    document = {"gpu": {"backend": "fake", "fake_scenario": "/srv/scenarios/a.yml"}}
    with pytest.raises(ConfigError, match=r"gpu\.fake_scenario: /srv/scenarios/a\.yml does not exist"):
        build_config(document, base_dir=tmp_path)
    assert str(build_config(document, local_files=False).gpu.fake_scenario) == "/srv/scenarios/a.yml"
    with pytest.raises(ConfigError, match=r"gpu\.fake_scenario: "):
        build_config({"gpu": {"backend": "fake", "fake_scenario": "builtin:no-such"}}, local_files=False)
