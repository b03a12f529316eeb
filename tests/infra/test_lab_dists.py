"""The lab's Debian releases (tests/lab/lab.py --dist): one image and recipe per release, chosen from make."""

import ipaddress
import json
import subprocess
import sys

import pytest

from .conftest import REPO

sys.path.insert(0, str(REPO / "tests" / "lab"))
import lab as labtool


def test_each_release_has_its_own_image_and_recipe():
    images = {dist: labtool.image_name(dist) for dist in labtool.DISTS}
    assert images["bookworm"].endswith(":12") and images["trixie"].endswith(":13")
    assert images[labtool.DEFAULT_DIST] == labtool.IMAGE
    assert len(set(images.values())) == len(images)
    digests = {dist: labtool.recipe_digest([], dist) for dist in labtool.DISTS}
    assert len(set(digests.values())) == len(digests), "a release's image would pass for another's"


@pytest.mark.parametrize("dist", sorted(labtool.DISTS))
def test_sources_name_the_release_its_updates_and_security_suites(dist):
    lines = [line.split() for line in labtool.SOURCES_LIST.format(dist=dist).splitlines()]
    assert [(words[1], words[2]) for words in lines] == [
        ("http://deb.debian.org/debian", dist), ("http://deb.debian.org/debian", f"{dist}-updates"),
        ("http://deb.debian.org/debian-security", f"{dist}-security")]
    # non-free carries nvidia-smi and libnvidia-ml1 (the GPU scenario's userspace driver path).
    assert all(words[3:] == ["main", "contrib", "non-free", "non-free-firmware"] for words in lines)


def test_an_unknown_release_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exc:
        labtool.main(["up", "--name", "never", "--dist", "sid"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--dist" in err and "'sid'" in err and "bookworm" in err and "trixie" in err


@pytest.mark.parametrize("packages, expected", [(None, labtool.LAB_PYTHON_PACKAGES), ("", []),
                                                ("einops==0.8.1 six==1.17.0", ["einops==0.8.1", "six==1.17.0"])])
def test_the_venvs_extra_packages_reach_the_inventory(tmp_path, packages, expected):
    lab = labtool.Lab("dists", 1, ipaddress.ip_network("10.213.79.0/24"), tmp_path, 2,
                      *(() if packages is None else ("trixie", tuple(packages.split()))))
    lab.key.parent.mkdir(parents=True)
    labtool.write_inventory(lab, {node.name: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKey" for node in lab.nodes})
    text = (tmp_path / "group_vars/all/lab.yml").read_text()
    lab_vars = json.loads("".join(line for line in text.splitlines(True) if not line.startswith("#")))
    assert lab_vars["rayrack_python_packages"] == expected


@pytest.mark.parametrize("args, expected", [
    ([], ""), (["DIST=trixie"], " --dist trixie"),
    (["DIST=trixie", "LAB_PACKAGES="], " --dist trixie --python-packages ''"),
])
def test_make_lab_passes_the_release_and_packages_to_lab_py(args, expected):
    out = subprocess.run(["make", "-n", "lab", "VENV=/nonexistent", *args], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    (up,) = [line for line in out.splitlines() if "lab.py up" in line]
    assert " ".join(up.split()).endswith("--workers 2" + expected)
