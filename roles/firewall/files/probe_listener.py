"""Listen on a port until told `stop` from this host (or for at most 120 s): a stand-in for a Ray port that is
not yet listening, so the firewall check probes a real listener."""

import socket
import sys
import time

server = socket.create_server(("", int(sys.argv[1])), reuse_port=False)
server.settimeout(1)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        conn, peer = server.accept()
    except TimeoutError:
        continue
    with conn:
        conn.settimeout(2)
        try:
            data = conn.recv(16)
        except OSError:
            data = b""
    if data.startswith(b"stop") and peer[0] in ("127.0.0.1", "::1"):
        break
