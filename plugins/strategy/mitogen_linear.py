"""Mitogen's linear strategy as rayrack.cluster.mitogen_linear, an opt-in
(ANSIBLE_STRATEGY=rayrack.cluster.mitogen_linear): modules run in one persistent Python interpreter per node instead
of one per task. Needs the pinned `mitogen` from requirements.txt on the controller. ansible-core deprecates
strategies outside ansible.builtin and says so on every run, hence not the default."""

from __future__ import annotations

DOCUMENTATION = """
name: mitogen_linear
short_description: Mitogen's linear strategy (one persistent interpreter per node)
description:
  - The linear strategy with Mitogen's connection multiplexing; needs the mitogen package on the controller.
"""

try:
    import ansible_mitogen.loaders
    import ansible_mitogen.strategy
except ImportError as exc:
    from ansible.errors import AnsibleError

    raise AnsibleError("rayrack.cluster.mitogen_linear needs mitogen on the controller: "
                       "pip install -r requirements.txt (make venv)") from exc

_Linear = ansible_mitogen.loaders.strategy_loader.get("linear", class_only=True)


class StrategyModule(ansible_mitogen.strategy.StrategyMixin, _Linear):
    pass
