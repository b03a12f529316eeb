"""rayrack: operate a rayrack Ray cluster from its Ansible inventory.

Exit codes: 0 success; 1 bad usage or inventory, (status) a node not alive in Ray, or (usage) no answer from
Prometheus; 2 a host failed; 3 a host was unreachable; 4 the run broke or was interrupted. gpu-check:
0 consistent, 1 something found, 2 unusable input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from rayrack import __version__
from rayrack import inventory as inventory_mod
from rayrack.records import read_record

DEFAULT_INVENTORY = os.environ.get("RAYRACK_INVENTORY", "inventories/lab")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayrack", description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--version", action="version", version=f"rayrack {__version__}")
    p.add_argument("-i", "--inventory", type=Path, default=Path(DEFAULT_INVENTORY),
                   help="inventory directory or file (default: $RAYRACK_INVENTORY or inventories/lab)")
    p.add_argument("-v", "--verbose", action="store_true", help="show every task and host result while running")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Options of every command that runs a playbook.
    runs = argparse.ArgumentParser(add_help=False)
    runs.add_argument("-e", "--extra-var", action="append", default=[], metavar="NAME=VALUE",
                      help="an Ansible extra variable for the playbook (repeatable; VALUE is read as YAML)")

    sub.add_parser("up", parents=[runs], help="converge the whole cluster (site.yml)")
    status = sub.add_parser("status", help="nodes, Ray state, GPUs busy/idle/free, versions, last run")
    status.add_argument("--token-file", type=Path,
                        help="the cluster token (default: <inventory>/.secrets/ray_token)")

    usage = sub.add_parser("usage", help="GPU-hours, idle GPU-hours and idle share per user or Ray job (Prometheus)")
    usage.add_argument("--since", default="7d", help="the period up to now: 30m, 12h, 7d, 4w ... (default: 7d)")
    usage.add_argument("--by", choices=("user", "job"), default="user", help="one row per user or per Ray job")
    usage.add_argument("--format", choices=("table", "csv", "json"), default="table", dest="fmt",
                       help="table (default), csv or json")

    upgrade = sub.add_parser("upgrade", parents=[runs],
                             help="rolling upgrade to the inventory's rayrack_ray_version, head last")
    upgrade.add_argument("--ray-version", help="upgrade to this Ray instead of the inventory's (then set "
                                               "rayrack_ray_version there too, or the next converge goes back)")
    upgrade.add_argument("--batch", type=int,
                         help="workers upgraded at a time (default: the inventory's ray_drain_batch_size)")
    upgrade.add_argument("--drain-timeout", type=int, help="seconds a drained node waits for running tasks")
    upgrade.add_argument("--role", action="append", default=[], dest="roles",
                         help="also apply this role to every drained node (repeatable), e.g. a GPU driver role")
    upgrade.add_argument("--limit", help="only these nodes (Ansible host pattern)")

    drain = sub.add_parser("drain", parents=[runs],
                           help="drain a worker in Ray: nothing new scheduled, running tasks finish")
    drain.add_argument("node")
    drain.add_argument("--timeout", type=int, help="seconds to wait for running tasks (default: the role's 300)")

    sub.add_parser("add-node", parents=[runs], help="bring nodes newly in the inventory into the cluster")
    remove = sub.add_parser("remove-node", parents=[runs], help="drain a worker, then stop and disable its units")
    remove.add_argument("node")
    remove.add_argument("--timeout", type=int, help="seconds the drain waits for running tasks (default: 300)")
    teardown = sub.add_parser("teardown", parents=[runs], help="remove Ray and the agent from every node")
    teardown.add_argument("--confirm", required=True, metavar="CLUSTER_NAME",
                          help="the cluster's name (rayrack_cluster_name), to show you mean it")
    user = sub.add_parser("user", help="a researcher's gateway token: rotate or revoke (converges the gateway only)")
    user_sub = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    user_sub.add_parser("rotate", parents=[runs], help="a new token for NAME (a revoked user gets back in)"
                        ).add_argument("name", metavar="NAME", help="a name in rayrack_users")
    user_sub.add_parser("revoke", parents=[runs], help="remove NAME's token; the gateway refuses it from now on"
                        ).add_argument("name", metavar="NAME", help="a name in rayrack_users")
    whoami = sub.add_parser("whoami", help="which user a token belongs to, as the gateway sees it")
    whoami.add_argument("--token-file", type=Path, required=True, help="the token, e.g. ~/.rayrack/token")
    whoami.add_argument("--ca-cert", type=Path,
                        help="the cluster CA certificate (default: <inventory>/.secrets/ca/ca.crt)")
    grafana = sub.add_parser("grafana-sync", add_help=False,
                             help="create or update the dashboards in an existing Grafana (see grafana-sync --help)")
    grafana.add_argument("sync_args", nargs=argparse.REMAINDER)
    gpu_check = sub.add_parser("gpu-check", add_help=False,
                               help="check one node's GPUs, saved nvidia-smi outputs or live (see gpu-check --help)")
    gpu_check.add_argument("check_args", nargs=argparse.REMAINDER)
    return p


def upgrade_extravars(args: argparse.Namespace) -> dict[str, object]:
    """The extra variables of `rayrack upgrade`: only the options given, so the inventory decides the rest."""
    extravars: dict[str, object] = {}
    if args.batch is not None:
        extravars["ray_drain_batch_size"] = args.batch
    if args.ray_version:
        extravars["rayrack_ray_version"] = args.ray_version
    if args.drain_timeout is not None:
        extravars["ray_drain_timeout"] = args.drain_timeout
    if args.roles:
        extravars["ray_drain_upgrade_roles"] = args.roles
    return extravars


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["grafana-sync"]:
        # Talks to Grafana only, with options of its own: no inventory needed.
        from monitoring.grafana import sync

        return sync.main(argv[1:])
    if argv[:1] == ["gpu-check"]:
        # No inventory needed (capture files, or this machine).
        from rayrack import gpu_check

        return gpu_check.main(argv[1:])
    args = build_parser().parse_args(argv)
    path = args.inventory.resolve()
    if not path.exists():
        print(f"rayrack: no inventory at {path}", file=sys.stderr)
        return 1
    try:
        inv = inventory_mod.load(path)
    except RuntimeError as exc:
        print(f"rayrack: {exc}", file=sys.stderr)
        return 1
    if inv.head is None:
        print(f"rayrack: {path} has no host in group ray_head", file=sys.stderr)
        return 1

    if args.command == "status":
        from rayrack.status import status_text

        token_file = args.token_file or inv.directory / ".secrets" / "ray_token"
        text, code = status_text(inv, token_file, read_record(inv.directory))
        print(text)
        return code

    if args.command == "usage":
        from rayrack.usage import UsageError, parse_since, usage_text

        try:
            print(usage_text(inv, args.by, parse_since(args.since), args.fmt))
        except UsageError as exc:
            print(f"rayrack: {exc}", file=sys.stderr)
            return 1
        return 0

    command = args.command
    if command in ("user", "whoami"):
        from rayrack import users

        try:
            if command == "whoami":
                ca_file = args.ca_cert or users.secrets_dir(inv) / "ca" / "ca.crt"
                print(users.describe(users.whoami(users.gateway_url(inv), args.token_file, ca_file)))
                return 0
            changed = (users.rotate if args.user_command == "rotate" else users.revoke)(inv, args.name)
        except users.UserError as exc:
            print(f"rayrack: {exc}", file=sys.stderr)
            return 1
        print(f"{args.name}: {'new token in' if args.user_command == 'rotate' else 'revoked,'} {changed}")
        command = f"user {args.user_command}"

    extravars: dict[str, object] = {}
    limit = None
    if args.command == "upgrade":
        if args.batch is not None and args.batch < 1:
            print("rayrack: --batch must be at least 1", file=sys.stderr)
            return 1
        extravars = upgrade_extravars(args)
        limit = args.limit
    elif args.command in ("drain", "remove-node"):
        node = inv.get(args.node)
        if node is None or node.role != "worker":
            workers = ", ".join(h.name for h in inv.hosts if h.role == "worker") or "none"
            print(f"rayrack: {args.node} is not a worker of this inventory (workers: {workers})", file=sys.stderr)
            return 1
        limit = args.node
        if args.timeout is not None:
            extravars["ray_drain_timeout"] = args.timeout
    elif args.command == "teardown":
        extravars["teardown_confirm"] = args.confirm

    for item in args.extra_var:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"rayrack: -e wants NAME=VALUE, got {item!r}", file=sys.stderr)
            return 1
        extravars[name] = yaml.safe_load(value)

    from rayrack.runs import run_playbook

    code = run_playbook(command, path, inv.directory, extravars=extravars, limit=limit, verbose=args.verbose)
    if args.command == "upgrade" and args.ray_version and code == 0 and \
            args.ray_version != inv.setting("rayrack_ray_version"):
        print(f"note: the inventory still says rayrack_ray_version {inv.setting('rayrack_ray_version')}; set it to "
              f"{args.ray_version} before the next converge")
    return code
