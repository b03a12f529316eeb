"""The wording of the guard's notices: a `str.format` template (guard.notice_template) and its fields.

Fields (all strings):

* ``gpu``, ``uuid``, ``host``: the idle GPU and this node;
* ``idle``: how long it has been idle, e.g. ``31m05s``;
* ``holders``: who holds it, e.g. ``alice <@U0123ABCD> (pid 4242, Ray job 02000000 (alice-raysubmit_x), Linux
  user ray)``, several separated by ``; ``;
* ``owners``: the owners' names, comma-separated; ``mentions``: their Slack mentions (``<@U...>``) or e-mail
  addresses, space-separated, empty for owners without a contact;
* ``next``: what happens next, with a leading space (`` If it stays idle, its Ray job will be stopped in
  2m00s.``), or empty.
"""

from __future__ import annotations

import string

NOTICE_FIELDS = ("gpu", "uuid", "host", "idle", "holders", "owners", "mentions", "next")
DEFAULT_NOTICE = "GPU {gpu} ({uuid}) on {host} has been idle for {idle} while held by {holders}.{next}"


def check_template(template: str) -> str:
    """The template when every field it names is one of NOTICE_FIELDS; ValueError naming the first other."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"not a valid format string ({err}); write a literal brace as {{{{ or }}}}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in NOTICE_FIELDS:
            raise ValueError(f"unknown field {{{name}}}; allowed fields: {', '.join(NOTICE_FIELDS)}")
        if spec or conversion:
            raise ValueError(f"field {{{name}}} takes no format spec or conversion")
    return template


def render(template: str | None, fields: dict[str, str]) -> str:
    return (template or DEFAULT_NOTICE).format(**fields)
