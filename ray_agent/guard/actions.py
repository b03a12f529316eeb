"""What the guard does about an idle_held GPU: notify (log + webhook), stop the Ray job, kill the process.

Everything here runs in the guard's action worker thread, never in the sampler thread; every network call
has a timeout. Dry-run (the default) evaluates everything up to the last step and audits "dry_run".
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_agent.attribution import JobInfo, RayStateClient
from ray_agent.config import GuardConfig
from ray_agent.guard import notice
from ray_agent.guard.audit import DONE, DRY_RUN, FAILED, SKIPPED, rfc3339
from ray_agent.guard.policy import JOB_ACTIVE, Policy, ProcessName, process_name
from ray_agent.guard.tracker import STAGES, Escalation, Holder
from ray_agent.ray_api import RayApi, RayApiError
from ray_agent.users import Contact, User

log = logging.getLogger(__name__)

# Job states in which stopping makes sense (ray.job_submission.JobStatus).
_STOPPABLE = frozenset({"PENDING", "RUNNING"})
# How long the job list is reused between escalations that arrive together.
_JOBS_CACHE_SECONDS = 5.0
# After SIGKILL, how long to wait for the process to disappear before calling it a failure.
_SIGKILL_WAIT_SECONDS = 5.0


class ActionError(Exception):
    pass


# --- webhook --------------------------------------------------------------------------------------


class Webhook:
    """POSTs Slack-compatible JSON, retrying transport errors, 429 and 5xx with doubling backoff."""

    def __init__(
        self,
        config: GuardConfig,
        stop: threading.Event | None = None,
        on_failed_attempt: Callable[[], None] = lambda: None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.url_file = config.webhook_url_file
        self.url_env = config.webhook_url_env
        self.retries = config.webhook_retries
        self.backoff = config.webhook_backoff
        self.timeout = config.request_timeout
        self._stop = stop or threading.Event()
        self._on_failed_attempt = on_failed_attempt
        self._environ = os.environ if environ is None else environ

    @property
    def configured(self) -> bool:
        return self.url_file is not None or self.url_env is not None

    def url(self) -> str:
        """Read on every send, so that a rotated URL is picked up. Never logged: it is a secret."""
        if self.url_file is not None:
            try:
                url = self.url_file.read_text(encoding="utf-8").strip()
            except OSError as err:
                raise ActionError(f"cannot read webhook_url_file {self.url_file}: {err.strerror}") from None
            if not url:
                raise ActionError(f"webhook_url_file {self.url_file} is empty")
            return url
        assert self.url_env is not None
        url = self._environ.get(self.url_env, "").strip()
        if not url:
            raise ActionError(f"environment variable {self.url_env} (webhook_url_env) is empty or unset")
        return url

    def send(self, payload: Mapping[str, Any]) -> str:
        """Deliver or raise ActionError after the last attempt; returns a short description of the delivery."""
        client = RayApi(self.url(), timeout=self.timeout, name="webhook")
        last = ""
        for attempt in range(self.retries + 1):
            if attempt and self._stop.wait(self.backoff * 2 ** (attempt - 1)):
                raise ActionError(f"agent stopping; gave up after {attempt} attempt(s): {last}")
            try:
                status, _ = client.call("POST", "", payload)
                return f"delivered (HTTP {status}, attempt {attempt + 1})"
            except RayApiError as err:
                last = err.cause
                self._on_failed_attempt()
                if err.status is not None and err.status != 429 and err.status < 500:
                    raise ActionError(f"webhook refused the message: {last}") from None
        raise ActionError(f"webhook failed after {self.retries + 1} attempt(s): {last}")


# --- processes ------------------------------------------------------------------------------------


def _process_user(pid: int, proc_path: Path) -> str | None:
    import pwd

    try:
        uid = os.stat(proc_path / str(pid)).st_uid
    except OSError:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _wait_exit(pidfd: int | None, pid: int, timeout: float, stop: threading.Event) -> bool:
    """True once the process has exited (a zombie counts), False after `timeout`."""
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() >= deadline or stop.wait(0.05):
            return False


def terminate(pid: int, grace: float, stop: threading.Event | None = None) -> tuple[str, str]:
    """SIGTERM, wait up to `grace`, then SIGKILL. Returns (last signal sent, what happened).

    A pidfd pins the process, so a pid reused during the grace period is never signalled.
    """
    stop = stop or threading.Event()
    pidfd: int | None = None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise ActionError(f"pid {pid} is gone") from None
    except OSError:
        pidfd = None  # kernels before 5.3: plain signals, with the small pid-reuse window they have

    def send(sig: signal.Signals) -> None:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)

    started = time.monotonic()
    try:
        send(signal.SIGTERM)
        if _wait_exit(pidfd, pid, grace, stop):
            return "sigterm", f"exited {time.monotonic() - started:.1f}s after SIGTERM"
        send(signal.SIGKILL)
        if _wait_exit(pidfd, pid, _SIGKILL_WAIT_SECONDS, stop):
            return "sigkill", f"ignored SIGTERM for {grace:g}s; killed with SIGKILL"
        raise ActionError(f"pid {pid} survived SIGKILL for {_SIGKILL_WAIT_SECONDS:g}s")
    except ProcessLookupError:
        return "sigterm", "exited before it could be signalled again"
    except PermissionError:
        raise ActionError(f"not permitted to signal pid {pid} (the agent needs CAP_KILL or the same user)") from None
    finally:
        if pidfd is not None:
            os.close(pidfd)


# --- the action worker's handling of one escalation -----------------------------------------------


@dataclass(frozen=True, slots=True)
class _Context:
    escalation: Escalation
    names: Mapping[int, ProcessName]
    jobs: Mapping[str, JobInfo]
    jobs_error: str


class ActionRunner:
    """Carries out one escalation: policy per holder, then the stage's action, then one audit record each."""

    def __init__(
        self,
        config: GuardConfig,
        jobs: RayStateClient | None,
        webhook: Webhook,
        record: Callable[[dict[str, Any]], None],
        host: str,
        proc_path: Path = Path("/proc"),
        clock_time: Callable[[], float] = time.time,
        stop: threading.Event | None = None,
        users: tuple[User, ...] = (),
    ) -> None:
        self.config = config
        self.contacts = {u.name: u.contact for u in users}
        self.policy = Policy(config)
        self.jobs_client = jobs
        self.webhook = webhook
        self._record = record
        self.host = host
        self.proc_path = proc_path
        self._time = clock_time
        self._stop = stop or threading.Event()
        self._jobs_cache: tuple[float, dict[str, JobInfo]] | None = None

    # --- inputs ---

    def _jobs(self, holders: tuple[Holder, ...]) -> tuple[dict[str, JobInfo], str]:
        if self.jobs_client is None or not any(h.ray_job_id for h in holders):
            return {}, ""
        now = time.monotonic()
        if self._jobs_cache is not None and now - self._jobs_cache[0] < _JOBS_CACHE_SECONDS:
            return self._jobs_cache[1], ""
        try:
            jobs = {j.job_id: j for j in self.jobs_client.list_jobs() if j.job_id}
        except RayApiError as err:
            log.warning("idle guard: Ray Jobs API unavailable: %s", err)
            return {}, str(err)
        self._jobs_cache = (now, jobs)
        return jobs, ""

    def handle(self, escalation: Escalation) -> None:
        jobs, jobs_error = self._jobs(escalation.holders)
        names = {h.pid: process_name(h.pid, self.proc_path) for h in escalation.holders}
        context = _Context(escalation, names, jobs, jobs_error)
        if escalation.stage == "notify":
            self._notify(context)
        elif escalation.stage == "stop":
            self._stop_jobs(context)
        else:
            self._kill(context)

    # --- records ---

    def _audit(self, context: _Context, holder: Holder, action: str, outcome: str, reason: str) -> None:
        escalation = context.escalation
        job = context.jobs.get(holder.ray_job_id)
        name = context.names.get(holder.pid)
        self._record(
            {
                "time": rfc3339(self._time()),
                "gpu": escalation.gpu,
                "uuid": escalation.uuid,
                "pid": holder.pid,
                "user": holder.user,
                "os_user": holder.os_user,
                "process": (name.comm or name.argv0) if name else "",
                "ray_job_id": holder.ray_job_id,
                "submission_id": job.submission_id if job else holder.submission_id,
                "ray_actor": holder.ray_actor,
                "ray_task": holder.ray_task,
                "stage": escalation.stage,
                "action": action,
                "outcome": outcome,
                "reason": reason,
                "idle_seconds": round(escalation.idle_seconds, 1),
                "dry_run": self.config.dry_run,
            }
        )

    def _exempt(self, context: _Context, holder: Holder) -> tuple[str, str] | None:
        job = context.jobs.get(holder.ray_job_id)
        return self.policy.exemption(holder, context.names[holder.pid], job)

    # --- notify ---

    def _notify(self, context: _Context) -> None:
        escalation = context.escalation
        action = "webhook" if self.webhook.configured else "log"
        targets = []
        for holder in escalation.holders:
            exempt = self._exempt(context, holder)
            if exempt is not None:
                self._audit(context, holder, action, *exempt)
            else:
                targets.append(holder)
        if not targets:
            return
        text = self._text(context, targets)
        log.warning("idle guard: %s", text)
        if not self.webhook.configured:
            for holder in targets:
                self._audit(context, holder, action, DONE, "logged; no webhook configured")
            return
        try:
            outcome, reason = DONE, self.webhook.send(self._payload(context, targets, text))
        except ActionError as err:
            outcome, reason = FAILED, str(err)
            log.error("idle guard: notification for gpu %d failed: %s", escalation.gpu, err)
        for holder in targets:
            self._audit(context, holder, action, outcome, reason)

    def _next_stage(self, stage: str) -> tuple[str, float] | None:
        stages = self.config.stages
        delays = {"notify": stages.notify_after, "stop": stages.stop_after, "kill": stages.kill_after}
        current = delays[stage] or 0.0
        for name in STAGES[STAGES.index(stage) + 1 :]:
            delay = delays[name]
            if delay is not None:
                return name, max(0.0, delay - current)
        return None

    def _contact(self, holder: Holder) -> Contact:
        return self.contacts.get(holder.user, Contact())

    def _text(self, context: _Context, targets: list[Holder]) -> str:
        escalation = context.escalation
        following = self._next_stage(escalation.stage)
        after = ""
        if following is not None:
            verb = {"stop": "its Ray job will be stopped", "kill": "the process will be killed"}[following[0]]
            after = f" If it stays idle, {verb} in {_human(following[1])}."
            if self.config.dry_run:
                after += " (dry-run: nothing will actually be stopped)"
        owners = list(dict.fromkeys(h.user or "unknown user" for h in targets))
        mentions = list(dict.fromkeys(m for m in (self._contact(h).mention for h in targets) if m))
        return notice.render(
            self.config.notice_template,
            {
                "gpu": str(escalation.gpu),
                "uuid": escalation.uuid,
                "host": self.host,
                "idle": _human(escalation.idle_seconds),
                "holders": "; ".join(self._describe(context, h) for h in targets),
                "owners": ", ".join(owners),
                "mentions": " ".join(mentions),
                "next": after,
            },
        )

    def _describe(self, context: _Context, holder: Holder) -> str:
        parts = [f"pid {holder.pid}"]
        if holder.ray_job_id or holder.submission_id:
            job = context.jobs.get(holder.ray_job_id)
            submission = job.submission_id if job and job.submission_id else holder.submission_id
            parts.append(
                f"Ray job {holder.ray_job_id or '?'}" + (f" ({submission})" if submission else "")
            )
        if holder.ray_actor:
            parts.append(f"actor {holder.ray_actor}")
        if holder.ray_task:
            parts.append(f"task {holder.ray_task}")
        if holder.os_user and holder.os_user != holder.user:
            parts.append(f"Linux user {holder.os_user}")
        mention = self._contact(holder).mention
        who = holder.user or "unknown user"
        return f"{who}{' ' + mention if mention else ''} ({', '.join(parts)})"

    def _payload(self, context: _Context, targets: list[Holder], text: str) -> dict[str, Any]:
        escalation = context.escalation
        following = self._next_stage(escalation.stage)
        owners = []
        for name in dict.fromkeys(h.user for h in targets if h.user):
            contact = self.contacts.get(name, Contact())
            owners.append({"user": name, "email": contact.email, "slack_member_id": contact.slack_member_id})
        return {
            "text": text,
            "host": self.host,
            "gpu": escalation.gpu,
            "uuid": escalation.uuid,
            "state": "idle_held",
            "idle_seconds": round(escalation.idle_seconds, 1),
            "stage": escalation.stage,
            "next_stage": following[0] if following else None,
            "next_stage_in_seconds": following[1] if following else None,
            "dry_run": self.config.dry_run,
            # Who to tell: the owners with their contacts; `emails` for a mail route that wants addresses only.
            "owners": owners,
            "emails": [o["email"] for o in owners if o["email"]],
            "holders": [
                {
                    "pid": h.pid,
                    "user": h.user,
                    "os_user": h.os_user,
                    "ray_job_id": h.ray_job_id,
                    "submission_id": (
                        context.jobs[h.ray_job_id].submission_id if h.ray_job_id in context.jobs else h.submission_id
                    ),
                    "ray_actor": h.ray_actor,
                    "ray_task": h.ray_task,
                }
                for h in targets
            ],
        }

    # --- stop ---

    def _stop_jobs(self, context: _Context) -> None:
        action = "ray_job_stop"
        stopped: dict[str, tuple[str, str]] = {}  # submission id -> outcome, so one POST serves all holders
        for holder in context.escalation.holders:
            outcome, reason = self._stop_one(context, holder, stopped)
            self._audit(context, holder, action, outcome, reason)

    def _stop_one(self, context: _Context, holder: Holder, stopped: dict[str, tuple[str, str]]) -> tuple[str, str]:
        exempt = self._exempt(context, holder)
        if exempt is not None:
            return exempt
        active = self.policy.active_elsewhere(context.escalation, holder)
        if active is not None:
            return JOB_ACTIVE, active
        if not holder.ray_job_id:
            return SKIPPED, "process is not attributed to a Ray job"
        if self.jobs_client is None:
            return SKIPPED, "the Jobs API is not reachable from this node (attribution off or state_api false)"
        if context.jobs_error:
            return FAILED, f"Jobs API unavailable, cannot check the job's opt-out: {context.jobs_error}"
        job = context.jobs.get(holder.ray_job_id)
        if job is None:
            return SKIPPED, f"job {holder.ray_job_id} is not in the Jobs API's list"
        if job.type != "SUBMISSION" or not job.submission_id:
            return SKIPPED, f"job {job.job_id} was started by a driver (ray.init), not submitted; it cannot be stopped"
        if job.status not in _STOPPABLE:
            return SKIPPED, f"job {job.submission_id} is {job.status}"
        if self.config.dry_run:
            return DRY_RUN, f"would stop submission {job.submission_id}"
        if job.submission_id not in stopped:
            try:
                if self.jobs_client.stop_job(job.submission_id):
                    result = (DONE, f"stopped submission {job.submission_id}")
                else:
                    result = (SKIPPED, f"submission {job.submission_id} was no longer running")
                self._jobs_cache = None  # the job's status changed
            except RayApiError as err:
                result = (FAILED, str(err))
            stopped[job.submission_id] = result
        return stopped[job.submission_id]

    # --- kill ---

    def _kill(self, context: _Context) -> None:
        grace = self.config.stages.kill_grace or 0.0
        for holder in context.escalation.holders:
            action = "sigterm"
            exempt = self._exempt(context, holder)
            active = self.policy.active_elsewhere(context.escalation, holder) if exempt is None else None
            if exempt is not None:
                outcome, reason = exempt
            elif active is not None:
                outcome, reason = JOB_ACTIVE, active
            elif holder.ray_job_id and context.jobs_error:
                outcome, reason = FAILED, f"Jobs API unavailable, cannot check the job's opt-out: {context.jobs_error}"
            elif _process_user(holder.pid, self.proc_path) != holder.os_user:
                # Gone, or the pid now belongs to someone else: never signal a stranger.
                outcome, reason = SKIPPED, f"pid {holder.pid} is gone or no longer owned by {holder.os_user}"
            elif self.config.dry_run:
                outcome, reason = DRY_RUN, f"would send SIGTERM to pid {holder.pid}, SIGKILL after {grace:g}s"
            else:
                try:
                    action, reason = terminate(holder.pid, grace, self._stop)
                    outcome = DONE
                except ActionError as err:
                    outcome, reason = FAILED, str(err)
            self._audit(context, holder, action, outcome, reason)


def _human(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
