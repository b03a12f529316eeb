"""What the kit's path modules (directories, files) share: owners by name or number, and the refusal of a path that
is not what it should be (a symlink above all: root must not write or chown where a user's link points)."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Callable


def numeric_ids(owner: object, group: object) -> tuple[int, int]:
    """(uid, gid) from names or numbers; KeyError for a name the node does not know."""
    uid = int(str(owner)) if str(owner).isdigit() else pwd.getpwnam(str(owner)).pw_uid
    gid = int(str(group)) if str(group).isdigit() else grp.getgrnam(str(group)).gr_gid
    return uid, gid


def lstat_as(path: str, kind: str) -> os.stat_result | None:
    """The path's own lstat when it is a `kind` (directory or file), None when missing; ValueError otherwise."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    is_kind, name = (stat.S_ISDIR, "directory") if kind == "directory" else (stat.S_ISREG, "regular file")
    if not is_kind(st.st_mode):
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else f"not a {name}"
        raise ValueError(f"{path} is {what}; remove it, then run again")
    return st


def ensure_each(module, entries: list[dict], name: str, ensure: Callable[[dict], bool]) -> None:
    """The modules' shared main loop: ENSURE each entry in order, then exit with the paths it changed; the first
    relative path or error fails the task, naming the module (NAME) and the path, with what changed before it."""
    changed_paths: list[str] = []
    for entry in entries:
        if not os.path.isabs(entry["path"]):
            module.fail_json(msg=f"{name}: {entry['path']!r} is not an absolute path", changed_paths=changed_paths)
        try:
            if ensure(entry):
                changed_paths.append(entry["path"])
        except (KeyError, ValueError, OSError) as exc:
            module.fail_json(msg=f"{name}: {entry['path']}: {exc}", changed_paths=changed_paths)
    module.exit_json(changed=bool(changed_paths), changed_paths=changed_paths)
