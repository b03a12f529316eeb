"""Who may write where on the shared tree: the directories, owners and modes the storage roles lay out."""

from __future__ import annotations

import importlib.util
import stat
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("rayrack_tree", REPO / "plugins/filter/rayrack_tree.py")
tree_rules = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tree_rules)

ADMIN_GID, RAY_GID = 2900, 997
USERS = [{"name": "alice", "uid": 2001}, {"name": "bob", "uid": 2002}]
LAYOUT = ["datasets", "models", "models/huggingface", "wheelhouse"]


def tree() -> dict[str, dict]:
    return {d["path"]: d for d in tree_rules.rayrack_shared_tree(LAYOUT, USERS, ADMIN_GID, RAY_GID)}


def test_parents_come_before_their_children():
    paths = [d["path"] for d in tree_rules.rayrack_shared_tree(LAYOUT, USERS, ADMIN_GID, RAY_GID)]
    for index, path in enumerate(paths):
        parent = path.rpartition("/")[0]
        assert not parent or parent in paths[:index], (path, paths)


def test_nothing_is_world_writable():
    for path, entry in tree().items():
        assert not int(entry["mode"], 8) & stat.S_IWOTH, path


def test_code_and_caches_are_roots_and_the_admin_groups():
    for path in LAYOUT:
        assert (tree()[path]["owner"], tree()[path]["group"], tree()[path]["mode"]) == (0, ADMIN_GID, "2775")


def test_each_user_owns_their_scratch_and_working_dir_and_ray_may_only_read_the_code():
    entries = tree()
    for user in USERS:
        scratch, code = entries[f"scratch/{user['name']}"], entries[f"ray/working_dirs/{user['name']}"]
        assert (scratch["owner"], scratch["group"], scratch["mode"]) == (user["uid"], RAY_GID, "2770")
        assert (code["owner"], code["group"], code["mode"]) == (user["uid"], RAY_GID, "2750")
        assert not int(code["mode"], 8) & stat.S_IWGRP, "jobs (group ray) must not change a user's code"
    for parent in ("scratch", "ray/working_dirs", "ray"):
        assert (entries[parent]["owner"], entries[parent]["group"], entries[parent]["mode"]) == (0, 0, "0755")


def test_the_smoke_markers_directory_is_sticky_and_rays():
    smoke = tree()["ray/smoke"]
    assert (smoke["owner"], smoke["group"], smoke["mode"]) == (0, RAY_GID, "1770")
    assert tree_rules.rayrack_smoke_dir("/srv/rayrack-shared/") == "/srv/rayrack-shared/ray/smoke"


def test_paths_under_a_root_keep_the_same_order_and_rules():
    under = tree_rules.rayrack_shared_tree(LAYOUT, USERS, ADMIN_GID, RAY_GID, "/srv/export/")
    plain = tree_rules.rayrack_shared_tree(LAYOUT, USERS, ADMIN_GID, RAY_GID)
    assert [d["path"] for d in under] == ["/srv/export/" + d["path"] for d in plain]
    assert [{k: v for k, v in d.items() if k != "path"} for d in under] == \
        [{k: v for k, v in d.items() if k != "path"} for d in plain]
