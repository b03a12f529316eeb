"""`rayrack upgrade`'s options become extra variables only when given: the inventory decides the rest."""

from __future__ import annotations

import pytest

from rayrack.cli import build_parser, main, upgrade_extravars


def extravars(*argv: str) -> dict[str, object]:
    return upgrade_extravars(build_parser().parse_args(["upgrade", *argv]))


def test_without_batch_the_inventory_batch_size_applies():
    # An extra variable would beat the inventory's ray_drain_batch_size (and the role's default).
    assert extravars() == {}


def test_batch_given_wins():
    assert extravars("--batch", "3") == {"ray_drain_batch_size": 3}


def test_other_options_are_passed_as_given():
    assert extravars("--ray-version", "2.9.3", "--drain-timeout", "60", "--role", "gpu_driver") == {
        "rayrack_ray_version": "2.9.3", "ray_drain_timeout": 60, "ray_drain_upgrade_roles": ["gpu_driver"]}


@pytest.mark.parametrize("batch", ["0", "-2"])
def test_a_batch_below_one_is_refused_before_any_run(tmp_path, capsys, batch):
    (tmp_path / "hosts.yml").write_text("ray_head:\n  hosts:\n    head:\n      ansible_host: 127.0.0.1\n")
    assert main(["-i", str(tmp_path / "hosts.yml"), "upgrade", "--batch", batch]) == 1
    assert "--batch must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / ".rayrack").exists()
