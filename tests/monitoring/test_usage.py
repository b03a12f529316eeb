"""`rayrack usage` against a real Prometheus: the accounting recording rules evaluated every second over an
agent's series, the report's queries as the monitoring host runs them, and the three output formats."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from local_prometheus import Exporter, running

from rayrack.usage import PROMETHEUS_QUERIES, UsageError, build_rows, parse_since, render, requests

pytestmark = pytest.mark.promtool

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "monitoring" / "prometheus" / "rules" / "rayrack-recording.yml"

# One node: GPU 0 held by alice's job and busy; GPU 1 shared by alice's job and bob's, idle-held.
AGENT = """\
rayrack_gpu_owner_share{gpu="0",uuid="GPU-a",user="alice",ray_job_id="02000000"} 1
rayrack_gpu_owner_share{gpu="1",uuid="GPU-b",user="alice",ray_job_id="02000000"} 0.5
rayrack_gpu_owner_share{gpu="1",uuid="GPU-b",user="bob",ray_job_id="03000000"} 0.5
rayrack_gpu_state{gpu="0",uuid="GPU-a",state="busy"} 1
rayrack_gpu_state{gpu="0",uuid="GPU-a",state="idle_held"} 0
rayrack_gpu_state{gpu="1",uuid="GPU-b",state="busy"} 0
rayrack_gpu_state{gpu="1",uuid="GPU-b",state="idle_held"} 1
rayrack_job_info{ray_job_id="02000000",submission_id="alice-raysubmit_a",user="alice"} 1
rayrack_job_info{ray_job_id="03000000",submission_id="bob-raysubmit_b",user="bob"} 1
"""


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus")
    agent = Exporter(AGENT)
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "ray-agent", "static_configs": [
            {"targets": [f"127.0.0.1:{agent.port}"], "labels": {"node": "w1"}}]}],
    }))
    try:
        with running(config, tmp / "data") as server:
            server.wait_for_targets(1)
            deadline = time.monotonic() + 60
            query = 'count_over_time(user:rayrack_gpus_allocated:sum{user="alice"}[1m])'
            while True:
                answer = server.get("/api/v1/query", {"query": query})
                if answer.get("data", {}).get("result") and float(answer["data"]["result"][0]["value"][1]) >= 4:
                    break
                assert time.monotonic() < deadline, f"the accounting rules recorded nothing: {answer}"
                time.sleep(0.5)
            yield server
    finally:
        agent.shutdown()


def ask(server, by: str, since: str = "1h") -> tuple[dict, float]:
    at = time.time()
    return {key: server.get(path, params) for key, path, params in requests(by, since, at)}, at


def samples(server, series: str, at: float) -> float:
    answer = server.get("/api/v1/query", {"query": f"count_over_time({series}[1h])", "time": f"{at:.3f}"})
    return float(answer["data"]["result"][0]["value"][1])


def test_gpu_seconds_per_user_busy_and_idle(prometheus):
    answers, at = ask(prometheus, "user")
    rows = {r.user: r for r in build_rows("user", answers, users=["alice", "bob", "carol"])}
    # Each recorded sample stands for the group's 1 s interval: alice holds 1.5 GPUs at every one.
    count = samples(prometheus, 'user:rayrack_gpus_allocated:sum{user="alice"}', at)
    assert rows["alice"].gpu_seconds == pytest.approx(1.5 * count)
    assert rows["alice"].busy_gpu_seconds == pytest.approx(1.0 * count)
    assert rows["alice"].idle_gpu_seconds == pytest.approx(0.5 * count)
    assert rows["alice"].idle_share == pytest.approx(1 / 3)
    assert rows["bob"].idle_share == pytest.approx(1.0)
    # A configured user who held nothing is listed with zero (and no idle share).
    assert (rows["carol"].gpu_seconds, rows["carol"].idle_share) == (0.0, None)
    assert [r.user for r in build_rows("user", answers, users=["carol"])][-1] == "carol"


def test_per_job_rows_carry_the_submission_id(prometheus):
    answers, _ = ask(prometheus, "job")
    rows = build_rows("job", answers)
    assert [(r.ray_job_id, r.submission_id, r.user) for r in rows] == [
        ("02000000", "alice-raysubmit_a", "alice"),
        ("03000000", "bob-raysubmit_b", "bob"),
    ]
    assert rows[0].gpu_seconds == pytest.approx(3 * rows[1].gpu_seconds)


def test_the_monitoring_hosts_script_answers_like_prometheus(prometheus):
    """The script `rayrack usage` runs over SSH, run here with this Python against the same Prometheus (through
    TLS and basic auth: tests/monitoring/test_web_auth.py)."""
    asked = requests("user", "1h", time.time())
    result = subprocess.run([sys.executable, "-c", PROMETHEUS_QUERIES, prometheus.base],
                            input=json.dumps({"asked": asked}),
                            capture_output=True, text=True, timeout=60, check=True)
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("RAYRACK-PROBE "))
    answers = json.loads(line.removeprefix("RAYRACK-PROBE "))
    assert set(answers) == {"rules", "allocated", "busy", "idle_held"}
    rows = {r.user: r for r in build_rows("user", answers)}
    assert rows["alice"].gpu_seconds > rows["bob"].gpu_seconds > 0
    # A query Prometheus refuses comes back as its error, which the report names.
    bad = [("allocated", "/api/v1/query", {"query": "sum by (user) ("})]
    result = subprocess.run([sys.executable, "-c", PROMETHEUS_QUERIES, prometheus.base],
                            input=json.dumps({"asked": bad}),
                            capture_output=True, text=True, timeout=60, check=True)
    answer = json.loads(result.stdout.removeprefix("RAYRACK-PROBE "))
    with pytest.raises(UsageError, match="could not answer the allocated query"):
        build_rows("user", {"rules": answers["rules"], **answer})


def test_formats(prometheus):
    answers, _ = ask(prometheus, "user")
    rows = build_rows("user", answers, users=["carol"])
    document = json.loads(render("user", rows, "json", "1h", 1.0))
    assert document["by"] == "user" and document["interval_seconds"] == 1.0
    alice = next(r for r in document["rows"] if r["user"] == "alice")
    assert set(alice) == {"user", "gpu_seconds", "busy_gpu_seconds", "idle_gpu_seconds", "gpu_hours",
                          "busy_gpu_hours", "idle_gpu_hours", "idle_share"}
    table = render("user", rows, "table", "1h").splitlines()
    assert table[0].split() == ["USER", "GPU-HOURS", "BUSY", "IDLE", "IDLE", "SHARE"]
    assert table[1].startswith("alice") and table[1].endswith("33%")
    assert table[-1].split()[0] == "carol" and table[-1].endswith("-")
    parsed = list(csv.DictReader(io.StringIO(render("user", rows, "csv", "1h"))))
    assert parsed[0]["user"] == "alice" and float(parsed[0]["idle_share"]) == pytest.approx(1 / 3)
    assert parsed[-1] == {"user": "carol", "gpu_hours": "0.0", "busy_gpu_hours": "0.0", "idle_gpu_hours": "0.0",
                          "idle_share": "", "gpu_seconds": "0.0"}


def test_rules_missing_and_bad_periods():
    with pytest.raises(UsageError, match=r"no rule group rayrack\.accounting\.recording"):
        build_rows("user", {"rules": {"status": "success", "data": {"groups": []}}})
    for text in ("7", "7days", "-1d", "0d"):
        with pytest.raises(UsageError, match="--since"):
            parse_since(text)
    assert parse_since("10m") == "10m"
