"""Package selection for every supported OS, from the role's own vars/<os>.yml data."""

import pytest
import yaml

from .conftest import FILTERS, ROLES, load_module

ROLE = ROLES / "nvidia_driver"
plan_mod = load_module(FILTERS / "nvidia_driver_plan.py", "nvidia_driver_plan")
cuda_mod = load_module(FILTERS / "cuda_toolkit.py", "cuda_toolkit_filters")
plan, fabricmanager = plan_mod.nvidia_driver_plan, plan_mod.nvidia_driver_fabricmanager
FilterError = plan_mod.AnsibleFilterError
KERNEL = "6.8.0-45-generic"


def os_data(name):
    return yaml.safe_load((ROLE / "vars" / f"{name}.yml").read_text())["_nvidia_driver_os"]


DEBIAN, UBUNTU, REDHAT = os_data("Debian"), os_data("Ubuntu"), os_data("RedHat")
# Loaded first on Debian 13 (vars/<distribution>-<major>.yml).
TRIXIE = os_data("Debian-13")


def test_every_family_has_data_for_each_mode():
    for data in (DEBIAN, TRIXIE, UBUNTU, REDHAT):
        for source, entry in data["sources"].items():
            for flavour in ("proprietary", "open", "userspace"):
                assert entry[flavour], f"{data['name']} {source} {flavour}"
                assert flavour in entry["driver_package"]
            assert entry["fabricmanager"]


def test_debian_userspace_only_is_the_lab_path():
    p = plan(DEBIAN, "userspace", kernel=KERNEL)
    assert p["packages"] == ["nvidia-smi=535.309.01-*", "libnvidia-ml1=535.309.01-*"]
    assert p["hold"] == ["libnvidia-ml1", "nvidia-alternative", "nvidia-smi"]
    assert p["headers"] == [] and p["prerequisites"] == [] and p["services"] == []
    assert p["kernel_modules"] == "none" and p["repo"] is None and p["driver_package"] == "nvidia-smi"


def test_debian_full_driver_proprietary_and_open():
    p = plan(DEBIAN, "full", "proprietary", kernel=KERNEL)
    assert p["headers"] == [f"linux-headers-{KERNEL}"] and p["prerequisites"] == ["dkms"]
    assert p["packages"][:2] == ["nvidia-kernel-dkms=535.309.01-*", "nvidia-driver=535.309.01-*"]
    assert "nvidia-persistenced" in p["packages"] and p["services"] == ["nvidia-persistenced"]
    assert {"nvidia-driver", "nvidia-kernel-dkms", "nvidia-alternative"} <= set(p["hold"])
    o = plan(DEBIAN, "full", "open", version="535.261.03", kernel=KERNEL)
    assert o["packages"][0] == "nvidia-open-kernel-dkms=535.261.03-*" and o["kernel_modules"] == "open"


def test_debian_has_no_other_source_or_branch():
    with pytest.raises(FilterError, match="'cuda' is not available on Debian 12; choose one of debian"):
        plan(DEBIAN, "full", source="cuda")
    with pytest.raises(FilterError, match="550 is not packaged by debian on Debian 12"):
        plan(DEBIAN, "full", branch="550")


def test_debian_13_takes_trixies_branch():
    p = plan(TRIXIE, "userspace", kernel=KERNEL)
    assert p["packages"] == ["nvidia-smi=550.163.01-*", "libnvidia-ml1=550.163.01-*"]
    f = plan(TRIXIE, "full", "open", kernel=KERNEL)
    assert f["packages"][0] == "nvidia-open-kernel-dkms=550.163.01-*" and f["branch"] == "550"
    with pytest.raises(FilterError, match="535 is not packaged by debian on Debian 13"):
        plan(TRIXIE, "full", branch="535")
    assert TRIXIE["sources"]["debian"]["fabricmanager_repo"]["url"].endswith("/debian13/x86_64/")


def test_ubuntu_canonical_server_packages():
    p = plan(UBUNTU, "full", "proprietary", branch="570", kernel=KERNEL)
    assert p["source"] == "canonical" and p["repo"] is None and p["version"] is None
    # No pinned version for Ubuntu: the branch's newest build, held afterwards.
    assert p["packages"] == ["nvidia-driver-570-server", "nvidia-dkms-570-server", "nvidia-utils-570-server"]
    assert p["hold"] == sorted(p["packages"])
    o = plan(UBUNTU, "full", "open", branch="570", version="570.195.03", kernel=KERNEL)
    assert o["packages"][0] == "nvidia-driver-570-server-open=570.195.03-*"
    assert o["driver_package"] == "nvidia-driver-570-server-open"


def test_ubuntu_cuda_repository():
    p = plan(UBUNTU, "full", "proprietary", source="cuda", branch="580", version="580.95.05", kernel=KERNEL)
    assert p["repo"]["keyring"] == "cuda-keyring_1.1-1_all.deb" and "ubuntu" in p["repo"]["url"]
    assert p["packages"] == ["cuda-drivers-580=580.95.05-1", "nvidia-driver-580=580.95.05-*"]
    assert plan(UBUNTU, "userspace", source="cuda", branch="580")["packages"] == [
        "nvidia-utils-580", "libnvidia-compute-580"]


def test_rhel_dnf_module_streams():
    p = plan(REDHAT, "full", "proprietary", kernel="5.14.0-427.el9.x86_64")
    assert p["manager"] == "dnf" and p["repo"]["file"] == "cuda-rhel9.repo"
    assert p["packages"] == ["@nvidia-driver:535-dkms", "nvidia-driver", "kmod-nvidia-latest-dkms"]
    assert p["headers"] == ["kernel-devel-5.14.0-427.el9.x86_64", "kernel-headers"]
    assert "@nvidia-driver:535-dkms" not in p["hold"] and "nvidia-driver" in p["hold"]
    assert "python3-dnf-plugin-versionlock" in p["prerequisites"]
    o = plan(REDHAT, "full", "open", branch="570", version="570.195.03")
    assert o["packages"] == ["@nvidia-driver:570-open", "nvidia-driver-570.195.03", "kmod-nvidia-open-dkms-570.195.03"]
    with pytest.raises(FilterError, match="'canonical' is not available"):
        plan(REDHAT, "full", source="canonical")


def test_none_mode_installs_nothing():
    p = plan(UBUNTU, "none")
    assert p["packages"] == [] and p["hold"] == [] and p["repo"] is None


@pytest.mark.parametrize(("bad", "message"), [
    ({"mode": "auto"}, "unknown mode 'auto'"),
    ({"kernel_modules": "nouveau"}, "must be open or proprietary"),
    ({"version": "latest"}, "must be an upstream version"),
    ({"version": "550.54.15"}, "550.54.15 is not on branch 535"),
])
def test_bad_settings_are_named(bad, message):
    args = {"mode": "full", "kernel_modules": "proprietary"} | bad
    with pytest.raises(FilterError, match=message):
        plan(DEBIAN, args.pop("mode"), **args)


@pytest.mark.parametrize(("data", "source", "installed", "expected"), [
    (DEBIAN, "", "535.309.01-0+deb12u1", ["nvidia-fabricmanager-535=535.309.01-1"]),
    (UBUNTU, "canonical", "570.195.03-0ubuntu0.24.04.1",
     ["nvidia-fabricmanager-570=570.195.03-*", "libnvidia-nscq-570=570.195.03-*"]),
    (UBUNTU, "cuda", "570.195.03-1", ["nvidia-fabricmanager-570=570.195.03-1"]),
    (REDHAT, "", "3:570.195.03-1.el9", ["nvidia-fabric-manager-570.195.03-1"]),
])
def test_fabric_manager_is_pinned_to_the_installed_driver(data, source, installed, expected):
    branch = installed.split(":")[-1].split(".")[0]
    assert fabricmanager(data, source, branch, installed) == expected


def test_debian_fabric_manager_comes_from_the_cuda_repository():
    assert DEBIAN["sources"]["debian"]["fabricmanager_repo"]["url"].endswith("/debian12/x86_64/")


def test_cuda_toolkits_side_by_side():
    assert cuda_mod.cuda_toolkit_packages(["12.4", "12.8"], "12.8") == ["cuda-toolkit-12-4", "cuda-toolkit-12-8"]
    with pytest.raises(FilterError, match=r"major\.minor"):
        cuda_mod.cuda_toolkit_packages(["12"], "12")
    with pytest.raises(FilterError, match=r"11\.8 is not in cuda_toolkit_versions"):
        cuda_mod.cuda_toolkit_packages(["12.4"], "11.8")
