#!/usr/bin/env python3
"""The files a local setuptools project's wheel ships, and their fingerprint.

The project's pyproject.toml is the one list: its packages (tool.setuptools.packages.find) with their modules,
and its package data, with include-package-data off so that nothing else gets in. The wheelhouse builds from a
copy of exactly these files (build_wheelhouse.py), so the fingerprint covers what nodes install and nothing more:
a change elsewhere in the tree rebuilds nothing. `dist_files.py PROJECT` prints the fingerprint.
"""

import argparse
import hashlib
import sys
import tomllib
from pathlib import Path

from setuptools import find_namespace_packages, find_packages


class ProjectError(Exception):
    pass


def _setuptools_table(project: Path) -> dict:
    config = tomllib.loads((project / "pyproject.toml").read_text())
    table = config.get("tool", {}).get("setuptools", {})
    # What this selection does not model would ship unfingerprinted files: refuse it rather than guess.
    if table.get("include-package-data", True):
        raise ProjectError(f"{project}/pyproject.toml: set tool.setuptools.include-package-data = false")
    unsupported = sorted(set(table) - {"include-package-data", "packages", "package-data", "dynamic"})
    if unsupported:
        raise ProjectError(f"{project}/pyproject.toml: tool.setuptools.{unsupported[0]} is not supported here "
                           "(allowed: packages.find, package-data, dynamic, include-package-data)")
    find = table.get("packages", {}).get("find")
    if not isinstance(find, dict):
        raise ProjectError(f"{project}/pyproject.toml: tool.setuptools.packages.find must be a table")
    return table


def shipped(project: Path) -> list[str]:
    """The project's files that go into its wheel, relative to it, sorted; pyproject.toml (the metadata) first."""
    table = _setuptools_table(project)
    find = table["packages"]["find"]
    # As setuptools reads the table: namespace packages unless namespaces = false.
    finder = find_namespace_packages if find.get("namespaces", True) else find_packages
    data = table.get("package-data", {})
    files: set[str] = set()
    for where in find.get("where", ["."]):
        for package in finder(where=str(project / where), include=find.get("include", ["*"]),
                              exclude=find.get("exclude", [])):
            directory = project / where / package.replace(".", "/")
            patterns = ["*.py", *data.get(package, []), *data.get("*", []), *data.get("", [])]
            files.update(p.relative_to(project).as_posix() for pattern in patterns for p in directory.glob(pattern)
                         if p.is_file())
    return ["pyproject.toml", *sorted(files)]


def fingerprint(project: Path) -> str:
    """12 hex digits of a hash over each shipped file's path and content."""
    digest = hashlib.sha256()
    for name in shipped(project):
        digest.update(name.encode() + b"\0" + (project / name).read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path, help="the directory of the project's pyproject.toml")
    parser.add_argument("--list", action="store_true", help="print the shipped files instead of the fingerprint")
    args = parser.parse_args()
    try:
        print("\n".join(shipped(args.project)) if args.list else fingerprint(args.project))
    except (OSError, ProjectError) as err:
        print(f"dist_files.py: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
