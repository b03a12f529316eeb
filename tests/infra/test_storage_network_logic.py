"""Pure logic of the storage and network roles: sysctl namespacing, firewall addresses, the scratch limit."""

import os
import time

import pytest

from .conftest import FILTERS, ROLES, load_module

tuning = load_module(FILTERS / "network_tuning.py", "network_tuning_filters")
firewall = load_module(FILTERS / "firewall.py", "firewall_filters")
evict = load_module(ROLES / "data_cache" / "files" / "rayrack-scratch-evict", "rayrack_scratch_evict")


@pytest.mark.parametrize("key", ["net.ipv4.tcp_rmem", "net.ipv4.ip_local_reserved_ports", "net.core.somaxconn",
                                 "net.ipv4.tcp_congestion_control", "net.ipv6.conf.all.mtu"])
def test_per_namespace_keys(key):
    assert tuning.network_tuning_is_namespaced(key)


@pytest.mark.parametrize("key", ["net.core.rmem_max", "net.core.wmem_max", "net.core.netdev_max_backlog",
                                 "net.core.default_qdisc", "net.ipv4.tcp_mem", "vm.swappiness", "fs.file-max",
                                 "kernel.pid_max"])
def test_kernel_wide_keys_are_never_namespaced(key):
    assert not tuning.network_tuning_is_namespaced(key)
    assert tuning.network_tuning_kernel_wide([key, "net.ipv4.tcp_rmem"]) == [key]


SYSCTL_OUTPUT = """net.core.rmem_max = 4194304
net.ipv4.tcp_rmem = 4096\t131072\t268435456
net.core.somaxconn = 4096
net.ipv4.tcp_mtu_probing = 1
"""


def test_pending_compares_words_and_leaves_out_global_keys_when_asked():
    desired = {"net.core.rmem_max": 268435456, "net.ipv4.tcp_rmem": "4096 131072  268435456",
               "net.core.somaxconn": 8192, "net.ipv4.tcp_mtu_probing": 1}
    assert tuning.network_tuning_pending(desired, SYSCTL_OUTPUT, True) == {
        "net.core.rmem_max": "268435456", "net.core.somaxconn": "8192"}
    assert tuning.network_tuning_pending(desired, SYSCTL_OUTPUT, False) == {"net.core.somaxconn": "8192"}


def test_pending_sets_keys_the_kernel_did_not_print():
    assert tuning.network_tuning_pending({"net.ipv4.tcp_tw_reuse": 1}, "", True) == {"net.ipv4.tcp_tw_reuse": "1"}


def test_reserved_ports_merge_adjacent_and_overlapping_ranges():
    ports = [6379, 8077, 8076, 10001, "10002-10999", 52365, 52366, 52367, 9489, 8090, "10500-10600"]
    assert tuning.network_tuning_port_list(ports) == "6379,8076-8077,8090,9489,10001-10999,52365-52367"


def test_the_mtu_check_pings_every_pair_up_to_the_mesh_size():
    nodes = [f"n{i}" for i in range(5)]
    pairs = {frozenset((me, peer)) for me in nodes for peer in tuning.network_tuning_mtu_peers(nodes, me, 5)}
    assert len(pairs) == 10
    assert tuning.network_tuning_mtu_peers(nodes, "n9", 5) == []


def test_beyond_the_mesh_size_each_node_pings_a_few_and_is_pinged_by_a_few():
    nodes = [f"n{i:03d}" for i in range(200)]
    peers = {me: tuning.network_tuning_mtu_peers(nodes, me, 16) for me in nodes}
    assert {len(p) for p in peers.values()} == {tuning.RING_PEERS}
    pinged_by = {node: sum(node in p for p in peers.values()) for node in nodes}
    assert set(pinged_by.values()) == {tuning.RING_PEERS}
    # The ring wraps: the last node pings the first ones.
    assert peers["n199"] == ["n000", "n001", "n002"]


def test_firewall_family_splits_and_normalises():
    sources = ["10.0.0.5", "10.0.0.0/24", "fd00::1", " ", "10.0.0.0/24", "192.168.1.7/24"]
    assert firewall.firewall_family(sources, 4) == ["10.0.0.0/24", "10.0.0.5/32", "192.168.1.0/24"]
    assert firewall.firewall_family(sources, 6) == ["fd00::1/128"]


def test_firewall_allows():
    assert firewall.firewall_allows("10.213.8.11", ["10.213.8.10", "10.213.8.11"])
    assert not firewall.firewall_allows("10.213.8.1", ["10.213.8.10", "10.213.8.11"])
    assert firewall.firewall_allows("10.213.8.1", ["10.213.8.0/24"])
    assert not firewall.firewall_allows("fd00::1", ["10.0.0.0/8"])


@pytest.mark.parametrize(("text", "expected"), [("80%", 800), ("100%", 1000), ("1024", 1024), ("2K", 2048),
                                                ("1.5M", 1572864), ("3G", 3 * 1024**3), ("1TB", 1024**4)])
def test_scratch_limit_parsing(text, expected):
    assert evict.parse_limit(text, 1000) == expected


@pytest.mark.parametrize("text", ["", "lots", "0%", "101%", "-5G", "5X"])
def test_scratch_limit_rejects_nonsense(text):
    with pytest.raises(ValueError):
        evict.parse_limit(text, 1000)


def write(path, size, age):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_scratch_limit_removes_least_recently_used_until_it_fits(tmp_path):
    keep = tmp_path / "pip"
    keep.mkdir()
    oldest = write(tmp_path / "datasets" / "a" / "old.bin", 64 * 1024, 3000)
    middle = write(tmp_path / "pip" / "wheel.whl", 64 * 1024, 2000)
    newest = write(tmp_path / "datasets" / "b" / "new.bin", 64 * 1024, 10)
    used = sum(p.stat().st_blocks * 512 for p in (oldest, middle, newest))
    newest_size = newest.stat().st_blocks * 512
    # Room for the newest file only.
    assert evict.main([str(tmp_path), str(newest_size + 10), "--keep", str(keep)]) == 0
    assert not oldest.exists() and not middle.exists() and newest.exists()
    assert not (tmp_path / "datasets" / "a").exists(), "emptied directories go"
    assert keep.is_dir(), "the cache directories the role made stay"
    assert used > newest_size


def test_scratch_limit_touches_nothing_under_the_limit_or_in_a_dry_run(tmp_path, capsys):
    files = [write(tmp_path / f"f{i}", 8192, 100 * i) for i in range(3)]
    assert evict.main([str(tmp_path), "1G"]) == 0
    assert evict.main([str(tmp_path), "1", "--dry-run"]) == 0
    assert all(f.exists() for f in files)
    assert "would remove 3 files" in capsys.readouterr().out


def test_scratch_limit_reports_a_bad_limit(tmp_path, capsys):
    assert evict.main([str(tmp_path), "lots"]) == 2
    assert "size limit" in capsys.readouterr().err
