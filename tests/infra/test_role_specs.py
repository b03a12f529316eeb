"""Every role documents every public variable in meta/argument_specs.yml, with the same default."""

import re

import pytest
import yaml

from .conftest import ROLES

ROLE_DIRS = sorted(p for p in ROLES.iterdir() if (p / "meta" / "main.yml").exists())


def load(path):
    return yaml.safe_load(path.read_text()) or {} if path.exists() else {}


def is_template(value):
    return isinstance(value, str) and "{{" in value


@pytest.mark.parametrize("role", ROLE_DIRS, ids=lambda p: p.name)
def test_specs_match_defaults(role):
    defaults = load(role / "defaults" / "main.yml")
    specs = load(role / "meta" / "argument_specs.yml")
    assert specs, f"{role.name}: meta/argument_specs.yml is missing"
    options = specs["argument_specs"]["main"].get("options") or {}
    assert sorted(set(defaults) - set(options)) == [], f"{role.name}: defaults without a spec"
    for name, value in defaults.items():
        spec = options[name]
        assert spec.get("description"), f"{role.name}: {name} has no description"
        if is_template(value):
            # Ansible evaluates spec defaults: a templated default is described in words instead.
            assert "default" not in spec, f"{role.name}: {name} repeats a templated default in its spec"
        else:
            documented = spec.get("default")
            assert documented == value, f"{role.name}: {name}: spec default {documented!r} != {value!r}"
    for name, spec in options.items():
        if name not in defaults:
            assert "default" not in spec and not spec.get("required"), \
                f"{role.name}: {name} has a spec default but no value in defaults/main.yml"


@pytest.mark.parametrize("role", ROLE_DIRS, ids=lambda p: p.name)
def test_public_variables_carry_the_role_prefix(role):
    for path in [role / "defaults" / "main.yml", role / "meta" / "argument_specs.yml"]:
        names = load(path) if path.name == "main.yml" else {
            name for entry in load(path).get("argument_specs", {}).values() for name in (entry.get("options") or {})}
        for name in names:
            assert name.startswith(role.name + "_"), f"{path}: {name} lacks the {role.name}_ prefix"


@pytest.mark.parametrize("role", ROLE_DIRS, ids=lambda p: p.name)
def test_private_variables_are_underscored(role):
    for path in (role / "vars").glob("*.yml"):
        for name in load(path):
            if role.name == "rayrack" and name.startswith("rayrack_"):
                continue  # the defaults role's derived cluster-wide facts, public for every role
            assert name.startswith(f"_{role.name}_"), f"{path}: {name} should be _{role.name}_*"


def test_derived_facts_are_no_settings():
    # Role vars outrank the inventory: a derived fact that were also a setting would ignore the admin's value.
    derived = {name for name in load(ROLES / "rayrack" / "vars" / "main.yml") if not name.startswith("_")}
    settings = {name for role in ROLE_DIRS for name in load(role / "defaults" / "main.yml")}
    assert derived and derived.isdisjoint(settings), sorted(derived & settings)


ROLE_NAMES = sorted((p.name for p in ROLE_DIRS), key=len, reverse=True)
PRIVATE = re.compile(r"(?<![\w.])_(?!_)[a-z][a-z0-9_]*")


def owner(variable):
    """The role whose private variable this is (_ROLE_*), the longest role name first; None: nobody's."""
    return next((role for role in ROLE_NAMES if variable.startswith(f"_{role}_")), None)


def private_references(text):
    return {name for name in PRIVATE.findall(text) if owner(name) is not None}


SOURCES = sorted([*ROLES.glob("*/**/*.yml"), *ROLES.glob("*/**/*.j2"), *(ROLES.parent / "playbooks").glob("*.yml"),
                  *(ROLES.parent / "molecule").glob("*/*.yml")])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROLES.parent)))
def test_nothing_reads_another_roles_private_variables(path):
    # A role's _ROLE_* variables are its own business; what others need is public (the defaults role, rayrack,
    # derives the cluster-wide facts as rayrack_*).
    relative = path.relative_to(ROLES.parent).parts
    reader = relative[1] if relative[0] == "roles" else None
    foreign = sorted(name for name in private_references(path.read_text()) if owner(name) != reader)
    assert foreign == [], f"{path}: reads private variables of other roles: {', '.join(foreign)}"
