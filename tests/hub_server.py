"""A local server that speaks the part of the Hugging Face Hub's HTTP API a download uses.

``huggingface_hub`` (what ``transformers``' ``from_pretrained`` downloads with) asks
``HEAD {HF_ENDPOINT}/{repo}/resolve/{revision}/{file}`` for a file's commit, ETag and size, then
``GET``s the same address; a file the repository lacks is a 404 with ``X-Error-Code:
EntryNotFound``, an unknown repository one with ``RepositoryNotFound``. Pointing ``HF_ENDPOINT`` at
this server runs the real download, cache and loading code without the internet.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub:
    """Serves ``repos`` ({"owner/name": folder}) at ``self.endpoint`` until ``close()``."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = {name: Path(folder) for name, folder in repos.items()}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: the test reads hub.requests instead
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                hub.requests.append(f"{self.command} {self.path}")
                path = unquote(self.path.split("?")[0]).lstrip("/")
                repo, marker, rest = path.partition("/resolve/")
                if not marker or repo not in hub.repos:
                    return self._missing("RepositoryNotFound")
                _revision, _, filename = rest.partition("/")
                file = hub.repos[repo] / filename
                if not filename or not file.is_file():
                    return self._missing("EntryNotFound")
                data = file.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _missing(self, code: str):
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
