"""Progress lines, the per-host summary and exit codes from ansible-runner events."""

from rayrack.progress import RunState, exit_code, format_duration, handle_event, summary


def ev(kind, **data):
    return {"event": kind, "event_data": data}


def feed(events, verbose=False):
    state, lines = RunState(), []
    for event in events:
        lines += handle_event(state, event, verbose)
    return state, lines


STATS = ev("playbook_on_stats", ok={"head": 30, "worker1": 51}, changed={"worker1": 10},
           failures={"head": 2}, dark={}, skipped={"head": 4, "worker1": 5})


def test_plays_changes_failures_and_messages_become_lines():
    state, lines = feed([
        ev("playbook_on_play_start", play="Upgrade the workers, one batch at a time"),
        ev("playbook_on_task_start", task="Stop Ray on the node"),
        ev("runner_on_ok", host="worker1", task="Stop Ray on the node", res={"changed": True}),
        ev("runner_on_ok", host="worker1", task="Read which wheelhouse", task_action="ansible.builtin.slurp",
           res={"changed": False}),
        ev("runner_on_ok", host="worker1", task="Check the node is back", task_action="ansible.builtin.assert",
           res={"changed": False, "msg": "on Ray 2.58.1, refused by the head\n(Ray 2.58.0)"}),
        ev("runner_on_failed", host="head", task="Write Ray's environment", res={"msg": "'x' is undefined"}),
        ev("runner_on_failed", host="head", task="Probe", ignore_errors=True, res={"msg": "ignored"}),
        ev("runner_on_unreachable", host="worker2", task="Gathering Facts", res={"msg": "ssh: no route"}),
    ])
    assert lines[0] == "PLAY Upgrade the workers, one batch at a time"
    assert "  worker1      changed    Stop Ray on the node" in lines
    assert not any("Read which wheelhouse" in line for line in lines)  # a plain ok is quiet
    assert any(line.endswith("Check the node is back: on Ray 2.58.1, refused by the head (Ray 2.58.0)")
               for line in lines)
    assert any("FAILED" in line and "'x' is undefined" in line for line in lines)
    assert not any("ignored" in line for line in lines)
    assert any("UNREACHABLE" in line and "no route" in line for line in lines)
    assert len(state.failures) == 2


def test_delegated_results_name_both_hosts():
    _, lines = feed([ev("runner_on_ok", host="worker1", task="Drain the node in Ray",
                        res={"changed": True, "_ansible_delegated_vars": {"ansible_host": "10.0.0.10"}})])
    assert lines == ["  worker1 -> 10.0.0.10 changed    Drain the node in Ray"]


def test_no_log_results_never_print_their_message():
    _, lines = feed([ev("runner_on_ok", host="head", task="Token", task_action="ansible.builtin.debug",
                        res={"msg": "secret", "_ansible_no_log": True})])
    assert lines == []


def test_verbose_shows_every_task_and_ok():
    _, lines = feed([ev("playbook_on_task_start", task="Probe"),
                     ev("runner_on_ok", host="head", task="Probe", res={}),
                     ev("runner_on_skipped", host="worker1", task="Probe")], verbose=True)
    assert lines == ["  TASK Probe", "  head         ok         Probe", "  worker1      skipped    Probe"]


def test_summary_and_exit_code_from_stats():
    state, _ = feed([STATS])
    rows = summary(state, 529, "failed")
    assert rows[0].split() == ["HOST", "OK", "CHANGED", "FAILED", "UNREACHABLE", "SKIPPED", "RESULT"]
    assert rows[1].split() == ["head", "30", "0", "2", "0", "4", "failed"]
    assert rows[2].split() == ["worker1", "51", "10", "0", "0", "5", "changed"]
    assert rows[3] == "failed in 8m49s"
    assert exit_code("failed", state, 2) == 2


def test_exit_codes():
    ok, _ = feed([ev("playbook_on_stats", ok={"head": 3}, changed={}, failures={}, dark={}, skipped={})])
    assert exit_code("successful", ok, 0) == 0
    dark, _ = feed([ev("playbook_on_stats", ok={"head": 3}, dark={"worker1": 1}, failures={})])
    assert exit_code("failed", dark, 4) == 3
    assert exit_code("canceled", RunState(), None) == 4


def test_durations():
    assert [format_duration(s) for s in (0, 59.6, 61, 3725)] == ["0s", "1m00s", "1m01s", "1h02m05s"]
