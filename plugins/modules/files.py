#!/usr/bin/python3
"""Ansible module: many small files, each with its content, owner, group and mode, in one call.

A copy task per file costs a module run (and a checksum round trip) each: a folder of dashboards costs one per
dashboard on every converge. This module compares and writes them all in one run. A file is replaced atomically
(a temporary file in the same directory, then rename), and a destination that is a symlink fails the task instead
of having root write where it points.
"""

from __future__ import annotations

import os
import stat
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.rayrack.cluster.plugins.module_utils.rayrack_paths import ensure_each, lstat_as, numeric_ids

DOCUMENTATION = r"""
module: files
short_description: Ensure many small files with their content, owner, group and mode in one module run
description:
  - Writes each file of O(files) whose content differs, atomically, and sets owner, group and mode where they
    differ. The parent directory must exist. A destination that is a symlink or not a regular file fails the task.
  - Supports check mode (reports what it would change).
options:
  files:
    description: The files.
    type: list
    elements: dict
    required: true
    suboptions:
      path:
        description: Absolute path.
        type: path
        required: true
      content:
        description: The whole content, as text.
        type: str
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
        description: Octal mode as a string, such as C("0644").
        type: str
        required: true
"""

RETURN = r"""
changed_paths:
  description: The paths written or whose owner, group or mode were set.
  type: list
  elements: str
  returned: always
"""


def ensure(entry: dict, check_mode: bool) -> bool:
    """Make ENTRY's file as it should be; True if anything was (or, in check mode, would be) changed."""
    path, data, mode = entry["path"], entry["content"].encode(), int(str(entry["mode"]), 8)
    uid, gid = numeric_ids(entry["owner"], entry["group"])
    st = lstat_as(path, "file")
    if st is not None:
        with open(path, "rb") as current:
            same = current.read() == data
        if same and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, mode):
            return False
        if same:
            if not check_mode:
                os.chown(path, uid, gid, follow_symlinks=False)
                os.chmod(path, mode)
            return True
    if not check_mode:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".rayrack-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chown(tmp, uid, gid)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return True


def main() -> None:
    module = AnsibleModule(
        argument_spec={"files": {"type": "list", "elements": "dict", "required": True, "options": {
            "path": {"type": "path", "required": True}, "content": {"type": "str", "required": True},
            "owner": {"type": "raw", "required": True}, "group": {"type": "raw", "required": True},
            "mode": {"type": "str", "required": True}}}},
        supports_check_mode=True)
    ensure_each(module, module.params["files"], "files", lambda entry: ensure(entry, module.check_mode))


if __name__ == "__main__":
    main()
