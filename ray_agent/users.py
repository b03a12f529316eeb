"""The cluster's users as the agent knows them (rayrack_users): name, contact for notices, GPU limit.

A contact is an e-mail address, a Slack member id, or both separated by a space, in either order::

    contact: alice@example.org
    contact: U0123ABCD
    contact: alice@example.org U0123ABCD

:func:`parse_contact` is the one place that rule lives; the role passes contacts through unchanged and the
agent's check-config (run when the role writes the configuration) rejects a malformed one, naming the user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A job's owner is stamped into its metadata by the gateway at submission; anything else is "unknown".
OWNER_METADATA_KEY = "rayrack.user"
# A Serve application's owner is stamped by the gateway into its runtime_env's env_vars (an application has no
# metadata): Ray keeps the deployed config in the GCS, so the owner outlives gateway and head restarts.
SERVE_OWNER_ENV_VAR = "RAYRACK_USER"
UNKNOWN_OWNER = "unknown"

# A user name, also usable as a Linux login and a submission id prefix. The inventory check
# (plugins/filter/rayrack_inventory.py, rayrack_users) and the gateway's users.json reader both use this one.
# Match it with fullmatch: a bare `$` also matches before a final newline ("alice\n").
USER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# No user may take the owner name of jobs submitted around the gateway.
RESERVED_USER_NAMES = frozenset({UNKNOWN_OWNER})
# Slack member ids: U (or W on Enterprise Grid) and upper-case letters and digits.
_SLACK_MEMBER = re.compile(r"^[UW][A-Z0-9]{2,}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


@dataclass(frozen=True, slots=True)
class Contact:
    email: str = ""
    slack_member_id: str = ""

    @property
    def mention(self) -> str:
        """How a Slack message addresses the person: <@U...>, else the e-mail address, else nothing."""
        if self.slack_member_id:
            return f"<@{self.slack_member_id}>"
        return self.email


@dataclass(frozen=True, slots=True)
class User:
    name: str
    contact: Contact = Contact()
    max_gpus: int | None = None  # None: no limit


def parse_contact(text: str) -> Contact:
    """'alice@example.org', 'U0123ABCD', or both separated by whitespace; ValueError says what is allowed."""
    email = member = ""
    words = text.split()
    if not words:
        return Contact()
    for word in words:
        if _EMAIL.match(word) and not email:
            email = word
        elif _SLACK_MEMBER.match(word) and not member:
            member = word
        else:
            words = []
            break
    if not words:
        raise ValueError("must be an e-mail address and/or a Slack member id such as U0123ABCD (at most one of "
                         f"each), separated by a space; got {text!r}")
    return Contact(email, member)


def job_owner(metadata: object) -> str:
    """The owner of a job from its metadata; jobs not submitted through the gateway are "unknown"."""
    if isinstance(metadata, dict):
        owner = metadata.get(OWNER_METADATA_KEY)
        if isinstance(owner, str) and owner:
            return owner
    return UNKNOWN_OWNER


def serve_app_owner(config: object) -> str:
    """The owner of a Serve application from its deployed config; apps deployed around the gateway are "unknown"."""
    runtime_env = config.get("runtime_env") if isinstance(config, dict) else None
    env_vars = runtime_env.get("env_vars") if isinstance(runtime_env, dict) else None
    owner = env_vars.get(SERVE_OWNER_ENV_VAR) if isinstance(env_vars, dict) else None
    return owner if isinstance(owner, str) and owner else UNKNOWN_OWNER
