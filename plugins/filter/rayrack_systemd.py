"""Quoting for systemd unit files: one value as one argument of an Exec*= command line, whatever it holds.

Shell quoting (Ansible's `quote`) is wrong there: systemd unescapes backslashes inside single quotes too, expands
%-specifiers in every word (`%h` is a home directory) and $VAR / ${VAR} from the environment when the command
runs. `rayrack_systemd_quote` double-quotes a value with systemd's C escapes, `%%` and `$$`, so the program
receives exactly the value (systemd.service(5) "Command lines", systemd.syntax(7) "Quoting").
"""

from __future__ import annotations

from typing import Any

_ESCAPES = {"\\": "\\\\", '"': '\\"', "%": "%%", "$": "$$", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def rayrack_systemd_quote(value: Any) -> str:
    """A value as one Exec*= argument: double quotes, with systemd's escapes for what it would interpret."""
    out = []
    for char in str(value):
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")  # no raw control character may end or split the unit's line
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"rayrack_systemd_quote": rayrack_systemd_quote}
