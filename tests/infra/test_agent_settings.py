"""The ray_agent role's variables are the agent's own settings: named after them, with the agent's defaults, and
passed through to a configuration file the agent accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ray_agent.config import ConfigError, build_config, nest, settings
from ray_agent.gpu_state import STATE_SETTINGS

from .conftest import FILTERS, ROLES, load_module, run_play, template_play

inv = load_module(FILTERS / "rayrack_inventory.py", "rayrack_inventory")
ROLE = ROLES / "ray_agent"
DEFAULTS = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
OPTIONS = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
# Where the role picks its own default over the agent's: why, and the settings it needs to be read with.
ROLE_CHOICES = {
    "ray_agent_fake_scenario": ("the agent needs one with the fake backend; the role names the lab's",
                                {"gpu.backend": "fake"}),
    "ray_agent_guard_kill_grace": ("the agent needs one with kill_after; the role's holds once kill_after is set",
                                   {}),
}


def _value(config: object, path: str) -> object:
    for part in path.split("."):
        config = getattr(config, part)
    return config


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_variable_names_a_setting_or_is_the_roles_own(name):
    assert (inv.agent_setting(name) is None) == (name in inv.AGENT_ROLE_VARIABLES), name


@pytest.mark.parametrize("name", sorted(n for n in DEFAULTS if inv.agent_setting(n)))
def test_role_defaults_are_the_agents_defaults(name):
    path = inv.agent_setting(name)
    if name in ROLE_CHOICES:
        document = nest({path: DEFAULTS[name], **ROLE_CHOICES[name][1]})
    else:
        document = inv.rayrack_agent_config({name: DEFAULTS[name]})
    read = _value(build_config(document, local_files=False), path)
    if name in ROLE_CHOICES:
        assert read != settings()[path], f"{name} is the agent's default now: drop it from ROLE_CHOICES"
    else:
        assert read == _value(build_config({}), path), f"{name}: {DEFAULTS[name]!r} is not the agent's default"


def test_role_choices_are_role_variables():
    assert set(ROLE_CHOICES) <= set(DEFAULTS)


PLAY = template_play("all", "ray_agent", "etc/rayrack/ray-agent.yml.j2", "{{ dest }}/{{ inventory_hostname }}.yml",
                     defaults=False)


def test_the_role_writes_what_the_agent_accepts(tmp_path: Path):
    """The head with the defaults; a worker whose variables (and extra config) set the guard's settings."""
    worker = {"ansible_host": "10.0.0.11", "ray_agent_guard_enabled": True, "ray_agent_guard_window": "1h",
              "ray_agent_guard_stop_after": "2h", "ray_agent_dcgm_compat": True, "ray_agent_call_timeout": "1s",
              "ray_agent_gpu_backend": "fake", "ray_agent_guard_webhook_url": "https://hooks.example.org/x",
              "ray_agent_extra_config": {"guard": {"max_gap": "30s"}}}
    # The roles' defaults as the inventory's group variables: below the host's own, as role defaults are.
    defaults = {**yaml.safe_load((ROLES / "rayrack" / "defaults" / "main.yml").read_text()), **DEFAULTS}
    inventory = {"all": {"vars": {"ansible_connection": "local", **defaults}, "children": {
        "ray_head": {"hosts": {"head": {"ansible_host": "10.0.0.10"}}},
        "ray_workers": {"hosts": {"worker1": worker}}}}}
    run_play(tmp_path, inventory, PLAY, {"dest": str(tmp_path)}, {})
    head_file = yaml.safe_load((tmp_path / "head.yml").read_text())
    head = build_config(head_file, local_files=False)
    # The guard is off, but the settings that judge each GPU's state still reach the agent.
    assert head.guard.enabled is False and set(head_file["guard"]) == {"enabled", "idle_threshold", "signal", "window"}
    assert set(head_file["guard"]) <= {"enabled", *STATE_SETTINGS}
    assert (str(head.web.listen_address), head.gpu.backend, head.gpu.fake_scenario) == ("10.0.0.10:9489", "nvml", None)
    assert head.collection.call_timeout == 2.0 and head.exporter.dcgm_compat is False
    text = (tmp_path / "worker1.yml").read_text()
    assert "hooks.example.org" not in text  # the webhook's URL stays in its own file
    config = build_config(yaml.safe_load(text), local_files=False)
    assert (config.guard.enabled, config.guard.window, config.guard.max_gap) == (True, 3600.0, 30.0)
    assert (config.guard.stages.stop_after, config.guard.stages.kill_grace) == (7200.0, 30.0)
    assert config.guard.notice_template is None and str(config.guard.webhook_url_file).endswith("webhook.url")
    assert (config.exporter.dcgm_compat, config.collection.call_timeout) == (True, 1.0)
    assert config.gpu.fake_scenario is not None and config.gpu.fake_scenario.name == "lab-2gpu.yml"


@pytest.mark.parametrize("name", sorted(n for n, spec in OPTIONS.items() if "choices" in spec))
def test_spec_choices_are_the_values_the_agent_allows(name):
    with pytest.raises(ConfigError) as err:
        build_config(nest({inv.agent_setting(name): "no-such-value"}), local_files=False)
    allowed = err.value.reason.split("allowed values: ", 1)[1].split(", ")
    assert sorted(OPTIONS[name]["choices"]) == sorted(allowed), name
