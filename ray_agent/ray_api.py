"""The one HTTP client for Ray's dashboard APIs and rayrack-gateway, used by the agent and the controller.

It owns the base URL, the cluster token (`Authorization: Bearer`, from a token file read again on every call so
that a rotated token is picked up), TLS verified against `ca_file` for https URLs (loaded again when the file
changes), a timeout on every call, JSON decoding, and one error type, RayApiError, whose message names the
method, the URL and the cause (the HTTP status with Ray's own message, a timeout, a refused connection, a
failed TLS verification) and never the token.

Only the standard library, and nothing else of this package: `rayrack status` sends this file's source to the
nodes and runs it with their system python3.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# Ray caps list results at RAY_MAX_LIMIT_FROM_API_SERVER (10000 by default).
LIST_LIMIT = 10_000
# How much of an error answer's body is read for Ray's message, and how much of it is shown.
_ERROR_BODY_BYTES = 4096
_ERROR_MESSAGE_CHARS = 200


class RayApiError(Exception):
    """A call that failed, or a file the client needs that cannot be used.

    `cause` says why; `call` names the call ("GET <url>"), empty for a file the client could not use; `status` is
    the HTTP status of an error answer, else None.
    """

    def __init__(self, cause: str, call: str = "", status: int | None = None) -> None:
        super().__init__(f"{call}: {cause}" if call else cause)
        self.cause = cause
        self.call = call
        self.status = status


def read_token(token_file: Path) -> str:
    """The token in TOKEN_FILE, surrounding whitespace stripped; an unreadable or empty file is an error."""
    try:
        token = token_file.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise RayApiError(f"cannot read token file {token_file}: {err.strerror}") from None
    if not token:
        raise RayApiError(f"token file {token_file} is empty")
    return token


def _ray_message(err: urllib.error.HTTPError) -> str:
    """What Ray (or the gateway) said about the error: a JSON answer's msg/message/error, else the text."""
    content_type = err.headers.get("Content-Type", "") if err.headers is not None else ""
    if "html" in content_type:
        return ""  # an error page (a proxy's, a plain web server's) says no more than the status
    try:
        raw = err.read(_ERROR_BODY_BYTES).decode("utf-8", errors="replace")
    except (OSError, ValueError):
        return ""
    text = raw
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("msg", "message", "error", "detail"):
            if isinstance(body.get(key), str) and body[key]:
                text = body[key]
                break
    text = " ".join(text.split())
    return text if len(text) <= _ERROR_MESSAGE_CHARS else text[: _ERROR_MESSAGE_CHARS - 3] + "..."


def _cause(err: BaseException, timeout: float) -> str:
    """A short reason for a failed connection or read."""
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"TLS verification failed: {reason}"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"timed out after {timeout:g}s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason)


class RayApi:
    """Calls on one base URL. The token comes from `token_file` (read on every call) or is given as `token`.

    `name`, when given, stands for the URL in error messages: a URL that is itself a secret (a webhook's).
    """

    def __init__(
        self,
        url: str,
        token_file: Path | None = None,
        timeout: float = 10.0,
        ca_file: Path | None = None,
        token: str | None = None,
        name: str | None = None,
    ) -> None:
        self.url = url
        self.name = name
        self.token_file = token_file
        self.timeout = timeout
        self.ca_file = ca_file
        self._token = token
        self._context: ssl.SSLContext | None = None
        self._context_stamp: int | None = None

    def token(self) -> str | None:
        return read_token(self.token_file) if self.token_file is not None else self._token

    def _tls(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https:"):
            return None
        # Loaded again when the CA file changes (a renewed cluster CA), without restarting the caller.
        try:
            stamp = self.ca_file.stat().st_mtime_ns if self.ca_file is not None else 0
        except OSError as err:
            raise RayApiError(f"cannot read CA file {self.ca_file}: {err.strerror}") from None
        if self._context is None or stamp != self._context_stamp:
            try:
                self._context = ssl.create_default_context(
                    cafile=str(self.ca_file) if self.ca_file is not None else None
                )
            except (OSError, ssl.SSLError) as err:
                raise RayApiError(f"cannot load CA file {self.ca_file}: {err}") from None
            self._context_stamp = stamp
        return self._context

    def where(self, method: str, path: str) -> str:
        """How an error names a call: the method and the URL without its query (or the client's name)."""
        return f"{method} {self.name or self._join(path.split('?', 1)[0])}"

    def _join(self, path: str) -> str:
        # An empty path is the URL as given (a webhook's, trailing slash and all).
        return self.url.rstrip("/") + path if path else self.url

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """`method path` on the base URL (a JSON body when given) -> the answer's HTTP status and bytes."""
        where = self.where(method, path)
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self._join(path), data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        token = self.token()
        if token is not None:
            # Unredirected: a redirect, to wherever it points, never carries the token along.
            request.add_unredirected_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._tls()) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            hint = ""
            # A named client's secret URL is its own credential (a webhook's): no token is missing there.
            if err.code in (401, 403) and (token or not self.name):
                hint = " (is the token right?)" if token else " (no token was sent)"
            said = _ray_message(err)
            if token and token in said:
                said = said.replace(token, "<token>")
            cause = f"HTTP {err.code}{hint}" + (f": {said}" if said else "")
            raise RayApiError(cause, where, err.code) from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
            # ValueError: a malformed URL; HTTPException: an answer cut short or not HTTP.
            raise RayApiError(_cause(err, self.timeout), where) from None

    def json(self, method: str, path: str, body: Any = None) -> Any:
        """`method path` -> the decoded JSON answer."""
        raw = self.call(method, path, body)[1]
        try:
            return json.loads(raw)
        except ValueError as err:
            raise RayApiError(f"response is not JSON: {err}", self.where(method, path)) from None

    def get(self, path: str) -> Any:
        return self.json("GET", path)

    def text(self, path: str) -> str:
        """GET a text document (the agent's /metrics)."""
        return self.call("GET", path)[1].decode("utf-8", errors="replace")


def source() -> str:
    """This module's source, for a script that runs where this package is not installed."""
    return Path(__file__).read_text(encoding="utf-8")
