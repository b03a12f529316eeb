"""`rayrack usage`: GPU-hours per user or Ray job, busy and idle-held, over a past period.

Read from the accounting recording rules (group ``rayrack.accounting.recording`` in
monitoring/prometheus/rules/rayrack-recording.yml), which record GPUs held per user and job at every rule
evaluation: summed over the period and multiplied by the group's interval they are GPU-seconds. Prometheus is
asked on the monitoring host (the monitoring group, else the head) over SSH, the way `rayrack status` reaches
the nodes, so nothing needs to open Prometheus's port. Its password and the cluster CA's certificate come from
the controller (the inventory, or what the monitoring roles generated) and reach the script on stdin.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from rayrack.inventory import Inventory
from rayrack.remote import run_python
from rayrack.users import secrets_dir

GROUP = "rayrack.accounting.recording"
KINDS = ("allocated", "busy", "idle_held")
BY = ("user", "job")
FORMATS = ("table", "csv", "json")
_SINCE = re.compile(r"^([1-9][0-9]*)([smhdw])$")

MONITORING_USER = "rayrack"  # the basic-auth user of the monitoring roles (roles/rayrack/vars/main.yml)

# Runs on the monitoring host: each (key, path, params) asked of the local Prometheus, the answers by key. Stdin
# carries {"asked": [...], "user", "password", "ca"}: TLS is checked against the CA, basic auth sent with each.
PROMETHEUS_QUERIES = r"""
import base64, json, ssl, sys, urllib.parse, urllib.request
base, out = sys.argv[1], {}
given = json.loads(sys.stdin.read())
context = ssl.create_default_context(cadata=given["ca"]) if given.get("ca") else None
opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))
headers = {}
if given.get("password"):
    pair = (given["user"] + ":" + given["password"]).encode()
    headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
for key, path, params in given["asked"]:
    request = urllib.request.Request(base + path + "?" + urllib.parse.urlencode(params), headers=headers)
    try:
        out[key] = json.load(opener.open(request, timeout=60))
    except Exception as exc:
        read = getattr(exc, "read", None)
        out[key] = {"status": "error", "error": read().decode(errors="replace") if read else str(exc)}
print("RAYRACK-PROBE " + json.dumps(out))
"""


class UsageError(Exception):
    pass


def parse_since(text: str) -> str:
    """A Prometheus range such as 7d, 12h or 30m (one number and one unit)."""
    if not _SINCE.match(text):
        raise UsageError(f"--since wants a number and one of s, m, h, d, w (e.g. 7d or 12h), got {text!r}")
    return text


def requests(by: str, since: str, at: float) -> list[tuple[str, str, dict[str, str]]]:
    """The Prometheus API calls one report needs."""
    labels, prefix = ("user", "user") if by == "user" else ("user, ray_job_id", "user_job")
    asked = [("rules", "/api/v1/rules", {"type": "record"})]
    for kind in KINDS:
        query = f"sum by ({labels}) (sum_over_time({prefix}:rayrack_gpus_{kind}:sum[{since}]))"
        asked.append((kind, "/api/v1/query", {"query": query, "time": f"{at:.3f}"}))
    if by == "job":
        query = f"group by (ray_job_id, submission_id, user) (last_over_time(job:rayrack_job_info:group[{since}]))"
        asked.append(("jobs", "/api/v1/query", {"query": query, "time": f"{at:.3f}"}))
    return asked


@dataclass(frozen=True)
class Row:
    user: str
    ray_job_id: str | None  # None when the report is by user
    submission_id: str | None
    gpu_seconds: float
    busy_gpu_seconds: float
    idle_gpu_seconds: float

    @property
    def idle_share(self) -> float | None:
        return self.idle_gpu_seconds / self.gpu_seconds if self.gpu_seconds else None

    def as_dict(self, by: str) -> dict[str, Any]:
        out = asdict(self)
        if by == "user":
            del out["ray_job_id"], out["submission_id"]
        out.update(gpu_hours=self.gpu_seconds / 3600, busy_gpu_hours=self.busy_gpu_seconds / 3600,
                   idle_gpu_hours=self.idle_gpu_seconds / 3600, idle_share=self.idle_share)
        return out


def _vector(answer: Mapping[str, Any] | None, what: str) -> list[dict[str, Any]]:
    if not answer or answer.get("status") != "success":
        raise UsageError(f"Prometheus could not answer the {what} query: {(answer or {}).get('error', 'no answer')}")
    return answer["data"]["result"]


def group_interval(rules_answer: Mapping[str, Any] | None) -> float:
    """The evaluation interval of the accounting rules: each recorded sample stands for that many seconds."""
    groups = ((rules_answer or {}).get("data") or {}).get("groups") or []
    for group in groups:
        if group.get("name") == GROUP:
            return float(group["interval"])
    raise UsageError(f"Prometheus has no rule group {GROUP}: converge the monitoring host (playbooks/monitoring.yml)")


def build_rows(by: str, answers: Mapping[str, Any], users: Iterable[str] = ()) -> list[Row]:
    """Prometheus's answers -> one row per user (every configured user, 0 when idle) or per Ray job."""
    interval = group_interval(answers.get("rules"))
    totals: dict[tuple[str, str], dict[str, float]] = {}
    for kind in KINDS:
        for sample in _vector(answers.get(kind), kind):
            metric = sample["metric"]
            key = (metric.get("user", ""), metric.get("ray_job_id", "") if by == "job" else "")
            totals.setdefault(key, dict.fromkeys(KINDS, 0.0))[kind] = float(sample["value"][1]) * interval
    submissions: dict[tuple[str, str], str] = {}
    if by == "job":
        for sample in _vector(answers.get("jobs"), "jobs"):
            metric = sample["metric"]
            submissions[(metric.get("user", ""), metric.get("ray_job_id", ""))] = metric.get("submission_id", "")
    else:
        for user in users:
            totals.setdefault((user, ""), dict.fromkeys(KINDS, 0.0))
    rows = [
        Row(user, job if by == "job" else None, submissions.get((user, job), "") if by == "job" else None,
            values["allocated"], values["busy"], values["idle_held"])
        for (user, job), values in totals.items()
    ]
    return sorted(rows, key=lambda r: (-r.gpu_seconds, r.user, r.ray_job_id or ""))


def render(by: str, rows: list[Row], fmt: str, since: str, interval: float | None = None) -> str:
    if fmt == "json":
        return json.dumps({"since": since, "by": by, "interval_seconds": interval,
                           "rows": [r.as_dict(by) for r in rows]}, indent=2)
    key_columns = ["user"] if by == "user" else ["ray_job_id", "submission_id", "user"]
    columns = [*key_columns, "gpu_hours", "busy_gpu_hours", "idle_gpu_hours", "idle_share"]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*columns, "gpu_seconds"])
        for row in rows:
            values = row.as_dict(by)
            writer.writerow([*(values[c] if values[c] is not None else "" for c in columns), values["gpu_seconds"]])
        return out.getvalue().rstrip("\n")
    table = [[*(["JOB", "SUBMISSION", "USER"] if by == "job" else ["USER"]), "GPU-HOURS", "BUSY", "IDLE",
              "IDLE SHARE"]]
    for row in rows:
        values = row.as_dict(by)
        keys = [str(values[c] or "-") for c in key_columns]
        share = "-" if row.idle_share is None else f"{row.idle_share:.0%}"
        table.append([*keys, f"{values['gpu_hours']:.2f}", f"{values['busy_gpu_hours']:.2f}",
                      f"{values['idle_gpu_hours']:.2f}", share])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table]
    if len(table) == 1:
        lines.append(f"(no GPU held in the last {since})")
    return "\n".join(lines)


def configured_users(inventory: Inventory) -> list[str]:
    users = inventory.setting("rayrack_users") or []
    return [u["name"] for u in users if isinstance(u, Mapping) and isinstance(u.get("name"), str)]


def local_address(listen: str) -> str:
    """Where a client on the monitoring host reaches a server listening on `listen` (loopback for a wildcard)."""
    host, _, port = str(listen).rpartition(":")
    return f"{'127.0.0.1' if host in ('', '0.0.0.0', '::', '[::]') else host}:{port}"


def credentials(inventory: Inventory) -> dict[str, str]:
    """Prometheus's password (rayrack_prometheus_password, else the generated file) and the cluster CA."""
    secrets = secrets_dir(inventory)
    given = inventory.setting("rayrack_prometheus_password")
    password_file, ca_file = secrets / "monitoring" / "prometheus.password", secrets / "ca" / "ca.crt"
    if isinstance(given, str) and given and "{{" not in given:
        password = given
    elif given:
        raise UsageError("rayrack_prometheus_password in the inventory is not plain text as ansible-inventory lists it "
                         "(Vault without its password?): give ansible the vault password (ANSIBLE_VAULT_PASSWORD_FILE)")
    elif password_file.exists():
        password = password_file.read_text().strip()
    else:
        raise UsageError(f"no password for Prometheus: {password_file} is missing and the inventory gives no "
                         "rayrack_prometheus_password (converge playbooks/monitoring.yml first)")
    if not ca_file.exists():
        raise UsageError(f"no cluster CA certificate at {ca_file}: converge the cluster first (site.yml)")
    return {"user": MONITORING_USER, "password": password, "ca": ca_file.read_text()}


def ask(inventory: Inventory, asked: list[tuple[str, str, dict[str, str]]]) -> dict[str, Any]:
    host = inventory.monitoring_host
    assert host is not None  # the CLI refuses an inventory without a head
    base = f"https://{local_address(host.setting('prometheus_listen_address'))}"
    given = {"asked": asked, **credentials(inventory)}
    answers = run_python(host, PROMETHEUS_QUERIES, [base], input_text=json.dumps(given), timeout=120)
    if set(answers) == {"error"}:
        raise UsageError(f"cannot ask Prometheus on {host.name}: {answers['error']}")
    return answers


def usage_text(inventory: Inventory, by: str, since: str, fmt: str, now: float | None = None) -> str:
    answers = ask(inventory, requests(by, since, time.time() if now is None else now))
    rows = build_rows(by, answers, configured_users(inventory) if by == "user" else ())
    return render(by, rows, fmt, since, group_interval(answers.get("rules")))
