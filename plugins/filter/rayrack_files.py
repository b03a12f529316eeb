"""Entries for rayrack.cluster.files (plugins/modules/files.py): a folder of files in one module run."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ansible.errors import AnsibleFilterError


def rayrack_controller_files(paths: Iterable[str]) -> dict[str, str]:
    """{file name: text} of files on the controller (the kit's own, such as its dashboards)."""
    contents = {}
    for path in sorted(str(p) for p in paths):
        name = Path(path).name
        if name in contents:
            raise AnsibleFilterError(f"rayrack_controller_files: two files named {name}")
        contents[name] = Path(path).read_text()
    return contents


def rayrack_file_entries(contents: Mapping[str, str], folder: str, owner: Any, group: Any,
                         mode: str = "0644") -> list[dict[str, Any]]:
    """rayrack.cluster.files entries: each {name: text} of CONTENTS as FOLDER/name, with one owner, group, mode."""
    entries = []
    for name, text in sorted(contents.items()):
        if "/" in name or name in ("", ".", ".."):
            raise AnsibleFilterError(f"rayrack_file_entries: {name!r} is not a plain file name")
        entries.append({"path": f"{str(folder).rstrip('/')}/{name}", "content": text, "owner": owner,
                        "group": group, "mode": mode})
    return entries


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"rayrack_controller_files": rayrack_controller_files, "rayrack_file_entries": rayrack_file_entries}
