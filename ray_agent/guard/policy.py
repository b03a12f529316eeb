"""Who the guard may act on: allow lists, the per-job opt-out, and "still active elsewhere" checks.

The checks run per holding process, in this order, and the first that applies decides the outcome:

1. ``allow_listed``: the process's user, name, or Ray job matches an allow list (fnmatch patterns).
   The Linux user or the job's owner matches ``allow_users``; the process name (``comm``) or the base name of
   ``argv[0]`` match ``allow_processes``; the job's submission id, job id, entrypoint, or ``metadata["name"]`` match
   ``allow_job_patterns``.
2. ``opted_out``: the job's metadata has ``opt_out_metadata_key`` set to off/false/no/disabled
   (``ray job submit --metadata-json '{"rayrack.idle_guard": "off"}'``).
3. ``job_active`` (stop and kill only): the same Ray job or the same process holds another GPU on this node
   that is not idle_held, or another GPU's holders could not be read. Stopping a job for one idle GPU while
   it computes on another would destroy real work; the notification still goes out.

Whatever is exempt is still counted in the idle-seconds bill and audited.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from ray_agent.attribution import JobInfo
from ray_agent.config import GuardConfig
from ray_agent.guard.tracker import Escalation, Holder

OPT_OUT_VALUES = frozenset({"off", "false", "no", "disabled"})

ALLOW_LISTED = "allow_listed"
OPTED_OUT = "opted_out"
JOB_ACTIVE = "job_active"


@dataclass(frozen=True, slots=True)
class ProcessName:
    comm: str
    argv0: str


def process_name(pid: int, proc_path: Path = Path("/proc")) -> ProcessName:
    """The kernel's short name and the base name of argv[0]; empty strings when the process is gone."""
    base = proc_path / str(pid)
    try:
        comm = (base / "comm").read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        comm = ""
    try:
        argv0 = (base / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        argv0 = ""
    return ProcessName(comm, argv0.rsplit("/", 1)[-1])


def _matches(patterns: tuple[str, ...], *values: str) -> str | None:
    for pattern in patterns:
        for value in values:
            if value and fnmatchcase(value, pattern):
                return pattern
    return None


class Policy:
    def __init__(self, config: GuardConfig) -> None:
        self.config = config

    def exemption(self, holder: Holder, name: ProcessName, job: JobInfo | None) -> tuple[str, str] | None:
        """(outcome, reason) when this process must be left alone whatever the stage, else None."""
        config = self.config
        for user in dict.fromkeys(u for u in (holder.os_user, holder.user) if u):
            pattern = _matches(config.allow_users, user)
            if pattern:
                return ALLOW_LISTED, f"user {user} matches allow_users {pattern!r}"
        pattern = _matches(config.allow_processes, name.comm, name.argv0)
        if pattern:
            return ALLOW_LISTED, f"process {name.comm or name.argv0} matches allow_processes {pattern!r}"
        if job is not None:
            pattern = _matches(
                config.allow_job_patterns,
                job.submission_id,
                job.job_id,
                job.entrypoint,
                str(job.metadata.get("name", "")),
            )
            if pattern:
                return ALLOW_LISTED, f"job {job.submission_id or job.job_id} matches allow_job_patterns {pattern!r}"
            value = job.metadata.get(config.opt_out_metadata_key)
            if isinstance(value, str) and value.strip().lower() in OPT_OUT_VALUES:
                return OPTED_OUT, f"job metadata {config.opt_out_metadata_key}={value!r}"
        elif holder.ray_job_id and config.allow_job_patterns:
            # Without the job list, at least the job id can be matched.
            pattern = _matches(config.allow_job_patterns, holder.ray_job_id)
            if pattern:
                return ALLOW_LISTED, f"job {holder.ray_job_id} matches allow_job_patterns {pattern!r}"
        return None

    @staticmethod
    def active_elsewhere(escalation: Escalation, holder: Holder) -> str | None:
        """Why stopping or killing this holder would hit work still running on another GPU, if it would."""
        gpus = escalation.active_pids.get(holder.pid)
        if gpus:
            return f"pid {holder.pid} also holds gpu {_list(gpus)}, which is not idle"
        if holder.ray_job_id:
            gpus = escalation.active_jobs.get(holder.ray_job_id)
            if gpus:
                return f"job {holder.ray_job_id} also holds gpu {_list(gpus)}, which is not idle"
        if escalation.unreadable_gpus:
            return f"holders of gpu {_list(escalation.unreadable_gpus)} are unknown; the work may continue there"
        return None


def _list(gpus: tuple[int, ...]) -> str:
    return ",".join(str(g) for g in sorted(set(gpus)))
