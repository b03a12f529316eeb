"""The gateway's auth and ownership rules against a real Ray head, driven by the stock Ray client and CLI."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from gateway.support import Account, Gateway, RayHead, call, free_ports, ray_job_cli, run_sdk, write_users

pytestmark = pytest.mark.slow


def job(head: RayHead, submission_id: str) -> dict:
    import requests

    r = requests.get(f"{head.dashboard_url}/api/jobs/{submission_id}",
                     headers={"Authorization": f"Bearer {head.token}"}, timeout=10)  # fmt: skip
    r.raise_for_status()
    return r.json()


def wait_status(head: RayHead, submission_id: str, wanted: set[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = job(head, submission_id)["status"]
        if status in wanted or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def submit_sleeper(head: RayHead, gateway: Gateway, owner: Account) -> str:
    submission_id = run_sdk(head, gateway, owner, "result = client.submit_job(entrypoint='sleep 60')")
    assert isinstance(submission_id, str)
    assert wait_status(head, submission_id, {"RUNNING"}) == "RUNNING"
    return submission_id


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer " + "0" * 64},
        {"X-Ray-Authorization": "Bearer " + "0" * 64},
        {"Authorization": "Basic YWxpY2U6eA=="},
        {"Cookie": "ray-authentication-token=" + "0" * 64},
    ],
    ids=["none", "unknown", "unknown-x-ray", "basic", "cookie"],
)
def test_no_or_unknown_token_is_401_without_a_hint(gateway: Gateway, headers: dict[str, str]) -> None:
    r = call(gateway, "GET", "/api/jobs/", headers=headers)
    assert r.status_code == 401
    assert r.json() == {"error": "unauthorized"}
    assert r.headers["WWW-Authenticate"] == "Bearer"


def test_the_cluster_token_is_not_a_user_token(gateway: Gateway, ray_head: RayHead) -> None:
    r = call(gateway, "GET", "/api/jobs/", headers={"Authorization": f"Bearer {ray_head.token}"})
    assert r.status_code == 401


@pytest.mark.parametrize(
    "path", ["/", "/nodes", "/api/v0/nodes", "/api/cluster_status", "/api/component_activities", "/logical/actors",
             "/api/jobs/x/unknown", "/api/prometheus_health"],
)  # fmt: skip
def test_anything_but_the_jobs_api_is_404_even_with_a_token(gateway: Gateway, accounts: dict[str, Account],
                                                            path: str) -> None:  # fmt: skip
    r = call(gateway, "GET", path, accounts["root"])
    assert r.status_code == 404
    assert r.json() == {"error": "not found"}


def test_submit_stamps_the_owner_and_prefixes_the_id(
    gateway: Gateway, ray_head: RayHead, accounts: dict[str, Account]
) -> None:
    ids = run_sdk(ray_head, gateway, accounts["alice"], """
ep = "python -c 'print(1)'"
result = [
    client.submit_job(entrypoint=ep, metadata={"rayrack.user": "bob", "team": "vision"}),
    client.submit_job(entrypoint=ep, submission_id="mine"),
    client.submit_job(entrypoint=ep, submission_id="alice-kept"),
]
""")  # fmt: skip
    assert isinstance(ids, list)
    generated, mine, kept = ids
    assert re.fullmatch(r"alice-raysubmit_[A-Za-z0-9]{16}", generated)
    assert mine == "alice-mine"
    assert kept == "alice-kept"
    details = job(ray_head, generated)
    assert details["metadata"] == {"rayrack.user": "alice", "team": "vision"}
    assert job(ray_head, mine)["metadata"] == {"rayrack.user": "alice"}
    assert re.search(r"user=alice submitted metadata rayrack.user='bob': replaced by alice", gateway.log())


def test_stock_cli_submit_with_working_dir_follow_list(
    gateway: Gateway, ray_head: RayHead, accounts: dict[str, Account], working_dir: Path
) -> None:
    alice = accounts["alice"]
    # `ray job submit` uploads the working dir (GET then PUT /api/packages/...), submits, then follows the
    # log tail websocket until the job ends.
    submit = ray_job_cli(ray_head, gateway, alice, "submit", "--submission-id", "wd",
                         "--working-dir", str(working_dir), "--", "python", "hello.py")  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr
    output = submit.stdout + submit.stderr
    assert "hello from the working dir" in output
    assert "Job 'alice-wd' succeeded" in output
    follow = ray_job_cli(ray_head, gateway, alice, "logs", "--follow", "alice-wd", ca_from_env=True)
    assert follow.returncode == 0, follow.stderr
    assert "hello from the working dir" in follow.stdout
    listing = ray_job_cli(ray_head, gateway, alice, "list", ca_from_env=True)
    assert listing.returncode == 0, listing.stderr
    assert "alice-wd" in listing.stdout
    assert re.search(r"user=alice method=PUT path=/api/packages/gcs/_ray_pkg_\w+\.zip status=200", gateway.log())


def test_others_cannot_stop_read_or_delete_a_job_the_admin_can_stop(
    gateway: Gateway, ray_head: RayHead, accounts: dict[str, Account]
) -> None:
    alice, bob, root = accounts["alice"], accounts["bob"], accounts["root"]
    submission_id = submit_sleeper(ray_head, gateway, alice)
    expected = {"error": f"job {submission_id} belongs to alice"}
    for method, suffix in (("POST", "/stop"), ("GET", "/logs"), ("GET", "/logs/tail"), ("DELETE", "")):
        r = call(gateway, method, f"/api/jobs/{submission_id}{suffix}", bob)
        assert (r.status_code, r.json()) == (403, expected), (method, suffix)
    # An id that climbs out of bob's own job names the same job to the ownership check and to Ray.
    bobs = call(gateway, "POST", "/api/jobs/", bob, json={"entrypoint": "true"}).json()["submission_id"]
    for sneaky in (f"{bobs}%2F..%2F{submission_id}", f"{bobs}%2F%2E%2E%2F{submission_id}", "%2E%2E"):
        r = call(gateway, "POST", f"/api/jobs/{sneaky}/stop", bob)
        assert r.status_code in (403, 404), (sneaky, r.status_code, r.text)
    # The stock tools as bob: the SDK raises with the gateway's body in the message, the CLI fails.
    errors = run_sdk(ray_head, gateway, bob, f"""
result = [error(client.stop_job, {submission_id!r}), error(client.get_job_logs, {submission_id!r})]
""")  # fmt: skip
    assert isinstance(errors, list)
    assert all(e and "belongs to alice" in e for e in errors), errors
    stop = ray_job_cli(ray_head, gateway, bob, "stop", submission_id)
    assert stop.returncode != 0
    assert "belongs to alice" in stop.stdout + stop.stderr
    # Everyone may read the job itself, owner included.
    assert call(gateway, "GET", f"/api/jobs/{submission_id}", bob).json()["metadata"]["rayrack.user"] == "alice"
    assert job(ray_head, submission_id)["status"] == "RUNNING"
    stop = ray_job_cli(ray_head, gateway, root, "stop", submission_id)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert wait_status(ray_head, submission_id, {"STOPPED"}) == "STOPPED"


def test_the_owner_can_stop_and_delete(gateway: Gateway, ray_head: RayHead, accounts: dict[str, Account]) -> None:
    alice = accounts["alice"]
    submission_id = submit_sleeper(ray_head, gateway, alice)
    assert call(gateway, "POST", f"/api/jobs/{submission_id}/stop", alice).json() == {"stopped": True}
    assert wait_status(ray_head, submission_id, {"STOPPED"}) == "STOPPED"
    assert call(gateway, "DELETE", f"/api/jobs/{submission_id}", alice).json() == {"deleted": True}
    assert call(gateway, "GET", f"/api/jobs/{submission_id}", alice).status_code == 404


def test_max_gpus_refuses_a_bigger_entrypoint(gateway: Gateway, ray_head: RayHead,
                                              accounts: dict[str, Account]) -> None:  # fmt: skip
    def bobs_jobs() -> int:
        listing = call(gateway, "GET", "/api/jobs/", accounts["bob"]).json()
        return len([j for j in listing if j["metadata"].get("rayrack.user") == "bob"])

    before = bobs_jobs()
    r = call(gateway, "POST", "/api/jobs/", accounts["bob"], json={"entrypoint": "true", "entrypoint_num_gpus": 2})
    assert r.status_code == 403
    assert r.json() == {"error": "bob may ask for at most 1 GPUs per job (max_gpus); entrypoint_num_gpus is 2"}
    # The forms Ray's model would also read as a number, and no number at all, are refused the same way.
    for asked in ("2", "NaN", "inf", [2]):
        body = {"entrypoint": "true", "entrypoint_num_gpus": asked}
        r = call(gateway, "POST", "/api/jobs/", accounts["bob"], json=body)
        assert r.status_code == 403, (asked, r.text)
    assert bobs_jobs() == before


def test_a_malformed_body_gets_rays_400(gateway: Gateway, accounts: dict[str, Account]) -> None:
    r = call(gateway, "POST", "/api/jobs/", accounts["alice"], json={"entrypoint": ["not", "a", "string"]})
    assert r.status_code == 400
    assert "entrypoint must be a string" in r.text


def test_rayrack_jobs_for_users_and_the_cluster_token(gateway: Gateway, ray_head: RayHead,
                                                      accounts: dict[str, Account]) -> None:  # fmt: skip
    run_sdk(ray_head, gateway, accounts["alice"], "result = client.submit_job(entrypoint='true', submission_id='ls')")
    for headers in ({"Authorization": f"Bearer {ray_head.token}"}, {"Authorization": f"Bearer {accounts['bob'].token}"},
                    {"X-Ray-Authorization": f"Bearer {ray_head.token}"}):  # fmt: skip
        r = call(gateway, "GET", "/api/rayrack/jobs", headers=headers)
        assert r.status_code == 200
        jobs = {j["submission_id"]: j for j in r.json()["jobs"]}
        entry = jobs["alice-ls"]
        assert set(entry) == {"job_id", "submission_id", "user", "status", "start_time", "end_time",
                              "entrypoint_num_gpus"}  # fmt: skip
        assert entry["user"] == "alice"
    # A job that did not come through the gateway has no owner.
    import requests

    r = requests.post(f"{ray_head.dashboard_url}/api/jobs/", json={"entrypoint": "true", "submission_id": "direct"},
                      headers={"Authorization": f"Bearer {ray_head.token}"}, timeout=30)  # fmt: skip
    assert r.status_code == 200
    jobs = {j["submission_id"]: j for j in call(gateway, "GET", "/api/rayrack/jobs", accounts["bob"]).json()["jobs"]}
    assert jobs["direct"]["user"] == "unknown"
    assert call(gateway, "GET", "/api/rayrack/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_whoami(gateway: Gateway, accounts: dict[str, Account]) -> None:
    assert call(gateway, "GET", "/api/rayrack/whoami", accounts["bob"]).json() == {
        "user": "bob", "admin": False, "max_gpus": 1}  # fmt: skip
    assert call(gateway, "GET", "/api/rayrack/whoami", accounts["root"]).json() == {
        "user": "root", "admin": True, "max_gpus": None}  # fmt: skip


def test_the_log_has_a_line_per_request_and_no_token(gateway: Gateway, ray_head: RayHead,
                                                     accounts: dict[str, Account]) -> None:  # fmt: skip
    call(gateway, "GET", "/api/version", accounts["bob"])
    log = gateway.log()
    assert re.search(r"user=bob method=GET path=/api/version status=200 duration=\d+\.\d+s", log)
    for secret in (ray_head.token, *(a.token for a in accounts.values())):
        assert secret not in log


def test_a_gateway_without_users_refuses_everything(ray_head: RayHead, tmp_path: Path,
                                                    accounts: dict[str, Account]) -> None:  # fmt: skip
    import requests

    users = write_users(tmp_path / "users.json", [])
    gw = Gateway(tmp_path, ray_head.dashboard_url, users, ray_head.token_file)
    gw.start()
    try:
        for headers in ({}, {"Authorization": f"Bearer {accounts['alice'].token}"},
                        {"Authorization": f"Bearer {ray_head.token}"}):  # fmt: skip
            for path in ("/api/version", "/api/jobs/", "/api/rayrack/jobs"):
                r = requests.get(gw.url + path, headers=headers, timeout=10)
                assert r.status_code == 503, (path, headers.keys())
    finally:
        assert gw.stop() == 0
    assert "no users are configured: every request is refused" in gw.log()


def test_restart_is_quick_and_leaves_running_jobs_alone(
    gateway: Gateway, ray_head: RayHead, accounts: dict[str, Account], tmp_path: Path
) -> None:
    alice = accounts["alice"]
    submission_id = submit_sleeper(ray_head, gateway, alice)
    second = Gateway(tmp_path, ray_head.dashboard_url, gateway.users_file, ray_head.token_file, gateway.pki)
    second.start()
    try:
        assert second.startup_seconds < 2.0, second.startup_seconds
        started = time.monotonic()
        assert second.stop() == 0
        assert time.monotonic() - started < 2.0
        assert job(ray_head, submission_id)["status"] == "RUNNING"
    finally:
        second.stop()
        assert call(gateway, "POST", f"/api/jobs/{submission_id}/stop", alice).status_code == 200


def test_run_refuses_missing_secrets(tmp_path: Path, ray_head: RayHead) -> None:
    gw = Gateway(tmp_path, ray_head.dashboard_url, tmp_path / "absent.json", ray_head.token_file)
    gw.port = free_ports(1)[0]
    with pytest.raises(RuntimeError, match=r"users_file .*absent\.json: cannot read"):
        gw.start()
    assert json.dumps(ray_head.token) not in gw.log()
