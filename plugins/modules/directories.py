#!/usr/bin/python3
"""Ansible module: many directories, each with its owner, group and mode, in one call.

One `ansible.builtin.file` task per directory costs a module run each; a tree with a directory per user costs one
per user on every converge. This module checks and fixes them all in one run, parents first, and never follows a
symlink unless told to: a path that is one (a user could plant it where the tree is theirs) fails the task,
named, instead of having root change whatever it points to.
"""

from __future__ import annotations

import os
import stat

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.rayrack.cluster.plugins.module_utils.rayrack_paths import ensure_each, lstat_as, numeric_ids

DOCUMENTATION = r"""
module: directories
short_description: Ensure many directories with their owner, group and mode in one module run
description:
  - Creates each missing directory of O(directories) in order (list parents first) and sets its owner, group and
    mode where they differ; missing parents not in the list are made root's, 0755. Without O(follow), a path that
    exists as anything but a directory (a symlink too) fails the task.
  - Supports check mode (reports what it would change) and diff-free reporting of the changed paths.
options:
  directories:
    description: Directories, in creation order.
    type: list
    elements: dict
    required: true
    suboptions:
      path:
        description: Absolute path.
        type: path
        required: true
      owner:
        description: User name or numeric ID.
        type: raw
        required: true
      group:
        description: Group name or numeric ID.
        type: raw
        required: true
      mode:
        description: Octal mode as a string, such as C("2775").
        type: str
        required: true
  follow:
    description: Manage the directory a symlink points to (an admin's own layout), as M(ansible.builtin.file) does.
    type: bool
    default: false
"""

RETURN = r"""
changed_paths:
  description: The paths created or whose owner, group or mode were set.
  type: list
  elements: str
  returned: always
"""


def ensure(entry: dict, check_mode: bool, follow: bool = False) -> bool:
    """Make ENTRY's directory as it should be; True if anything was (or, in check mode, would be) changed."""
    path, mode = entry["path"], int(str(entry["mode"]), 8)
    if follow:
        path = os.path.realpath(path)
    uid, gid = numeric_ids(entry["owner"], entry["group"])
    st = lstat_as(path, "directory")
    if st is None:
        if not check_mode:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            os.mkdir(path, 0o700)  # owner first, then the mode: never briefly wider than asked
            os.chown(path, uid, gid, follow_symlinks=False)
            os.chmod(path, mode)
        return True
    changed = False
    if (st.st_uid, st.st_gid) != (uid, gid):
        changed = True
        if not check_mode:
            os.chown(path, uid, gid, follow_symlinks=False)
    # chown clears setuid/setgid bits: compare the mode after it.
    if stat.S_IMODE(os.lstat(path).st_mode if not check_mode else st.st_mode) != mode:
        changed = True
        if not check_mode:
            os.chmod(path, mode)
    return changed


def main() -> None:
    module = AnsibleModule(
        argument_spec={"directories": {"type": "list", "elements": "dict", "required": True, "options": {
            "path": {"type": "path", "required": True}, "owner": {"type": "raw", "required": True},
            "group": {"type": "raw", "required": True}, "mode": {"type": "str", "required": True}}},
            "follow": {"type": "bool", "default": False}},
        supports_check_mode=True)
    follow = module.params["follow"]
    ensure_each(module, module.params["directories"], "directories",
                lambda entry: ensure(entry, module.check_mode, follow))


if __name__ == "__main__":
    main()
