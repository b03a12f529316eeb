"""The head fails and comes back while a model is served (rayrack_gcs_ft and rayrack_serve_enabled, on in the lab).

alice deploys an echo model with the stock `serve deploy` through the jobs gateway, from code on the shared tree
(a `local://` working dir every node sees), with a replica on each worker. A detached actor on a worker counts.
A client on worker1 sends requests to both workers' proxies at a steady rate while the head's Ray unit is killed
(SIGKILL to every process of it) and systemd brings it back. With the GCS in Redis the workers' raylets keep
their processes, the actor keeps its count, at least 99 % of the requests succeed and the cluster is whole
again. test_day2.py measures the same without fault tolerance. Redis itself refuses a client without its
password, a login user even with it, and a machine on the lab network that is not a node.

The figures (outage, request success, rejoin) are printed and written to .cache/lab-head-ft.json.
RAYRACK_LAB names another lab (default: molecule).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab as labtool
from test_faults import alive_nodes, all_alive, job_runs_everywhere, sh, unit, wait_for
from test_gateway import install, install_token

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
LAB_NAME = os.environ.get("RAYRACK_LAB", "molecule")
LAB = labtool.load(LAB_NAME)
RESULTS = REPO / ".cache" / "lab-head-ft.json"
PYTHON = "/opt/rayrack/venv/bin/python"
SERVE = "/opt/rayrack/venv/bin/serve"
SERVE_PORT = 8000
STORE_PORT = 6380
# Where alice keeps code that jobs and replicas read but cannot change (her working_dirs directory).
CODE_DIR = "/srv/rayrack-shared/ray/working_dirs/alice"
GATEWAY = f"https://{LAB.nodes[0].ip}:8443" if LAB else ""
# Requests per second from the client, to the two workers' proxies in turn.
RATE = 20

ECHO = textwrap.dedent('''
    import os

    import ray
    from ray import serve


    @serve.deployment
    class Echo:
        def __init__(self, version: str):
            self.version, self.node = version, ray.util.get_node_ip_address()

        async def __call__(self, request):
            return {"version": self.version, "node": self.node, "pid": os.getpid()}


    def build(args: dict):
        return Echo.bind(args.get("version", "v1"))
''')

# Runs as alice on worker1 through the gateway: one job that gets or creates the detached counter on worker2
# (pinned by the worker's own resource), adds ARGV[2] and prints its count and process.
COUNTER_JOB = textwrap.dedent('''
    import json, sys
    import ray
    ray.init()

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self):
            self.n = 0
        def add(self, k):
            self.n += k
            return self.n
        def where(self):
            import os
            return ray.util.get_node_ip_address(), os.getpid()

    counter = Counter.options(name="ft-counter", namespace="rayrack-ft", lifetime="detached", get_if_exists=True,
                              resources={sys.argv[1]: 0.001}).remote()
    n = ray.get(counter.add.remote(int(sys.argv[2])), timeout=60)
    print("COUNTER " + json.dumps({"n": n, "where": ray.get(counter.where.remote(), timeout=60)}))
''')

# A steady client on worker1: RATE requests a second to the URLs in turn until the stop file appears or DURATION
# passes; then one line of JSON: [sent time, url index, ok] per request.
LOAD = textwrap.dedent('''
    import json, os, sys, time, urllib.request
    urls, stop, out = sys.argv[1].split(","), sys.argv[4], sys.argv[5]
    rate, duration = float(sys.argv[2]), float(sys.argv[3])
    results, start, i = [], time.time(), 0
    while time.time() - start < duration and not os.path.exists(stop):
        sent = time.time()
        try:
            body = json.load(urllib.request.urlopen(urls[i % len(urls)], timeout=2))
            ok = body.get("version") is not None
        except Exception:
            ok = False
        results.append([sent, i % len(urls), ok])
        i += 1
        time.sleep(max(0.0, start + i / rate - time.time()))
    with open(out + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(out + ".tmp", out)
''')


def node(name: str) -> labtool.Node:
    return next(n for n in LAB.nodes if n.name == name)


def as_alice(command: str, input_text: str | None = None, timeout: int = 120) -> str:
    """COMMAND in alice's login on worker1, Ray's CLI speaking to the gateway with her token."""
    script = (f"cd ~ && export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.rayrack/token "
              f"RAY_ADDRESS={shlex.quote(GATEWAY)} REQUESTS_CA_BUNDLE=$HOME/.rayrack/ca.crt "
              f"SSL_CERT_FILE=$HOME/.rayrack/ca.crt && {command}")
    return sh(LAB, node("worker1"), f"timeout {timeout} sudo -u alice -H bash -c {shlex.quote(script)}",
              input_text=input_text)


# Runs as the ray user on the head with Ray's environment: every alive node's resources.
RESOURCES = r"""
import json, sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("RES " + json.dumps([n["Resources"] for n in ray.nodes() if n["Alive"]]))
"""


def worker_resource() -> str:
    """A resource every worker has and the head lacks: the GPU model Ray schedules by."""
    head = node("head")
    out = sh(LAB, head, "sudo -u ray sh -c " + shlex.quote(
        f"set -a; . /etc/rayrack/ray.env; cd /var/lib/rayrack; {PYTHON} - {head.ip}:6379"), input_text=RESOURCES)
    rows = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RES ")).removeprefix("RES "))
    names = [{k for k in r if k.startswith("accelerator_type:")} for r in rows]
    common = set.intersection(*[n for n in names if n])
    assert common, rows
    return sorted(common)[0]


def serve_config(version: str, resource: str) -> str:
    return json.dumps({"applications": [{
        "name": "echo", "route_prefix": "/echo", "import_path": "echo:build", "args": {"version": version},
        "runtime_env": {"working_dir": f"local://{CODE_DIR}/echo-{version}"},
        "deployments": [{"name": "Echo", "num_replicas": 2, "max_replicas_per_node": 1,
                         "ray_actor_options": {"num_cpus": 0, "resources": {resource: 0.001}}}],
    }]})


def deploy_echo(version: str, resource: str) -> None:
    """alice's model: its code and config on the shared tree, deployed with the stock `serve deploy`."""
    target = f"{CODE_DIR}/echo-{version}"
    as_alice(f"mkdir -p {target} && cat > {target}/echo.py", input_text=ECHO)
    as_alice(f"cat > {target}/serve.json", input_text=serve_config(version, resource))
    as_alice(f"{SERVE} deploy {target}/serve.json -a {shlex.quote(GATEWAY)}")


# Runs on worker1: each URL's answer (JSON), or null when it does not answer.
ASK = r"""
import json, sys, urllib.request
answers = []
for url in sys.argv[1:]:
    try:
        answers.append(json.load(urllib.request.urlopen(url, timeout=3)))
    except Exception:
        answers.append(None)
print(json.dumps(answers))
"""


def echo_answers(version: str) -> dict | None:
    """Each worker's proxy answers with the version, from a replica on that same worker."""
    workers = LAB.nodes[1:]
    urls = " ".join(f"http://{w.ip}:{SERVE_PORT}/echo" for w in workers)
    answers = json.loads(sh(LAB, node("worker1"), f"python3 - {urls}", input_text=ASK).strip().splitlines()[-1])
    ok = all(a and a.get("version") == version and a.get("node") == w.ip for w, a in zip(workers, answers, strict=True))
    return dict(zip((w.ip for w in workers), answers, strict=True)) if ok else None


def count(resource: str, add: int) -> dict:
    """The detached counter after adding ADD, through a job of alice's."""
    entry = f"{CODE_DIR}/ft_counter.py"
    as_alice(f"cat > {entry}", input_text=COUNTER_JOB)
    out = as_alice(f"/opt/rayrack/venv/bin/ray job submit --verify ~/.rayrack/ca.crt -- "
                   f"python {entry} {shlex.quote(resource)} {add}", timeout=180)
    line = next((ln for ln in out.splitlines() if ln.startswith("COUNTER ")), None)
    assert line, out[-3000:]
    return json.loads(line.removeprefix("COUNTER "))


def submit_sleeper() -> str:
    """A job of alice's that would run for minutes (its driver runs on the head, as every job's does)."""
    out = as_alice("/opt/rayrack/venv/bin/ray job submit --verify ~/.rayrack/ca.crt --no-wait -- "
                   "python -c 'import time; time.sleep(900)'")
    match = re.search(r"Job '([^']+)' submitted successfully", out)
    assert match, out[-2000:]
    return match.group(1)


def job_status(job_id: str) -> str:
    out = as_alice(f"/opt/rayrack/venv/bin/ray job status --verify ~/.rayrack/ca.crt {shlex.quote(job_id)}")
    match = re.search(r"Status for job '[^']+': (\w+)", out)
    return match.group(1) if match else out.strip().splitlines()[-1][-200:]


def raylet_pids() -> dict[str, str]:
    return {w.name: sh(LAB, w, "pgrep -u ray -x raylet").strip() for w in LAB.nodes[1:]}


def start_load(tag: str, duration: int) -> tuple[str, str]:
    """The client, in the background on worker1; returns its stop file and its result file."""
    urls = ",".join(f"http://{w.ip}:{SERVE_PORT}/echo" for w in LAB.nodes[1:])
    stop, out = f"/tmp/rayrack-load-{tag}.stop", f"/tmp/rayrack-load-{tag}.json"
    sh(LAB, node("worker1"), f"rm -f {stop} {out} && cat > /tmp/rayrack-load.py", input_text=LOAD)
    sh(LAB, node("worker1"), f"nohup python3 /tmp/rayrack-load.py {urls} {RATE} {duration} {stop} {out} "
                             ">/dev/null 2>&1 &")
    return stop, out


def stop_load(files: tuple[str, str]) -> list[tuple[float, int, bool]]:
    stop, out = files
    sh(LAB, node("worker1"), f"touch {stop}")
    raw = wait_for("the client's results", lambda: labtool.ssh(
        LAB, node("worker1"), f"cat {out}", check=False).stdout.strip() or None, 30)
    return [tuple(r) for r in json.loads(raw)]


def head_outage() -> dict[str, float]:
    """SIGKILL every process of the head's Ray unit; systemd restarts it. Returns wall-clock marks (time.time()
    on this machine; the lab shares its clock) of the kill, the head back in Ray, and every node alive."""
    head = node("head")
    before = unit(LAB, head, "ray-head")
    killed = time.time()
    sh(LAB, head, "sudo systemctl kill --signal=SIGKILL ray-head")
    wait_for("systemd restarts the head", lambda: (
        u if (u := unit(LAB, head, "ray-head"))["ActiveState"] == "active"
        and u["MainPID"] not in ("0", before["MainPID"]) else None), 120, interval=0.5)
    wait_for("the head answers again", lambda: alive_nodes(LAB).get(head.ip), 300, interval=1)
    back = time.time()
    wait_for("every node alive in the head's view", lambda: all_alive(LAB), 300, interval=1)
    return {"killed": killed, "head_back": back, "all_alive": time.time()}


def success(results: list[tuple[float, int, bool]], start: float, end: float) -> tuple[int, int]:
    window = [ok for sent, _, ok in results if start <= sent <= end]
    return sum(window), len(window)


def alice_ready() -> None:
    """alice's token and the cluster CA in her login on worker1, as the admin hands them out."""
    install_token("alice")
    install("alice", "ca.crt", (LAB.inventory_dir / ".secrets" / "ca" / "ca.crt").read_text())


@pytest.fixture(scope="module")
def lab():
    if LAB is None:
        pytest.fail(f"lab {LAB_NAME!r} is not up: `make integration` converges the molecule lab, then runs these")
    alice_ready()
    return LAB


def record(case: str, values: dict) -> None:
    """Print one case's figures and keep them, with the other cases', in .cache/lab-head-ft.json."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    found = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    found[case] = values
    RESULTS.write_text(json.dumps(found, indent=2) + "\n")
    print(f"\nhead outage, {case}: " + "  ".join(f"{k}={v}" for k, v in values.items()) + f" (in {RESULTS})")


def measure_head_outage(resource: str, version: str, running_job: bool = True) -> dict:
    """The served model, the counter, the raylets and (running_job) a job's driver across one head outage; the
    figures and what survived."""
    wait_for("alice's model on both workers", lambda: echo_answers(version), 240, interval=2)
    counted = count(resource, 3)
    if running_job:
        sleeper = submit_sleeper()
        wait_for("the long job runs", lambda: job_status(sleeper) == "RUNNING", 120, interval=2)
    pids = raylet_pids()
    load = start_load(version, 600)
    time.sleep(3)  # the client's steady state before the fault
    marks = head_outage()
    time.sleep(5)  # and after it
    results = stop_load(load)
    ok_during, sent_during = success(results, marks["killed"], marks["all_alive"])
    ok_all, sent_all = success(results, 0, float("inf"))
    # A job's driver and supervisor run on the head: what became of the running job.
    job = {}
    if running_job:
        alive = labtool.ssh(LAB, node("head"), "pgrep -f '[t]ime.sleep.900'", check=False).returncode == 0
        after = wait_for("the long job's state after the outage", lambda: (
            st if (st := job_status(sleeper)) in ("RUNNING", "FAILED", "STOPPED", "SUCCEEDED") else None), 120, 2)
        if after == "RUNNING":
            as_alice(f"/opt/rayrack/venv/bin/ray job stop --verify ~/.rayrack/ca.crt {shlex.quote(sleeper)}",
                     timeout=60)
        job = {"running_job": after, "job_driver_alive": alive}
    return {
        "outage_s": round(marks["head_back"] - marks["killed"], 1),
        "rejoin_s": round(marks["all_alive"] - marks["head_back"], 1),
        "requests_during": sent_during, "ok_during": ok_during,
        "success_during": round(ok_during / sent_during, 4) if sent_during else None,
        "success_all": round(ok_all / sent_all, 4) if sent_all else None,
        "raylets_kept": raylet_pids() == pids,
        **job,
        "counter_before": counted,
    }


def test_with_fault_tolerance_the_head_restarts_under_a_served_model_and_nothing_is_lost(lab):
    wait_for("every node alive before the fault", lambda: all_alive(lab), 120)
    token = sh(lab, node("head"), "sudo sha256sum /etc/rayrack/ray_token")
    resource = worker_resource()
    deploy_echo("v1", resource)
    seen = measure_head_outage(resource, "v1")
    after = count(resource, 1)
    record("with FT", {k: v for k, v in seen.items() if k != "counter_before"})
    assert seen["raylets_kept"], seen
    # As the README says: a running job's driver lives on the head and ends with it, even with FT.
    assert not seen["job_driver_alive"], seen
    # The detached actor kept its state and its process on worker2.
    assert after["n"] == seen["counter_before"]["n"] + 1, (seen, after)
    assert after["where"] == seen["counter_before"]["where"], (seen, after)
    assert seen["requests_during"] > 0, seen
    assert seen["success_during"] >= 0.99, seen
    # Serve's config came back from the GCS: the same version answers, and the owner is still alice.
    assert echo_answers("v1"), "the model does not answer after the outage"
    assert "RAYRACK_USER: alice" in as_alice(f"{SERVE} config -a {shlex.quote(GATEWAY)}")
    assert unit(lab, node("head"), "rayrack-serve")["ActiveState"] == "active"
    # The head came back with the same cluster token, and a job runs on every node.
    assert sh(lab, node("head"), "sudo sha256sum /etc/rayrack/ray_token") == token
    job_runs_everywhere(lab)
    # Ray's Serve dashboards are provisioned for Grafana with Ray's others.
    assert "serve_grafana_dashboard.json" in sh(lab, node("head"), "ls /var/lib/grafana/dashboards/ray")
    # Serve's own metrics reach Prometheus from both workers' proxies, with the rest of Ray's.
    wait_for("the model's request counts from both workers in Prometheus", served_by, 60, 2)


def served_by() -> bool:
    query = 'sum by (node) (ray_serve_num_http_requests_total{application="echo"})'
    rows = labtool.prometheus(LAB, [("/api/v1/query", {"query": query})])[0]["data"]["result"]
    return {r["metric"]["node"] for r in rows} >= {w.name for w in LAB.nodes[1:]}


def test_redis_refuses_a_client_without_the_password_a_login_and_an_outsider(lab):
    head = node("head")
    password_file = lab.inventory_dir / ".secrets" / "gcs_store.password"
    password = password_file.read_text().strip()
    cli = f"redis-cli --no-auth-warning --tls --cacert /etc/rayrack/ca.crt -h {head.ip} -p {STORE_PORT}"
    # Root on the head with the password: the converge's own check.
    assert sh(lab, head, f"sudo env REDISCLI_AUTH=\"$(cat)\" {cli} PING", input_text=password).strip() == "PONG"
    # Without it: refused by Redis.
    refused = labtool.ssh(lab, head, f"sudo {cli} GET x", check=False)
    assert "NOAUTH" in refused.stdout + refused.stderr, refused
    # alice, logged in on the head, with the password: the firewall resets her connection before Redis sees it.
    login = labtool.ssh(lab, head, f"sudo -u alice env REDISCLI_AUTH=\"$(cat)\" {cli} PING", check=False,
                        input_text=password)
    assert "PONG" not in login.stdout and ("refused" in login.stderr.lower() + login.stdout.lower()
                                           or "reset" in login.stderr.lower() + login.stdout.lower()), login
    # A machine on the lab network that is not a node cannot open a connection at all.
    outsider = labtool.podman(
        "run", "--rm", "--network", lab.network, lab.image, "bash", "-c",
        f"hostname -I; timeout 5 bash -c 'exec 3<>/dev/tcp/{head.ip}/{STORE_PORT}' 2>&1; echo rc=$?",
        check=False, capture=True)
    assert "rc=0" not in outsider.stdout, outsider.stdout
    # A node's root can (the nodes are Redis' set); the node's other logins are refused there too.
    connect = f"timeout 5 bash -c 'exec 3<>/dev/tcp/{head.ip}/{STORE_PORT}'"
    assert labtool.ssh(lab, node("worker1"), f"sudo {connect}", check=False).returncode == 0
    assert labtool.ssh(lab, node("worker1"), connect, check=False).returncode != 0
