#!/usr/bin/env python3
"""Serves the benchmark's origin files over HTTP/1.1 on 127.0.0.1 and counts requests per path.

    bench/origin.py --port PORT [--delay-ms 500] [--max-age 300] [--short-max-age 1]

Paths (GET and HEAD; keep-alive; every response has a Content-Length):

    /index.json, /bundle-1m.json, /bundle-20m.json
        1 KB, 1 MB and 20 MB JSON bodies, `Cache-Control: public, max-age=MAX_AGE`.
    /auth/<name>     the same bodies, for the contenders' Basic Auth locations.
    /slow/<name>     the same bodies; the response starts after DELAY_MS.
    /stale/<name>    the same bodies after DELAY_MS, with max-age=SHORT_MAX_AGE, so a cache
                     entry expires quickly and every refresh is slow.
    /miss/<key>      a small unique body per key, `max-age=60`.
    /__stats         JSON object: path -> number of requests received (all paths above).

Bodies carry a strong ETag and a Last-Modified, and a matching If-None-Match gets 304. Any other path is 404.
Press Ctrl-C or send SIGTERM to stop.
"""

import argparse
import email.utils
import hashlib
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STARTED = email.utils.formatdate(time.time(), usegmt=True)


def make_body(size: int) -> bytes:
    """Returns a valid JSON document of exactly `size` bytes (size >= 16)."""
    head, tail = b'{"filler":"', b'"}\n'
    return head + b"x" * (size - len(head) - len(tail)) + tail


BODIES = {
    "index.json": make_body(1024),
    "bundle-1m.json": make_body(1 << 20),
    "bundle-20m.json": make_body(20 << 20),
}
ETAGS = {name: '"%s"' % hashlib.sha256(body).hexdigest()[:16] for name, body in BODIES.items()}


class Counter:
    """Counts requests per path; safe across the server's threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {}

    def add(self, path: str) -> None:
        with self._lock:
            self._counts[path] = self._counts.get(path, 0) + 1

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._counts)


class Server(ThreadingHTTPServer):
    """Threads per connection, with a listen backlog deep enough for a burst of connects."""

    daemon_threads = True
    request_queue_size = 1024


class Handler(BaseHTTPRequestHandler):
    """Handles one request on a keep-alive connection; the settings are on the server object."""

    protocol_version = "HTTP/1.1"

    def version_string(self):
        return "bench-origin"

    def do_GET(self):
        self.answer(send_body=True)

    def do_HEAD(self):
        self.answer(send_body=False)

    def log_message(self, *_args):
        pass

    def answer(self, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/__stats":
            self.send(200, json.dumps(self.server.counter.snapshot()).encode(), {}, send_body)
            return
        self.server.counter.add(path)
        settings = self.server.settings
        if path.startswith("/miss/"):
            body = json.dumps({"key": path[len("/miss/"):], "at": time.time()}).encode()
            self.send(200, body, {"Cache-Control": "public, max-age=60"}, send_body)
            return
        family, _, name = path[1:].rpartition("/")
        if name not in BODIES or family not in ("", "auth", "slow", "stale"):
            self.send(404, b"not found\n", {"Cache-Control": "no-store"}, send_body)
            return
        max_age = settings.short_max_age if family == "stale" else settings.max_age
        if family in ("slow", "stale"):
            time.sleep(settings.delay_ms / 1000)
        headers = {
            "Cache-Control": "public, max-age=%d" % max_age,
            "ETag": ETAGS[name],
            "Last-Modified": STARTED,
            "Content-Type": "application/json",
        }
        if self.headers.get("If-None-Match") == ETAGS[name]:
            self.send(304, b"", headers, False)
        else:
            self.send(200, BODIES[name], headers, send_body)

    def send(self, status: int, body: bytes, headers: dict, send_body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body and status != 304:
            self.wfile.write(body)


def main() -> int:
    parser = argparse.ArgumentParser(description="benchmark origin on 127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--delay-ms", type=int, default=500, help="first-byte delay, /slow/ and /stale/")
    parser.add_argument("--max-age", type=int, default=300, help="max-age of the plain bodies")
    parser.add_argument("--short-max-age", type=int, default=1, help="max-age under /stale/")
    settings = parser.parse_args()
    server = Server(("127.0.0.1", settings.port), Handler)
    server.settings = settings
    server.counter = Counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
