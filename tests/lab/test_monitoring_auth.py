"""The monitoring APIs behind credentials, on the converged lab (RAYRACK_LAB names it; default: molecule).

* A Ray job on the head (the monitoring host) is refused Prometheus, Alertmanager and Grafana, on loopback and on
  the head's own address, by the firewall's output rule: its counter grows by the job's attempts, and root on the
  head reaches the same ports. Grafana cannot be installed in the lab: a stand-in root starts on its port shows
  that the refusal is the rule's, not an empty port.
* From another node, Prometheus and Alertmanager answer 401 without the password or with a wrong one, 200 with it
  (the controller's generated password), over TLS checked against the cluster CA.

Every dashboard query and scrape target through that auth: tests/lab/test_monitoring.py.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab as labtool
import test_faults as faults

pytestmark = pytest.mark.lab

LAB = faults.LAB
PORTS = {"prometheus": 9090, "alertmanager": 9093, "grafana": 3000}
STANDIN_UNIT = "rayrack-grafana-standin"

# Connects to each monitoring port of each address; prints who it ran as, where, and what each attempt got.
PROBE = r"""
import json, os, pwd, socket, sys
found = {}
for address in sys.argv[1].split(","):
    for port in sys.argv[2].split(","):
        try:
            socket.create_connection((address, int(port)), timeout=5).close()
            found[f"{address}:{port}"] = "connected"
        except OSError as err:
            found[f"{address}:{port}"] = type(err).__name__
print("JOBRESULT " + json.dumps({"user": pwd.getpwuid(os.getuid()).pw_name, "host": socket.gethostname(),
                                 "found": found}))
"""

# Runs as root on another node: Prometheus' and Alertmanager's answers without a password, with a wrong one and
# with the right one (the passwords arrive on stdin), and to plain HTTP.
CREDENTIALS_PROBE = r"""
import base64, json, ssl, sys, urllib.error, urllib.request
head, passwords = sys.argv[1], json.load(sys.stdin)
context = ssl.create_default_context(cafile="/etc/rayrack/ca.crt")
paths = {"prometheus": ("9090", "/api/v1/query?query=up"), "alertmanager": ("9093", "/api/v2/status")}
def get(url, password, ctx):
    token = base64.b64encode(f"rayrack:{password}".encode()).decode()
    headers = {"Authorization": "Basic " + token} if password else {}
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10, context=ctx).status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError as err:
        return type(getattr(err, "reason", err)).__name__
out = {}
for service, (port, path) in paths.items():
    url = f"https://{head}:{port}{path}"
    out[service] = {"none": get(url, None, context), "wrong": get(url, "not-the-password", context),
                    "right": get(url, passwords[service], context),
                    "http": get(url.replace("https://", "http://"), passwords[service], None)}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def lab():
    if LAB is None:
        pytest.fail(f"lab {faults.LAB_NAME!r} is not up: `make integration` converges the molecule lab, then runs "
                    "these")
    return LAB


def sh(lab: labtool.Lab, node: labtool.Node, command: str, input_text: str | None = None) -> str:
    return faults.sh(lab, node, command, input_text=input_text)


def rule_packets(lab: labtool.Lab) -> int:
    """The output rule's counter on the head: packets it refused so far. (The chain's other rule, with
    rayrack_gcs_ft, is about Redis: every user but root and the Ray user.)"""
    chain = sh(lab, lab.nodes[0], "sudo nft list chain inet rayrack output")
    rules = [line for line in chain.splitlines() if "meta skuid" in line and 'oif "lo"' in line]
    assert len(rules) == 1, f"the head's output chain has no rule for the Ray user:\n{chain}"
    (rule,) = rules
    assert "reject with tcp reset" in rule, rule
    return int(re.search(r"counter packets (\d+)", rule).group(1))


@pytest.fixture(scope="module")
def grafana_port(lab):
    """Grafana's port on the head listens: Grafana itself where it is installed, else a stand-in run by root."""
    head = lab.nodes[0]
    port = PORTS["grafana"]
    listening = sh(lab, head, f"ss -Htln 'sport = :{port}'").strip()
    if not listening:
        sh(lab, head, f"sudo systemd-run --quiet --collect --unit {STANDIN_UNIT} "
                      f"python3 -m http.server --bind 0.0.0.0 {port}")
        deadline = time.monotonic() + 20
        while not sh(lab, head, f"ss -Htln 'sport = :{port}'").strip():
            assert time.monotonic() < deadline, "the Grafana stand-in did not start"
            time.sleep(0.3)
    try:
        yield port
    finally:
        if not listening:
            labtool.ssh(lab, head, f"sudo systemctl stop {STANDIN_UNIT}", check=False)


def test_a_ray_job_on_the_head_is_refused_every_monitoring_port(lab, grafana_port):
    head = lab.nodes[0]
    addresses, ports = f"127.0.0.1,{head.ip}", ",".join(str(p) for p in PORTS.values())
    started = time.monotonic()
    before = rule_packets(lab)
    command = "sudo -u ray sh -c " + shlex.quote(
        "set -a; . /etc/rayrack/ray.env; cd /var/lib/rayrack; python3 - "
        + " ".join(shlex.quote(a) for a in (head.ip, PROBE, f"{addresses} {ports}")))
    result = json.loads(sh(lab, head, command, input_text=faults.SUBMIT_AND_WAIT).strip().splitlines()[-1])
    assert result["status"] == "SUCCEEDED", result["logs"]
    job = json.loads(next(ln for ln in result["logs"].splitlines() if ln.startswith("JOBRESULT "))
                     .removeprefix("JOBRESULT "))
    refused = time.monotonic() - started
    assert (job["user"], job["host"]) == ("ray", head.name), job
    assert job["found"] and set(job["found"].values()) == {"ConnectionRefusedError"}, job["found"]
    # Each refused attempt is a SYN the rule reset (a retry may add more).
    assert rule_packets(lab) - before >= len(job["found"]), "the output rule did not count the job's attempts"
    # Root on the head reaches every one of them: the ports listen, and the rule is about the user.
    root = sh(lab, head, f"sudo python3 - {addresses} {ports}", input_text=PROBE)
    found = json.loads(root.removeprefix("JOBRESULT "))["found"]
    assert set(found.values()) == {"connected"}, found
    print(f"\n{len(job['found'])} connections refused to the job (ray) and accepted for root; job {refused:.1f} s")


def test_another_node_needs_the_password(lab):
    head, worker = lab.nodes[0], lab.nodes[1]
    secrets = lab.inventory_dir / ".secrets" / "monitoring"
    passwords = {s: (secrets / f"{s}.password").read_text().strip() for s in ("prometheus", "alertmanager")}
    out = json.loads(sh(lab, worker, f"sudo python3 -c {shlex.quote(CREDENTIALS_PROBE)} {head.ip}",
                        input_text=json.dumps(passwords)))
    assert set(out) == {"prometheus", "alertmanager"}
    for service, answers in out.items():
        assert answers == {"none": 401, "wrong": 401, "right": 200, "http": 400}, (service, answers)
