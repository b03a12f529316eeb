"""The shared tree's directories with their owners and modes: the one place that says who may write where.

Numeric IDs throughout: the tree is laid out where root is root (the NFS server, which need not know the
accounts), and NFS with sec=sys compares numbers, not names.
- Admin-curated directories (rayrack_shared_layout: datasets, models, wheelhouse): root and the admin group,
  setgid so what an admin adds stays the group's; read-only to other users and to every job.
- scratch/<user>: the user's, and Ray's group may write there too, so the user's jobs (which run as the ray
  user) can keep checkpoints and outputs next to the user's own files. No other user gets in.
- ray/working_dirs/<user>: the user's code, which jobs read in place (local://) but cannot change.
- ray/smoke: the smoke job's markers; sticky, so no job removes another's file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

ROOT = 0
# Parents of the per-user directories: root's, so that only the kit adds entries.
USER_PARENTS = {"scratch": "2770", "ray/working_dirs": "2750"}
SMOKE_DIR = "ray/smoke"


def rayrack_shared_tree(layout: Iterable[str], users: Iterable[Mapping[str, Any]], admin_gid: int,
                        ray_gid: int, root: str = "") -> list[dict[str, Any]]:
    """Every directory of the tree (path relative to it, or under ROOT when given; owner, group, mode), parents
    before children."""
    tree = {"ray": (ROOT, ROOT, "0755"), SMOKE_DIR: (ROOT, int(ray_gid), "1770")}
    for path in layout:
        tree[str(path).strip("/")] = (ROOT, int(admin_gid), "2775")
    for parent, mode in USER_PARENTS.items():
        tree[parent] = (ROOT, ROOT, "0755")
        for user in users:
            tree[f"{parent}/{user['name']}"] = (int(user["uid"]), int(ray_gid), mode)
    return [{"path": f"{root.rstrip('/')}/{path}" if root else path, "owner": owner, "group": group, "mode": mode}
            for path, (owner, group, mode) in sorted(tree.items(), key=lambda item: item[0].split("/"))]


def layout_errors(layout: Iterable[Any]) -> list[str]:
    """rayrack_shared_layout: relative paths of plain names, none inside the kit's own directories."""
    errors = []
    kit = {"ray", *USER_PARENTS}
    for entry in layout:
        parts = str(entry).strip("/").split("/")
        if not all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", part) for part in parts):
            errors.append(f"rayrack_shared_layout: {entry!r} must be a relative path of names (letters, digits, "
                          "'.', '_', '-'; no '..')")
        elif parts[0] in {p.split("/")[0] for p in kit}:
            errors.append(f"rayrack_shared_layout: {entry!r} lies in {parts[0]}/, which rayrack lays out itself "
                          "(users' directories, the smoke job)")
    return errors


def rayrack_smoke_dir(shared_dir: str) -> str:
    """Where the smoke job writes its markers, on the shared tree."""
    return f"{str(shared_dir).rstrip('/')}/{SMOKE_DIR}"


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"rayrack_shared_tree": rayrack_shared_tree, "rayrack_smoke_dir": rayrack_smoke_dir}
