#!/usr/bin/env python3
"""Build a wheelhouse on the controller: every wheel a venv needs, for the nodes' Python and CPU, then a tar.

Nodes install from the tar with `pip install --no-index`, so they never reach a package index (the
air-gapped path too). The wheelhouse appears atomically: DEST/ and DEST.tar exist only when complete.
"""

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from dist_files import shipped

# Wheels that run on every supported OS: glibc 2.17 (manylinux2014) up to 2.34 (EL 9, the oldest we support).
OLDEST_GLIBC_MINOR, NEWEST_GLIBC_MINOR = 17, 34


def platforms(arch: str) -> list[str]:
    tags = [f"manylinux2014_{arch}"]
    tags += [f"manylinux_2_{minor}_{arch}" for minor in range(OLDEST_GLIBC_MINOR, NEWEST_GLIBC_MINOR + 1)]
    return tags


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args], check=True)


def build_wheel(source: Path, wheel_dir: Path) -> None:
    """The project's wheel, built from a copy of exactly the files its fingerprint covers (dist_files.py).

    The build writes only to the copy (the source may be an installed, read-only collection), and uses the
    controller's setuptools rather than fetching one: the controller may be offline.
    """
    with tempfile.TemporaryDirectory(prefix="rayrack-wheel-") as stage:
        for name in shipped(source):
            (Path(stage) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, Path(stage) / name)
        # The project's build-system.requires are checked against the controller's: a clear error, not a failed build.
        pip("wheel", "--no-deps", "--no-build-isolation", "--check-build-dependencies", "--wheel-dir", str(wheel_dir),
            stage)


def build(dest: Path, python_version: str, arch: str, requirements: list[str], source: Path | None) -> None:
    work = dest.with_name(dest.name + ".part")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    wanted = list(requirements)
    if source is not None:
        build_wheel(source, work)
        # Its dependencies come from its own metadata, with the extras the requirements name (ray-agent[gateway]).
        extras = sorted({extra.strip() for requirement in requirements
                         for group in re.findall(r"\[([^\]]*)\]", requirement) for extra in group.split(",")})
        suffix = f"[{','.join(extras)}]" if extras else ""
        wanted = [f"{p}{suffix}" for p in work.glob("*.whl")]
    platform_args = [f"--platform={tag}" for tag in platforms(arch)]
    pip("download", "--dest", str(work), "--only-binary=:all:", "--implementation", "cp",
        "--python-version", python_version, *platform_args, *wanted)
    (work / ".complete").write_text("\n".join(requirements) + "\n")
    tar_part = dest.with_name(dest.name + ".tar.part")
    with tarfile.open(tar_part, "w") as tar:
        for path in sorted(work.iterdir()):
            tar.add(path, arcname=path.name)
    shutil.rmtree(dest, ignore_errors=True)
    work.rename(dest)
    tar_part.rename(dest.with_name(dest.name + ".tar"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--python-version", required=True)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--source", type=Path, help="a local project to build a wheel of, with its dependencies")
    parser.add_argument("requirements", nargs="*",
                        help="what to download; with --source, the project's name and the extras to include")
    args = parser.parse_args()
    if not args.source and not args.requirements:
        parser.error("give --source or requirements")
    build(args.dest, args.python_version, args.arch, args.requirements, args.source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
