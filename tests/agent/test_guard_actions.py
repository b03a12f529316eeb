"""Idle guard actions against real things on this machine: a webhook receiver and a Ray head answering on
127.0.0.1, and real child processes to signal. Nothing is mocked."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent.guard_support import TOKEN, RayHead, WebhookReceiver, attribution_for, guard_config, scenario_sampler
from agent.support import write_token
from ray_agent.attribution import Attribution
from ray_agent.clock import FakeClock
from ray_agent.config import AttributionConfig, CollectionConfig, GuardConfig
from ray_agent.gpu.fake import FakeBackend, parse_scenario
from ray_agent.guard import Guard
from ray_agent.guard.actions import ActionError, ActionRunner, Webhook, terminate
from ray_agent.guard.audit import FIELDS, read_audit
from ray_agent.guard.tracker import Escalation, Holder
from ray_agent.sampler import Sampler
from ray_agent.users import User, parse_contact

ME = pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture
def head() -> Iterator[RayHead]:
    server = RayHead()
    yield server
    server.close()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return write_token(tmp_path / "token", TOKEN)


def child(ignore_sigterm: bool = False) -> subprocess.Popen:
    """A real process that holds "a GPU" in the scenario; prints once its signal handling is in place."""
    code = "import signal, sys, time\n"
    if ignore_sigterm:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "print('ready', flush=True)\ntime.sleep(120)\n"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


# --- webhook --------------------------------------------------------------------------------------


def test_webhook_retries_with_backoff_until_delivered(tmp_path: Path) -> None:
    receiver = WebhookReceiver(fail_first=2)
    try:
        (tmp_path / "url").write_text(receiver.url + "/hook\n")
        failures: list[int] = []
        config = guard_config(tmp_path, webhook_url_file=tmp_path / "url", webhook_retries=3, webhook_backoff=0.2)
        webhook = Webhook(config, on_failed_attempt=lambda: failures.append(1))
        detail = webhook.send({"text": "hello"})
    finally:
        receiver.close()
    assert detail == "delivered (HTTP 200, attempt 3)"
    assert receiver.messages == [{"text": "hello"}]
    assert len(failures) == 2
    gaps = [b - a for a, b in zip(receiver.attempts, receiver.attempts[1:], strict=False)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4  # doubling backoff


def test_webhook_gives_up_after_the_retries_and_does_not_retry_a_refusal(tmp_path: Path) -> None:
    down = WebhookReceiver(fail_first=100)
    refusing = WebhookReceiver(fail_first=100, fail_status=404)
    try:
        environ = {"GUARD_HOOK": down.url}
        config = guard_config(tmp_path, webhook_url_env="GUARD_HOOK", webhook_retries=2, webhook_backoff=0.01)
        with pytest.raises(ActionError, match=r"failed after 3 attempt\(s\): HTTP 503"):
            Webhook(config, environ=environ).send({"text": "x"})
        assert len(down.attempts) == 3
        with pytest.raises(ActionError, match="refused the message: HTTP 404"):
            Webhook(config, environ={"GUARD_HOOK": refusing.url}).send({"text": "x"})
        assert len(refusing.attempts) == 1
        with pytest.raises(ActionError, match="GUARD_HOOK"):
            Webhook(config, environ={}).send({"text": "x"})
    finally:
        down.close()
        refusing.close()


# --- killing --------------------------------------------------------------------------------------


def test_sigterm_is_enough_for_a_process_that_honours_it(children: list[subprocess.Popen]) -> None:
    process = child()
    children.append(process)
    started = time.monotonic()
    signal_sent, detail = terminate(process.pid, grace=5.0)
    assert signal_sent == "sigterm" and "after SIGTERM" in detail
    assert process.wait(5) == -signal.SIGTERM
    assert time.monotonic() - started < 4.0  # did not sit out the grace period


def test_sigkill_follows_after_the_grace_period(children: list[subprocess.Popen]) -> None:
    process = child(ignore_sigterm=True)
    children.append(process)
    started = time.monotonic()
    signal_sent, detail = terminate(process.pid, grace=0.5)
    assert signal_sent == "sigkill" and "ignored SIGTERM for 0.5s" in detail
    assert process.wait(5) == -signal.SIGKILL
    assert time.monotonic() - started >= 0.5


def test_terminating_a_gone_process_fails_cleanly(children: list[subprocess.Popen]) -> None:
    process = child()
    process.kill()
    process.wait()
    children.append(process)
    with pytest.raises(ActionError, match="is gone"):
        terminate(process.pid, grace=0.1)


# --- the whole flow -------------------------------------------------------------------------------


def held_by(pids: list[int], user: str | None = None) -> str:
    """One GPU per pid, each held by that process and idle from the start; the user comes from /proc unless given."""
    extra = {"user": user} if user else {}
    gpus = [
        {
            "model": "NVIDIA L4",
            "memory_total": "24GiB",
            "utilization": 0.0,
            "processes": [{"pid": p, "memory": "8GiB", **extra}],
        }
        for p in pids
    ]
    return yaml.safe_dump({"gpus": gpus})


def run_guard(guard: Guard, sampler: Sampler, clock: FakeClock, seconds: float, interval: float = 10.0) -> None:
    """Feed snapshots to the guard as the sampler would, letting its workers finish each step."""
    end = clock.monotonic() + seconds
    while clock.monotonic() <= end:
        guard.observe(sampler.collect_once())
        assert guard.drain(15)
        clock.advance(interval)


def sampler_for(text: str, clock: FakeClock, attribution: Attribution | None) -> Sampler:
    return Sampler(
        FakeBackend(parse_scenario(text), clock),
        attribution,
        CollectionConfig(interval=10.0, call_timeout=1.0),
        clock,
    )


def make_guard(
    config: GuardConfig,
    head: RayHead | None,
    token_file: Path | None,
    clock: FakeClock,
    users: tuple[User, ...] = (),
) -> Guard:
    attribution = (
        AttributionConfig(enabled=True, dashboard_url=head.url, token_file=token_file, request_timeout=2.0)
        if head is not None
        else AttributionConfig(enabled=False)
    )
    guard = Guard(config, attribution, clock, host="node-a", users=users)
    guard.start()
    return guard


def by_stage(records: list[dict]) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for r in records:
        out.setdefault(r["stage"], []).append((r["gpu"], r["pid"], r["action"], r["outcome"]))
    return out


def test_escalation_notifies_stops_the_job_and_kills_the_process(
    tmp_path: Path, head: RayHead, token_file: Path, children: list[subprocess.Popen]
) -> None:
    process = child()
    children.append(process)
    head.add_actor(process.pid, "05000000", "Trainer")
    # Submitted through the gateway by alice, whose contact is her e-mail address and Slack member id.
    head.add_job("05000000", "raysubmit_idle1", {"name": "finetune", "rayrack.user": "alice"}, "python train.py")
    receiver = WebhookReceiver(fail_first=1)
    (tmp_path / "hook").write_text(receiver.url)
    clock = FakeClock()
    config = guard_config(tmp_path, dry_run=False, webhook_url_file=tmp_path / "hook", webhook_backoff=0.01)
    alice = User("alice", parse_contact("alice@example.org U0123ABCD"), max_gpus=1)
    guard = make_guard(config, head, token_file, clock, users=(alice,))
    try:
        attribution = attribution_for(head, token_file, clock)
        run_guard(guard, sampler_for(held_by([process.pid]), clock, attribution), clock, 600)
    finally:
        guard.stop()
        receiver.close()

    records = read_audit(config.audit_log)
    assert all(list(r) == list(FIELDS) for r in records)
    stages = by_stage(records)
    assert stages["notify"] == [(0, process.pid, "webhook", "done")]
    assert stages["stop"] == [(0, process.pid, "ray_job_stop", "done")]
    assert stages["kill"] == [(0, process.pid, "sigterm", "done")]
    stop = next(r for r in records if r["stage"] == "stop")
    assert (stop["user"], stop["os_user"], stop["ray_job_id"], stop["submission_id"], stop["ray_actor"]) == (
        "alice",
        ME,
        "05000000",
        "raysubmit_idle1",
        "Trainer",
    )
    assert stop["dry_run"] is False and stop["idle_seconds"] == 420.0
    # The Jobs API was asked with the token, for the submission id that belongs to the job id.
    assert head.stop_requests == ["raysubmit_idle1"]
    assert process.wait(5) == -signal.SIGTERM
    # One failed webhook attempt, then delivery; the message names who holds the GPU.
    assert len(receiver.attempts) == 2 and len(receiver.messages) == 1
    message = receiver.messages[0]
    assert (
        f"alice <@U0123ABCD> (pid {process.pid}, Ray job 05000000 (raysubmit_idle1), actor Trainer, Linux user {ME})"
        in message["text"]
    )
    assert message["holders"][0]["submission_id"] == "raysubmit_idle1"
    assert message["holders"][0]["user"] == "alice" and message["holders"][0]["os_user"] == ME
    # The owner's contact, for Slack (the mention in the text) and for a mail route (the address).
    assert message["owners"] == [{"user": "alice", "email": "alice@example.org", "slack_member_id": "U0123ABCD"}]
    assert message["emails"] == ["alice@example.org"]
    assert (message["gpu"], message["stage"], message["next_stage"], message["host"]) == (0, "notify", "stop", "node-a")
    snapshot = guard.latest()
    assert snapshot.webhook_failed_attempts_total == 1
    assert snapshot.actions_total == {
        ("notify", "webhook", "done"): 1,
        ("stop", "ray_job_stop", "done"): 1,
        ("kill", "sigterm", "done"): 1,
    }


def test_dry_run_stops_and_kills_nothing_and_says_so(
    tmp_path: Path, head: RayHead, token_file: Path, children: list[subprocess.Popen]
) -> None:
    process = child()
    children.append(process)
    head.add_actor(process.pid, "05000000", "Trainer")
    head.add_job("05000000", "raysubmit_idle1")
    clock = FakeClock()
    config = guard_config(tmp_path)  # dry_run is the default
    assert config.dry_run
    guard = make_guard(config, head, token_file, clock)
    try:
        run_guard(
            guard, sampler_for(held_by([process.pid]), clock, attribution_for(head, token_file, clock)), clock, 600
        )
    finally:
        guard.stop()
    stages = by_stage(read_audit(config.audit_log))
    assert stages == {
        "notify": [(0, process.pid, "log", "done")],
        "stop": [(0, process.pid, "ray_job_stop", "dry_run")],
        "kill": [(0, process.pid, "sigterm", "dry_run")],
    }
    reasons = [r["reason"] for r in read_audit(config.audit_log)]
    assert reasons[1] == "would stop submission raysubmit_idle1"
    assert reasons[2] == f"would send SIGTERM to pid {process.pid}, SIGKILL after 2s"
    assert head.stop_requests == [] and ("POST", "/api/jobs/raysubmit_idle1/stop") not in head.requests
    assert process.poll() is None  # still running


def test_allow_listed_user_gets_no_action(tmp_path: Path) -> None:
    receiver = WebhookReceiver()
    clock = FakeClock()
    config = guard_config(tmp_path, allow_users=("svc-*",), webhook_url_env="GUARD_HOOK_TEST", webhook_backoff=0.01)
    os.environ["GUARD_HOOK_TEST"] = receiver.url
    guard = make_guard(config, None, None, clock)
    try:
        run_guard(guard, scenario_sampler("guard-allow-user.yml", clock), clock, 600)
    finally:
        guard.stop()
        receiver.close()
        del os.environ["GUARD_HOOK_TEST"]
    records = read_audit(config.audit_log)
    gpu0 = [(r["stage"], r["outcome"]) for r in records if r["gpu"] == 0]
    assert gpu0 == [("notify", "allow_listed"), ("stop", "allow_listed"), ("kill", "allow_listed")]
    assert all("matches allow_users 'svc-*'" in r["reason"] for r in records if r["gpu"] == 0)
    gpu1 = [(r["stage"], r["outcome"]) for r in records if r["gpu"] == 1]
    # frank's fake pid is not a real process of frank's: never signalled, even in a test.
    assert gpu1 == [("notify", "done"), ("stop", "skipped"), ("kill", "skipped")]
    assert [m["gpu"] for m in receiver.messages] == [1]
    # Allow-listed GPUs still show up in the bill.
    assert {user for user, _ in guard.states.latest().idle_seconds_total} == {"svc-inference", "frank"}


def test_opt_out_metadata_and_job_patterns_exempt_jobs(tmp_path: Path, head: RayHead, token_file: Path) -> None:
    text = yaml.safe_dump(
        {
            "gpus": [
                {
                    "model": "T",
                    "memory_total": "8GiB",
                    "utilization": 0.0,
                    "processes": [{"pid": 3081, "user": "ann", "memory": 1}],
                },
                {
                    "model": "T",
                    "memory_total": "8GiB",
                    "utilization": 0.0,
                    "processes": [{"pid": 3082, "user": "ann", "memory": 1}],
                },
                {
                    "model": "T",
                    "memory_total": "8GiB",
                    "utilization": 0.0,
                    "processes": [{"pid": 3083, "user": "ann", "memory": 1}],
                },
                {
                    "model": "T",
                    "memory_total": "8GiB",
                    "utilization": 0.0,
                    "processes": [{"pid": 3084, "user": "ann", "memory": 1}],
                },
            ]
        }
    )
    head.add_actor(3081, "0a000000", "A")
    head.add_actor(3082, "0b000000", "B")
    head.add_actor(3083, "0c000000", "C")
    head.add_actor(3084, "0d000000", "D")
    head.add_job("0a000000", "raysubmit_a", {"rayrack.idle_guard": "off"})
    head.add_job("0b000000", "raysubmit_b", {}, "python serve.py --port 8000")
    head.add_job("0c000000", None)  # a driver started with ray.init(): not stoppable through the Jobs API
    head.add_job("0d000000", "raysubmit_d", {"name": "nightly-eval"})
    clock = FakeClock()
    config = guard_config(tmp_path, allow_job_patterns=("python serve.py*", "nightly-*"))
    guard = make_guard(config, head, token_file, clock)
    try:
        run_guard(guard, sampler_for(text, clock, attribution_for(head, token_file, clock)), clock, 450)
    finally:
        guard.stop()
    outcome = {(r["gpu"], r["stage"]): (r["outcome"], r["reason"]) for r in read_audit(config.audit_log)}
    assert outcome[(0, "notify")] == ("opted_out", "job metadata rayrack.idle_guard='off'")
    assert outcome[(0, "stop")][0] == "opted_out"
    assert outcome[(1, "stop")] == ("allow_listed", "job raysubmit_b matches allow_job_patterns 'python serve.py*'")
    assert outcome[(2, "notify")][0] == "done"
    assert outcome[(2, "stop")][0] == "skipped" and "started by a driver" in outcome[(2, "stop")][1]
    assert outcome[(3, "stop")] == ("allow_listed", "job raysubmit_d matches allow_job_patterns 'nightly-*'")
    assert head.stop_requests == []


def test_one_idle_gpu_does_not_stop_a_job_still_busy_on_another(
    tmp_path: Path, head: RayHead, token_file: Path
) -> None:
    head.add_actor(3061, "06000000", "Worker0")
    head.add_actor(3062, "06000000", "Worker1")
    head.add_actor(3063, "07000000", "Solo")
    head.add_job("06000000", "raysubmit_multi")
    head.add_job("07000000", "raysubmit_solo")
    clock = FakeClock()
    config = guard_config(tmp_path)
    guard = make_guard(config, head, token_file, clock)
    try:
        sampler = scenario_sampler("guard-multi-gpu-job.yml", clock, attribution_for(head, token_file, clock))
        run_guard(guard, sampler, clock, 700)
    finally:
        guard.stop()
    outcome = {(r["gpu"], r["stage"]): (r["outcome"], r["reason"]) for r in read_audit(config.audit_log)}
    assert not any(gpu == 0 for gpu, _ in outcome)
    assert outcome[(1, "notify")][0] == "done"
    assert outcome[(1, "stop")] == ("job_active", "job 06000000 also holds gpu 0, which is not idle")
    assert outcome[(1, "kill")][0] == "job_active"
    assert outcome[(2, "stop")] == ("dry_run", "would stop submission raysubmit_solo")


def test_unreachable_jobs_api_fails_stop_and_kill_but_still_notifies(tmp_path: Path, head: RayHead) -> None:
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")
    right = tmp_path / "token"
    right.write_text(TOKEN)
    head.add_actor(3091, "08000000", "A")
    head.add_job("08000000", "raysubmit_x")
    clock = FakeClock()
    config = guard_config(tmp_path)
    guard = make_guard(config, head, wrong, clock)  # the guard's requests use the wrong token
    text = held_by([3091], user="zed")
    try:
        run_guard(guard, sampler_for(text, clock, attribution_for(head, right, clock)), clock, 600)
    finally:
        guard.stop()
    outcome = {r["stage"]: (r["outcome"], r["reason"]) for r in read_audit(config.audit_log)}
    assert outcome["notify"][0] == "done"
    assert outcome["stop"][0] == "failed" and "HTTP 401 (is the token right?)" in outcome["stop"][1]
    assert outcome["kill"][0] == "failed" and "cannot check the job's opt-out" in outcome["kill"][1]


def test_the_notice_follows_the_template_and_names_the_owners_contacts(tmp_path: Path) -> None:
    receiver = WebhookReceiver()
    (tmp_path / "hook").write_text(receiver.url)
    config = guard_config(
        tmp_path, webhook_url_file=tmp_path / "hook", notice_template="{mentions} GPU {gpu} on {host} idles: {owners}"
    )
    records: list[dict] = []
    users = (User("alice", parse_contact("U0123ABCD")), User("bob", parse_contact("bob@example.org")))
    runner = ActionRunner(config, None, Webhook(config), records.append, "node-a", users=users)
    holders = (
        Holder(4242, "alice", "02000000", os_user="ray", submission_id="alice-raysubmit_x"),
        Holder(4243, "bob", "03000000", os_user="ray"),
        Holder(4244, "carol", os_user="carol"),  # no contact known: named, not mentioned
    )
    try:
        runner.handle(Escalation("notify", 0, "GPU-x", holders, idle_seconds=1800.0, taken_at=0.0))
    finally:
        receiver.close()
    message = receiver.messages[0]
    assert message["text"] == "<@U0123ABCD> bob@example.org GPU 0 on node-a idles: alice, bob, carol"
    assert message["emails"] == ["bob@example.org"]
    assert [o["user"] for o in message["owners"]] == ["alice", "bob", "carol"]
    assert message["holders"][0]["submission_id"] == "alice-raysubmit_x"
    # The audit log names the owner and the Linux user of every holder.
    assert [(r["user"], r["os_user"], r["outcome"]) for r in records] == [
        ("alice", "ray", "done"),
        ("bob", "ray", "done"),
        ("carol", "carol", "done"),
    ]
