"""The few Grafana HTTP API endpoints monitoring/grafana/sync.py calls, over real HTTP, with Grafana's
answers (status codes and body shapes of Grafana 11/12) and its token check."""

from __future__ import annotations

import copy
import http.server
import json
import re
import threading
from typing import Any


class FakeGrafana(http.server.ThreadingHTTPServer):
    def __init__(self, token: str) -> None:
        self.token = token
        self.folders: dict[str, dict[str, Any]] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}
        self.writes: list[str] = []  # method and path of every request that changed something
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.handle_api(self, "GET")

            def do_POST(self) -> None:
                server.handle_api(self, "POST")

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_api(self, request: http.server.BaseHTTPRequestHandler, method: str) -> None:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return self.reply(request, 401, {"message": "Unauthorized"})
        body = {}
        if method == "POST":
            body = json.loads(request.rfile.read(int(request.headers.get("Content-Length", 0))) or b"{}")
        path = request.path.split("?")[0]
        if method == "GET" and (m := re.fullmatch(r"/api/folders/([^/]+)", path)):
            folder = self.folders.get(m[1])
            if folder is None:
                return self.reply(request, 404, {"message": "folder not found"})
            return self.reply(request, 200, folder)
        if method == "POST" and path == "/api/folders":
            uid = body.get("uid") or f"f{len(self.folders)}"
            if uid in self.folders:
                return self.reply(request, 409, {"message": "a folder with the same uid already exists"})
            self.folders[uid] = {"id": len(self.folders) + 1, "uid": uid, "title": body["title"], "version": 1}
            self.writes.append(f"POST {path}")
            return self.reply(request, 200, self.folders[uid])
        if method == "GET" and (m := re.fullmatch(r"/api/dashboards/uid/([^/]+)", path)):
            stored = self.dashboards.get(m[1])
            if stored is None:
                return self.reply(request, 404, {"message": "Dashboard not found"})
            return self.reply(request, 200, copy.deepcopy(stored))
        if method == "POST" and path == "/api/dashboards/db":
            board = body["dashboard"]
            folder_uid = body.get("folderUid", "")
            if folder_uid and folder_uid not in self.folders:
                return self.reply(request, 400, {"message": "folder not found"})
            previous = self.dashboards.get(board["uid"])
            if previous is not None and not body.get("overwrite"):
                return self.reply(request, 412, {"message": "The dashboard has been changed by someone else",
                                                 "status": "version-mismatch"})
            version = 1 if previous is None else previous["dashboard"]["version"] + 1
            stored_id = len(self.dashboards) + 1 if previous is None else previous["dashboard"]["id"]
            # Grafana adds its own fields to what it stores.
            self.dashboards[board["uid"]] = {
                "dashboard": {**board, "id": stored_id, "version": version},
                "meta": {"folderUid": folder_uid, "slug": board["title"].lower(), "provisioned": False},
            }
            self.writes.append(f"POST {path} {board['uid']}")
            return self.reply(request, 200, {"id": stored_id, "uid": board["uid"], "status": "success",
                                             "version": version, "url": f"/d/{board['uid']}"})
        return self.reply(request, 404, {"message": "Not found"})

    @staticmethod
    def reply(request: http.server.BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)
