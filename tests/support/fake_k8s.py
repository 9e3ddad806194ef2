"""A local stand-in for the few Kubernetes API calls the TrainJob launcher makes.

It plays one TrainJob through a script of statuses (one per status read), reports the rank-0
node's pod as Pending until the job's second status, serves that pod's log, and records every
request, so a test can check what the real `kubernetes` client sent.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlparse

from tests.support.servers import local_http_server


class FakeKubernetes:
    def __init__(self, statuses: list[dict], log_lines: list[str], on_log: Callable[[], None] | None = None):
        self.statuses = statuses
        self.log_lines = log_lines
        self.on_log = on_log
        self.requests: list[tuple[str, str, dict, dict | None]] = []  # method, path, query, body
        self.created: dict | None = None
        self.reads = 0
        self.lock = threading.Lock()

    def handle(self, method: str, path: str, query: dict, body: dict | None) -> tuple[int, object]:
        with self.lock:
            self.requests.append((method, path, query, body))
        parts = path.strip("/").split("/")
        if parts[:2] == ["apis", "trainer.kubeflow.org"] and parts[5:] == ["trainjobs"] and method == "POST":
            self.created = body
            return 201, body
        if parts[:2] == ["apis", "trainer.kubeflow.org"] and len(parts) == 7:
            if self.created is None or parts[6] != self.created["metadata"]["name"]:
                return 404, {"kind": "Status", "code": 404, "reason": "NotFound"}
            if method == "DELETE":
                return 200, {"kind": "Status", "status": "Success"}
            status = self.statuses[min(self.reads, len(self.statuses) - 1)]
            self.reads += 1
            return 200, {**self.created, "status": status}
        if parts[:2] == ["api", "v1"] and parts[-1] == "pods":
            phase = "Pending" if self.reads < 2 else "Running"
            name = f"{self.created['metadata']['name']}-node-0-0-abcde"
            pod = {"metadata": {"name": name, "namespace": parts[3]}, "status": {"phase": phase}}
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [pod]}
        if parts[:2] == ["api", "v1"] and parts[-1] == "log":
            if self.on_log:
                self.on_log()
            return 200, "".join(f"{line}\n" for line in self.log_lines)
        return 404, {"kind": "Status", "code": 404}


@contextlib.contextmanager
def serve(fake: FakeKubernetes) -> Iterator[str]:
    """Serve `fake` on 127.0.0.1 in a thread; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            code, payload = fake.handle(self.command, url.path, parse_qs(url.query), body)
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *args) -> None:
            pass

    with local_http_server(Handler) as url:
        yield url
