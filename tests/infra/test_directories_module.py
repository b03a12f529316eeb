"""plugins/modules/directories.py and files.py: many directories, or many files, in one module run each."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from .conftest import REPO, load_module

# The modules import their module_utils as the collection rayrack.cluster, which .collections names.
sys.path.insert(0, str(REPO / ".collections"))
directories = load_module(REPO / "plugins" / "modules" / "directories.py", "rayrack_directories_module")
files = load_module(REPO / "plugins" / "modules" / "files.py", "rayrack_files_module")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sets owners")


def state(path) -> tuple[int, int, str]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode))


def test_makes_missing_directories_with_parents_then_changes_nothing(tmp_path):
    entry = {"path": str(tmp_path / "tree" / "scratch" / "alice"), "owner": 1234, "group": "4321", "mode": "2770"}
    assert directories.ensure(entry, check_mode=False)
    assert state(entry["path"]) == (1234, 4321, "0o2770")
    assert state(tmp_path / "tree" / "scratch") == (0, 0, "0o755")
    assert not directories.ensure(entry, check_mode=False)


def test_puts_back_a_changed_owner_and_mode_keeping_setgid(tmp_path):
    entry = {"path": str(tmp_path / "datasets"), "owner": "root", "group": 4321, "mode": "2775"}
    directories.ensure(entry, check_mode=False)
    os.chown(entry["path"], 1000, 1000)
    os.chmod(entry["path"], 0o777)
    assert directories.ensure(entry, check_mode=False)
    assert state(entry["path"]) == (0, 4321, "0o2775")


def test_check_mode_reports_without_changing(tmp_path):
    entry = {"path": str(tmp_path / "new"), "owner": 0, "group": 0, "mode": "0755"}
    assert directories.ensure(entry, check_mode=True)
    assert not (tmp_path / "new").exists()
    (tmp_path / "new").mkdir(mode=0o700)
    assert directories.ensure(entry, check_mode=True)
    assert state(tmp_path / "new")[2] == "0o700"


def test_a_planted_symlink_is_refused_unless_following_is_asked(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    link = tmp_path / "scratch"
    link.symlink_to(target)
    entry = {"path": str(link), "owner": 1234, "group": 1234, "mode": "0770"}
    with pytest.raises(ValueError, match="is a symlink"):
        directories.ensure(entry, check_mode=False)
    assert state(target) == (0, 0, "0o700")
    assert directories.ensure(entry, check_mode=False, follow=True)
    assert state(target) == (1234, 1234, "0o770")


def test_files_are_written_once_put_back_after_drift_and_never_through_a_symlink(tmp_path):
    entry = {"path": str(tmp_path / "board.json"), "content": '{"a": 1}', "owner": 0, "group": 4321, "mode": "0644"}
    assert files.ensure(entry, check_mode=False)
    assert (tmp_path / "board.json").read_text() == '{"a": 1}' and state(entry["path"]) == (0, 4321, "0o644")
    assert not files.ensure(entry, check_mode=False)
    (tmp_path / "board.json").write_text("{}")
    assert files.ensure(entry, check_mode=True) and (tmp_path / "board.json").read_text() == "{}"
    assert files.ensure(entry, check_mode=False) and (tmp_path / "board.json").read_text() == '{"a": 1}'
    os.chmod(entry["path"], 0o666)
    assert files.ensure(entry, check_mode=False) and state(entry["path"]) == (0, 4321, "0o644")
    assert [p.name for p in tmp_path.iterdir()] == ["board.json"], "no temporary file left behind"
    secret = tmp_path / "secret"
    secret.write_text("keep")
    (tmp_path / "board.json").unlink()
    (tmp_path / "board.json").symlink_to(secret)
    with pytest.raises(ValueError, match="is a symlink"):
        files.ensure(entry, check_mode=False)
    assert secret.read_text() == "keep"


def test_file_entries_from_the_controller_and_refused_names(tmp_path):
    entries_filter = load_module(REPO / "plugins" / "filter" / "rayrack_files.py", "rayrack_files_filters")
    (tmp_path / "b.json").write_text("B")
    (tmp_path / "a.json").write_text("A")
    contents = entries_filter.rayrack_controller_files([str(tmp_path / "b.json"), str(tmp_path / "a.json")])
    assert contents == {"a.json": "A", "b.json": "B"}
    entries = entries_filter.rayrack_file_entries(contents, "/var/lib/grafana/dashboards/ray/", "root", "grafana")
    assert entries == [
        {"path": "/var/lib/grafana/dashboards/ray/a.json", "content": "A", "owner": "root", "group": "grafana",
         "mode": "0644"},
        {"path": "/var/lib/grafana/dashboards/ray/b.json", "content": "B", "owner": "root", "group": "grafana",
         "mode": "0644"}]
    for bad in ("../etc.json", "", ".."):
        with pytest.raises(Exception, match="not a plain file name"):
            entries_filter.rayrack_file_entries({bad: "x"}, "/d", "root", "root")
