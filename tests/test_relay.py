"""drip.runtime.relay: the relay that brings TensorBoard from the container's loopback to the host's."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from drip.runtime import relay

ROOT = Path(__file__).resolve().parents[1]


def echo_server() -> tuple[socket.socket, int]:
    """A TCP server on 127.0.0.1 that answers each connection with its bytes upper-cased."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer(conn):
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(data.upper())

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


def ask(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)  # the answer comes after the request has ended, as HTTP/1.0
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def test_tcp_to_unix_to_tcp_carries_both_directions(tmp_path):
    """The whole chain the starter builds: host TCP port -> Unix socket -> python -m drip.runtime.relay -> TCP."""
    server, server_port = echo_server()
    path = tmp_path / "tb.sock"
    process = subprocess.Popen([sys.executable, "-m", "drip.runtime.relay", "--unix", str(path), "--to", f"127.0.0.1:{server_port}"],
                               cwd=ROOT, stderr=subprocess.PIPE)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = relay.start(listener, relay.unix_connector(str(path)))
    try:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.05)
        assert path.stat().st_mode & 0o077 == 0  # only the user (and root) may connect
        port = listener.getsockname()[1]
        payload = bytes(range(256)) * 2000  # more than one read, and every byte value
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(ask(port, payload))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert answers == [payload.upper()] * 4
    finally:
        stop.set()
        listener.close()
        process.terminate()
        process.wait(10)
        server.close()


def test_a_connection_with_nothing_behind_it_is_closed(tmp_path):
    """Before TensorBoard is up: the client sees the connection end, and the relay keeps serving."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = relay.start(listener, relay.unix_connector(str(tmp_path / "missing.sock")))
    try:
        for _ in range(2):
            with socket.create_connection(listener.getsockname(), timeout=10) as s:
                assert s.recv(1) == b""  # closed, not left hanging
    finally:
        stop.set()
        listener.close()
