"""`rayrack usage` on the controller's side: where it asks, its options, and who it lists (the queries and
the report against a real Prometheus are in tests/monitoring/test_usage.py)."""

from pathlib import Path

import pytest

from rayrack.cli import build_parser
from rayrack.inventory import parse_listing
from rayrack.usage import UsageError, configured_users, credentials, local_address, requests

HOSTVARS = {
    "head": {"ansible_host": "10.0.0.10", "rayrack_users": [{"name": "alice", "contact": "a@b.org"}, {"name": "bob"}]},
    "worker1": {"ansible_host": "10.0.0.11"},
    "mon": {"ansible_host": "10.0.0.20", "prometheus_listen_address": "127.0.0.1:9999"},
}


def listing(with_monitoring: bool) -> dict:
    groups = {"ray_head": {"hosts": ["head"]}, "ray_workers": {"hosts": ["worker1"]}}
    if with_monitoring:
        groups["monitoring"] = {"hosts": ["mon"]}
    return {"_meta": {"hostvars": HOSTVARS}, **groups}


@pytest.mark.parametrize(("with_monitoring", "host", "prometheus"),
                         [(True, "mon", "127.0.0.1:9999"), (False, "head", "127.0.0.1:9090")])
def test_prometheus_is_asked_on_the_monitoring_host_else_the_head(with_monitoring, host, prometheus):
    inv = parse_listing(Path("/inv"), listing(with_monitoring))
    assert inv.monitoring_host.name == host
    assert inv.monitoring_host.setting("prometheus_listen_address") == prometheus
    # The monitoring host is not a Ray node: status leaves it out.
    assert [h.name for h in inv.hosts] == ["head", "worker1"]


def test_every_configured_user_is_listed():
    assert configured_users(parse_listing(Path("/inv"), listing(False))) == ["alice", "bob"]


def test_options_and_defaults():
    args = build_parser().parse_args(["usage"])
    assert (args.since, args.by, args.fmt) == ("7d", "user", "table")
    args = build_parser().parse_args(["usage", "--since", "10m", "--by", "job", "--format", "json"])
    assert (args.since, args.by, args.fmt) == ("10m", "job", "json")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["usage", "--by", "node"])


def test_per_job_reports_ask_for_the_submission_ids_too():
    keys = [key for key, _, _ in requests("job", "7d", 0.0)]
    assert keys == ["rules", "allocated", "busy", "idle_held", "jobs"]
    query = dict((key, params) for key, _, params in requests("job", "7d", 0.0))["allocated"]["query"]
    assert query == "sum by (user, ray_job_id) (sum_over_time(user_job:rayrack_gpus_allocated:sum[7d]))"


def test_prometheus_is_asked_at_its_local_address():
    assert local_address("127.0.0.1:9090") == "127.0.0.1:9090"
    assert local_address("0.0.0.0:9090") == "127.0.0.1:9090"
    assert local_address("[::]:9091") == "127.0.0.1:9091"
    assert local_address("10.0.0.20:9090") == "10.0.0.20:9090"


def test_the_password_and_ca_come_from_the_controller(tmp_path):
    inv = parse_listing(tmp_path, listing(False))
    with pytest.raises(UsageError, match=r"prometheus\.password is missing"):
        credentials(inv)
    (tmp_path / ".secrets" / "monitoring").mkdir(parents=True)
    (tmp_path / ".secrets" / "monitoring" / "prometheus.password").write_text("generated\n")
    with pytest.raises(UsageError, match="no cluster CA certificate"):
        credentials(inv)
    (tmp_path / ".secrets" / "ca").mkdir()
    (tmp_path / ".secrets" / "ca" / "ca.crt").write_text("PEM")
    assert credentials(inv) == {"user": "rayrack", "password": "generated", "ca": "PEM"}
    # The inventory's own password (from Vault, decrypted) wins; one ansible-inventory could not decrypt is named.
    given = {**HOSTVARS["head"], "rayrack_prometheus_password": "from-vault"}
    inv = parse_listing(tmp_path, {**listing(False), "_meta": {"hostvars": {**HOSTVARS, "head": given}}})
    assert credentials(inv)["password"] == "from-vault"
    given["rayrack_prometheus_password"] = {"__ansible_vault": "$ANSIBLE_VAULT;1.1;AES256..."}
    inv = parse_listing(tmp_path, {**listing(False), "_meta": {"hostvars": {**HOSTVARS, "head": given}}})
    with pytest.raises(UsageError, match=r"rayrack_prometheus_password .* not plain text"):
        credentials(inv)
