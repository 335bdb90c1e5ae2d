"""A small fault-injecting HTTP proxy for tests: it forwards to a real server on 127.0.0.1 and
turns queued requests into the failures a real server does not produce on demand.

Faults (queued with :meth:`FaultProxy.inject`, used by the next matching requests in order):

- ``"429"``: HTTP 429 with ``Retry-After: 1``;
- ``"500"``: HTTP 500;
- ``"slow:S"``: wait ``S`` seconds, then forward (past the client's timeout);
- ``"badjson"``: HTTP 200 whose JSON body is cut off;
- ``"drop"``: the real response's headers and half its body, then the connection closes;
- ``"401:TEXT"``: HTTP 401 whose error message is ``TEXT`` (servers echo keys there);
- ``"quota"``: HTTP 429 as OpenAI answers an account out of quota;
- ``"fewchoices"``: the real answer (HTTP 200) with its last choice cut off;
- ``"noecho"``: the request forwarded as a server that ignores ``echo`` and ``max_tokens=0``
  answers it: without echo, generating at least one token.

Example:
    >>> with FaultProxy("http://127.0.0.1:8000") as proxy:                  # doctest: +SKIP
    ...     proxy.inject("429", "500")
    ...     model = OpenAIModel("tiny", base_url=proxy.url)
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}


class FaultProxy:
    """Forward ``127.0.0.1:PORT`` to ``upstream``; count requests and the most in flight."""

    def __init__(self, upstream: str) -> None:
        up = urlparse(upstream)
        self.upstream = (up.hostname or "127.0.0.1", up.port or 80)
        self.faults: deque[tuple[str, str]] = deque()
        self.counts: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.latency = 0.0  # seconds added to every request (a remote server's round trip)
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                proxy._handle(self, b"")

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                proxy._handle(self, self.rfile.read(length))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # ------------------------------------------------------------------ control
    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def inject(self, *faults: str, path: str = "/v1/completions") -> None:
        """Queue faults for the next requests to ``path``."""
        with self.lock:
            self.faults.extend((path, f) for f in faults)

    def reset(self) -> None:
        with self.lock:
            self.faults.clear()
            self.counts.clear()
            self.max_in_flight = 0

    def _next_fault(self, path: str) -> str | None:
        with self.lock:
            for item in self.faults:
                if item[0] == path:
                    self.faults.remove(item)
                    return item[1]
        return None

    # ------------------------------------------------------------------ serving
    def _handle(self, req: BaseHTTPRequestHandler, body: bytes) -> None:
        path = req.path.split("?")[0]
        with self.lock:
            self.counts[path] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                time.sleep(self.latency)
            fault = self._next_fault(path)
            if fault == "429":
                return self._reply(req, 429, {"error": {"message": "slow down"}},
                                   {"Retry-After": "1"})
            if fault == "500":
                return self._reply(req, 500, {"error": {"message": "boom"}})
            if fault and fault.startswith("401:"):
                return self._reply(req, 401, {"error": {"message": fault[4:],
                                                        "type": "invalid_request_error"}})
            if fault == "quota":
                return self._reply(req, 429, {"error": {
                    "message": "You exceeded your current quota.", "type": "insufficient_quota",
                    "code": "insufficient_quota"}})
            if fault and fault.startswith("slow:"):
                time.sleep(float(fault[5:]))
            if fault == "noecho":
                asked = json.loads(body)
                asked.update(echo=False, max_tokens=max(1, int(asked.get("max_tokens") or 0)))
                body = json.dumps(asked).encode()
            status, headers, data = self._forward(req, body)
            if fault == "fewchoices":
                answer = json.loads(data)
                answer["choices"] = answer["choices"][:-1]
                return self._reply(req, 200, answer)
            if fault == "badjson":
                data = data[: max(1, len(data) // 2)]
                return self._send(req, 200, {"Content-Type": "application/json"}, data)
            if fault == "drop":
                req.send_response(status)
                req.send_header("Content-Type", "application/json")
                req.send_header("Content-Length", str(len(data)))
                req.end_headers()
                req.wfile.write(data[: len(data) // 2])
                req.wfile.flush()
                req.close_connection = True
                return None
            return self._send(req, status, headers, data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            req.close_connection = True
            return None
        finally:
            with self.lock:
                self.in_flight -= 1

    def _forward(self, req: BaseHTTPRequestHandler,
                 body: bytes) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            headers = {k: v for k, v in req.headers.items() if k.lower() not in _HOP}
            conn.request(req.command, req.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            kept = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP}
            return resp.status, kept, data
        finally:
            conn.close()

    def _reply(self, req: BaseHTTPRequestHandler, status: int, payload: dict[str, Any],
               headers: dict[str, str] | None = None) -> None:
        self._send(req, status, {"Content-Type": "application/json", **(headers or {})},
                   json.dumps(payload).encode())

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, headers: dict[str, str],
              data: bytes) -> None:
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)
