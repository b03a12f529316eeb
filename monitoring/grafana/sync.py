"""Sync rayrack's dashboards into an existing Grafana through its HTTP API (grafana-client).

    python -m monitoring.grafana.sync --url https://grafana.example.com --token-file ~/.grafana-token

The token (a service account token with the Editor role) comes from --token-file or GRAFANA_TOKEN. The
dashboards land in one folder (created when missing); a dashboard whose content already matches is left
alone, so a second run changes nothing. Exit codes: 0 done, 1 Grafana refused or failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import niquests
from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaUnauthorizedError

from monitoring.grafana.generate import DASHBOARDS_DIR, PROVISIONED_DATASOURCE_UID

TOKEN_ENV = "GRAFANA_TOKEN"
MESSAGE = "rayrack: monitoring/grafana/sync.py"
# Fields Grafana adds or bumps on every save: never a reason to save again.
_SERVER_FIELDS = ("id", "version")


class UsageError(Exception):
    pass


@dataclass(frozen=True)
class Outcome:
    uid: str
    title: str
    action: str  # created, updated, unchanged


def load_dashboards(directory: Path, datasource_uid: str) -> list[dict[str, Any]]:
    files = sorted(directory.glob("*.json"))
    if not files:
        raise UsageError(f"no dashboards (*.json) in {directory}")
    dashboards = []
    for path in files:
        try:
            board = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UsageError(f"{path}: {err}") from err
        if not isinstance(board, dict) or not board.get("uid") or not board.get("title"):
            raise UsageError(f"{path}: not a dashboard with a uid and a title")
        dashboards.append(with_datasource(board, datasource_uid))
    return dashboards


def with_datasource(board: dict[str, Any], datasource_uid: str) -> dict[str, Any]:
    """The dashboard defaulting to the target Grafana's Prometheus datasource instead of the provisioned one."""
    board = copy.deepcopy(board)
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") == "datasource":
            variable["current"] = {"selected": False, "text": variable["current"].get("text", ""),
                                   "value": datasource_uid}
    return board


def read_token(token_file: Path | None) -> str:
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as err:
            raise UsageError(f"--token-file: {err}") from err
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise UsageError(f"no Grafana token: give --token-file or set {TOKEN_ENV}")
    return token


def _not_found(err: GrafanaClientError) -> bool:
    return err.status_code == 404


def ensure_folder(api: GrafanaApi, uid: str, title: str) -> bool:
    """True when the folder had to be created."""
    try:
        api.folder.get_folder(uid)
        return False
    except GrafanaClientError as err:
        if not _not_found(err):
            raise
    api.folder.create_folder(title, uid=uid)
    return True


def _same(remote: dict[str, Any], ours: dict[str, Any]) -> bool:
    return all(remote.get(key) == value for key, value in ours.items() if key not in _SERVER_FIELDS)


def sync(api: GrafanaApi, dashboards: list[dict[str, Any]], folder_uid: str, dry_run: bool) -> Iterator[Outcome]:
    for board in dashboards:
        uid, title = board["uid"], board["title"]
        try:
            current = api.dashboard.get_dashboard(uid)
        except GrafanaClientError as err:
            if not _not_found(err):
                raise
            current = None
        if current is not None and _same(current["dashboard"], board) \
                and current.get("meta", {}).get("folderUid") == folder_uid:
            yield Outcome(uid, title, "unchanged")
            continue
        if not dry_run:
            payload = {key: value for key, value in board.items() if key not in _SERVER_FIELDS}
            api.dashboard.update_dashboard(
                {"dashboard": payload, "folderUid": folder_uid, "overwrite": True, "message": MESSAGE}
            )
        yield Outcome(uid, title, "created" if current is None else "updated")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rayrack grafana-sync",
        description="Create or update rayrack's dashboards in an existing Grafana (idempotent).",
    )
    parser.add_argument("--url", required=True, help="Grafana's base URL, e.g. https://grafana.example.com")
    parser.add_argument("--token-file", type=Path, help=f"file holding the API token (default: ${TOKEN_ENV})")
    parser.add_argument("--folder-uid", default="rayrack", help="folder to put the dashboards in (default: rayrack)")
    parser.add_argument("--folder-title", default="rayrack", help="title of the folder when it is created")
    parser.add_argument("--datasource-uid", default=PROVISIONED_DATASOURCE_UID,
                        help="uid of the Prometheus datasource the dashboards default to")
    parser.add_argument("--dashboards", type=Path, default=DASHBOARDS_DIR, help="directory of dashboard JSON")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    parser.add_argument("--dry-run", action="store_true", help="report what would change, change nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        dashboards = load_dashboards(args.dashboards, args.datasource_uid)
        api = GrafanaApi.from_url(args.url, credential=read_token(args.token_file), timeout=args.timeout)
    except UsageError as err:
        print(f"grafana sync: {err}", file=sys.stderr)
        return 2
    try:
        created_folder = False
        if not args.dry_run:
            created_folder = ensure_folder(api, args.folder_uid, args.folder_title)
        if created_folder:
            print(f"folder {args.folder_uid}: created")
        changed = 0
        for outcome in sync(api, dashboards, args.folder_uid, args.dry_run):
            changed += outcome.action != "unchanged"
            verb = f"would be {outcome.action}" if args.dry_run and outcome.action != "unchanged" else outcome.action
            print(f"{outcome.uid} ({outcome.title}): {verb}")
    except GrafanaUnauthorizedError:
        print(f"grafana sync: {args.url} rejected the token (401)", file=sys.stderr)
        return 1
    except (GrafanaException, niquests.RequestException) as err:
        # Refused, timed out, or an API error (the message names the status and Grafana's answer).
        print(f"grafana sync: {args.url}: {err}", file=sys.stderr)
        return 1
    print(f"{len(dashboards)} dashboards, {changed} {'to change' if args.dry_run else 'changed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
