"""The Ray HTTP client against a real HTTP(S) server on 127.0.0.1: the token, TLS, timeouts, JSON and every error."""

from __future__ import annotations

import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.support import LocalServer, QuietHandler, free_port, tls_server_context, write_token
from ray_agent.ray_api import LIST_LIMIT, RayApi, RayApiError, read_token

TOKEN = "cluster-token-0123456789abcdef"


class FakeRay(LocalServer):
    """Answers by path: /ok (JSON, needs the token), /error/<code>, /plain-error, /echo-token, /short, /text,
    /slow, /redirect?to=<url>."""

    def __init__(self, token: str = TOKEN, tls: ssl.SSLContext | None = None) -> None:
        self.token = token
        self.seen: list[dict[str, str]] = []
        self.release = threading.Event()
        outer = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                self.answer()

            def do_POST(self) -> None:
                self.answer()

            def answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                outer.seen.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "authorization": self.headers.get("Authorization", ""),
                        "content_type": self.headers.get("Content-Type", ""),
                        "body": body,
                    }
                )
                if self.path == "/slow":
                    outer.release.wait(10)
                    return self.reply(200, {})
                if self.path == "/short":
                    # Promises more than it sends, then hangs up.
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    self.close_connection = True
                    return None
                if self.path.startswith("/redirect?to="):
                    self.send_response(307)
                    self.send_header("Location", self.path.split("=", 1)[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                if self.path == "/text":
                    return self.reply(200, b"not json at all", "text/plain")
                if self.path.startswith("/error/"):
                    code = int(self.path.split("?")[0].split("/")[2])
                    return self.reply(code, {"result": False, "msg": "Ray says no"})
                if self.path == "/plain-error":
                    return self.reply(404, b"Job raysubmit_x does not exist\n", "text/plain")
                if self.path == "/echo-token":
                    # An answer that repeats what it was sent; the client must not pass the token on.
                    return self.reply(400, f"bad header {self.headers.get('Authorization')}".encode(), "text/plain")
                if self.headers.get("Authorization") != f"Bearer {outer.token}":
                    return self.reply(401, b"Unauthorized", "text/plain")
                return self.reply(200, {"path": self.path, "body": body})

        super().__init__(Handler, tls)

    def close(self) -> None:
        self.release.set()
        super().close()


@pytest.fixture
def ray() -> Iterator[FakeRay]:
    server = FakeRay()
    yield server
    server.close()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return write_token(tmp_path / "auth_token", TOKEN)


def error_of(client: RayApi, method: str, path: str) -> RayApiError:
    with pytest.raises(RayApiError) as caught:
        client.json(method, path)
    assert TOKEN not in str(caught.value)
    return caught.value


def test_json_answers_with_the_token_and_a_json_body(ray: FakeRay, token_file: Path) -> None:
    client = RayApi(ray.url + "/", token_file, timeout=2.0)
    assert client.get(f"/ok?limit={LIST_LIMIT}") == {"path": f"/ok?limit={LIST_LIMIT}", "body": ""}
    assert client.json("POST", "/ok", {"stop": True}) == {"path": "/ok", "body": '{"stop": true}'}
    assert [s["authorization"] for s in ray.seen] == [f"Bearer {TOKEN}"] * 2
    assert ray.seen[1]["content_type"] == "application/json" and ray.seen[0]["method"] == "GET"


def test_a_rotated_token_is_used_from_the_next_call_on(ray: FakeRay, token_file: Path) -> None:
    client = RayApi(ray.url, token_file, timeout=2.0)
    assert client.get("/ok")
    ray.token = "rotated-token"
    token_file.write_text("rotated-token\n")
    assert client.get("/ok")
    assert ray.seen[-1]["authorization"] == "Bearer rotated-token"


def test_http_errors_name_the_call_the_status_and_rays_message(ray: FakeRay, token_file: Path) -> None:
    err = error_of(RayApi(ray.url, token_file, timeout=2.0), "GET", "/error/503?limit=1")
    assert str(err) == f"GET {ray.url}/error/503: HTTP 503: Ray says no"
    assert (err.status, err.call, err.cause) == (503, f"GET {ray.url}/error/503", "HTTP 503: Ray says no")
    err = error_of(RayApi(ray.url, token_file, timeout=2.0), "POST", "/plain-error")
    assert str(err) == f"POST {ray.url}/plain-error: HTTP 404: Job raysubmit_x does not exist"


def test_a_refused_token_says_so_and_no_token_says_none_was_sent(ray: FakeRay, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    err = error_of(RayApi(ray.url, wrong, timeout=2.0), "GET", "/ok")
    assert str(err) == f"GET {ray.url}/ok: HTTP 401 (is the token right?): Unauthorized"
    err = error_of(RayApi(ray.url, None, timeout=2.0), "GET", "/ok")
    assert str(err) == f"GET {ray.url}/ok: HTTP 401 (no token was sent): Unauthorized"


def test_the_token_never_appears_in_an_error(ray: FakeRay, token_file: Path) -> None:
    err = error_of(RayApi(ray.url, token_file, timeout=2.0), "GET", "/echo-token")
    assert str(err) == f"GET {ray.url}/echo-token: HTTP 400: bad header Bearer <token>"


def test_an_answer_that_is_not_json(ray: FakeRay, token_file: Path) -> None:
    client = RayApi(ray.url, token_file, timeout=2.0)
    assert client.text("/text") == "not json at all"
    err = error_of(client, "GET", "/text")
    assert str(err).startswith(f"GET {ray.url}/text: response is not JSON: ")


def test_an_answer_cut_short(ray: FakeRay, token_file: Path) -> None:
    err = error_of(RayApi(ray.url, token_file, timeout=2.0), "GET", "/short")
    assert str(err) == f"GET {ray.url}/short: IncompleteRead(2 bytes read, 98 more expected)"


def test_a_slow_answer_times_out(ray: FakeRay, token_file: Path) -> None:
    started = time.monotonic()
    err = error_of(RayApi(ray.url, token_file, timeout=0.3), "GET", "/slow")
    assert str(err) == f"GET {ray.url}/slow: timed out after 0.3s"
    assert time.monotonic() - started < 5 and err.status is None


def test_nothing_listening_is_a_refused_connection(token_file: Path) -> None:
    port = free_port()
    err = error_of(RayApi(f"http://127.0.0.1:{port}", token_file, timeout=2.0), "GET", "/ok")
    assert str(err) == f"GET http://127.0.0.1:{port}/ok: connection refused"


def test_token_file_problems_are_named_before_any_call(ray: FakeRay, tmp_path: Path) -> None:
    err = error_of(RayApi(ray.url, tmp_path / "absent", timeout=2.0), "GET", "/ok")
    assert str(err) == f"cannot read token file {tmp_path / 'absent'}: No such file or directory"
    assert err.call == ""
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(RayApiError, match="is empty"):
        read_token(tmp_path / "empty")
    assert ray.seen == []


def test_tls_is_verified_against_the_ca_file(pki: Path, token_file: Path, tmp_path: Path) -> None:
    server = FakeRay(tls=tls_server_context(pki))
    try:
        assert RayApi(server.url, token_file, 2.0, pki / "ca.crt").get("/ok") == {"path": "/ok", "body": ""}
        other = tmp_path / "other.crt"
        other.write_text((pki / "client.crt").read_text())
        err = error_of(RayApi(server.url, token_file, 2.0, other), "GET", "/ok")
        assert str(err).startswith(f"GET {server.url}/ok: TLS verification failed: ")
        assert "CERTIFICATE_VERIFY_FAILED" in str(err)
        err = error_of(RayApi(server.url, token_file, 2.0, tmp_path / "absent.crt"), "GET", "/ok")
        assert str(err) == f"cannot read CA file {tmp_path / 'absent.crt'}: No such file or directory"
    finally:
        server.close()


def test_a_named_client_keeps_a_secret_url_out_of_its_errors(ray: FakeRay) -> None:
    secret = f"{ray.url}/error/404/T0KEN-IN-THE-PATH"
    with pytest.raises(RayApiError) as caught:
        RayApi(secret, timeout=2.0, name="webhook").call("POST", "", {"text": "hi"})
    assert str(caught.value) == "POST webhook: HTTP 404: Ray says no"
    # The URL is used as given, trailing parts and all.
    assert ray.seen[-1]["path"] == "/error/404/T0KEN-IN-THE-PATH"
    # Its URL is its credential: a refusal does not talk of a token.
    with pytest.raises(RayApiError) as caught:
        RayApi(f"{ray.url}/error/403/", timeout=2.0, name="webhook").call("POST", "", {"text": "hi"})
    assert str(caught.value) == "POST webhook: HTTP 403: Ray says no"
    assert ray.seen[-1]["path"] == "/error/403/"


def test_an_html_error_page_adds_nothing_to_the_status(token_file: Path, tmp_path: Path) -> None:
    # http.server's own 404 page stands for a proxy's.
    command = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "-d", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        port = process.stdout.readline().split("port ")[1].split()[0]
        err = error_of(RayApi(f"http://127.0.0.1:{port}", token_file, timeout=5.0), "GET", "/api/jobs/")
        assert str(err) == f"GET http://127.0.0.1:{port}/api/jobs/: HTTP 404"
    finally:
        process.terminate()
        process.wait(10)


def test_a_redirect_never_carries_the_token(ray: FakeRay, token_file: Path) -> None:
    # Followed without the token: another server (here the same one, elsewhere) never sees it, and an API that
    # needs it refuses the redirected call.
    error = error_of(RayApi(ray.url, token_file=token_file), "GET", f"/redirect?to={ray.url}/ok")
    assert error.status == 401
    assert [seen["authorization"] for seen in ray.seen] == [f"Bearer {TOKEN}", ""]
