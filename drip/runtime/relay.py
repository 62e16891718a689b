"""Relaying connections between a TCP port and a Unix socket: TensorBoard on loopback only.

A port that Docker publishes on the engine's bridge reaches the container through its bridge
address, so a server listening there is also open to every other container on that bridge and to
the host through that address, whatever host address the port is published on. Instead, in
bridge mode, TensorBoard listens on the container's own 127.0.0.1; ``python -m drip.runtime.relay`` in
the container relays a Unix socket, in a folder bind-mounted from the host and owned by the user,
to it; and the starter listens on the host's 127.0.0.1 and relays each connection to that socket.
No port is published, and the container's bridge address serves nothing.

Standard library only: the starters import it on the host.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import sys
import threading
from collections.abc import Callable

CHUNK = 65536


def relay(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways between two connected sockets until both sides have finished."""
    with a, b, selectors.DefaultSelector() as sel:
        peers = {a: b, b: a}
        for s in peers:
            sel.register(s, selectors.EVENT_READ)
        open_reads = 2
        while open_reads:
            for key, _ in sel.select():
                src = key.fileobj
                try:
                    data = src.recv(CHUNK)
                except OSError:
                    data = b""
                if data:
                    try:
                        peers[src].sendall(data)
                        continue
                    except OSError:
                        return  # the other side is gone: nothing more can be delivered
                # End of one direction: pass it on, keep the other open (HTTP may still answer).
                sel.unregister(src)
                open_reads -= 1
                try:
                    peers[src].shutdown(socket.SHUT_WR)
                except OSError:
                    pass


def serve(listener: socket.socket, connect: Callable[[], socket.socket], stop: threading.Event) -> None:
    """Accept on ``listener`` until ``stop`` is set; relay each connection to ``connect()``.

    A connection that cannot be relayed (TensorBoard not up yet) is closed: the browser retries.
    """
    listener.settimeout(0.5)
    while not stop.is_set():
        try:
            client, _ = listener.accept()
        except (TimeoutError, socket.timeout):
            continue
        except OSError:
            return  # the listener was closed
        client.settimeout(None)
        try:
            upstream = connect()
        except OSError:
            client.close()
            continue
        threading.Thread(target=relay, args=(client, upstream), daemon=True).start()


def start(listener: socket.socket, connect: Callable[[], socket.socket]) -> threading.Event:
    """``serve`` in a daemon thread; set the returned event (and close ``listener``) to stop."""
    stop = threading.Event()
    threading.Thread(target=serve, args=(listener, connect, stop), daemon=True, name="drip-forward").start()
    return stop


def unix_connector(path: str) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError:
            s.close()
            raise
        return s

    return connect


def tcp_connector(host: str, port: int) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        s = socket.create_connection((host, port), timeout=10)
        s.settimeout(None)  # an idle keep-alive connection is not an error
        return s

    return connect


def main(argv: list[str] | None = None) -> int:
    """In the container: listen on ``--unix PATH`` and relay to ``--to HOST:PORT``."""
    p = argparse.ArgumentParser(prog="python -m drip.runtime.relay", description=__doc__.split("\n")[0])
    p.add_argument("--unix", required=True, help="the Unix socket to create and listen on")
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="where each connection goes")
    args = p.parse_args(argv)
    host, _, port = args.to.rpartition(":")
    if os.path.exists(args.unix):
        os.unlink(args.unix)  # left by an earlier run in the same folder
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)  # only the user (and root) may connect
    try:
        listener.bind(args.unix)
    finally:
        os.umask(old)
    listener.listen(64)
    print(f"[drip] relaying {args.unix} to {args.to}", file=sys.stderr, flush=True)
    serve(listener, tcp_connector(host, int(port)), threading.Event())
    return 0


if __name__ == "__main__":
    sys.exit(main())
