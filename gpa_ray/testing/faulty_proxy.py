"""A misbehaving HTTP proxy on 127.0.0.1 in front of the test S3 server (fault injection).

Point a `StorageConfig.endpoint_url` at `FaultyProxy.endpoint` and every S3 request of the
code under test goes through it. A seeded share of requests is answered `503 SlowDown`
(what S3 says when it throttles) without reaching the server, and another share is
forwarded but has its response cut off mid-body, the connection closed (a reset). Both
are transient: a client that retries them sees the same data as without the proxy.
Faults are drawn per request from one seeded generator, so a run's share of faults is
reproducible (which request gets one depends on thread timing).
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass
class FaultCounts:
    """What the proxy did, by kind (read after a run to check faults really happened)."""

    forwarded: int = 0
    slow_down: int = 0
    reset: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def total(self) -> int:
        return self.forwarded + self.slow_down + self.reset

    @property
    def faulty_share(self) -> float:
        return (self.slow_down + self.reset) / self.total if self.total else 0.0


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        """Quiet: a run makes thousands of requests."""

    def _body(self) -> bytes:
        """The request body, whether sized by Content-Length or sent chunked (the S3
        client streams uploads chunked); forwarded with a Content-Length."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _relay(self) -> None:
        body = self._body()
        fault = self.server.draw()
        if fault == "slow_down":
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOW_DOWN)))
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer never has a body
                self.wfile.write(SLOW_DOWN)
            return
        upstream = http.client.HTTPConnection(self.server.upstream_host, timeout=60)
        try:
            skip = HOP_BY_HOP | {"content-length"}
            headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
            headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response(response.status, response.reason)
        # A HEAD answer has no body but the object's Content-Length: pass that one on.
        own_length = self.command != "HEAD"
        for key, value in response.getheaders():
            skip = HOP_BY_HOP | ({"content-length"} if own_length else set())
            if key.lower() not in skip:
                self.send_header(key, value)
        if own_length:
            self.send_header("Content-Length", str(len(data)))
        if fault == "reset" and len(data) > 1:
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str, slow_down: float, reset: float, seed: int) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream_host = urlsplit(upstream).netloc
        self.slow_down, self.reset = slow_down, reset
        self.random = random.Random(seed)
        self.counts = FaultCounts()

    def draw(self) -> str:
        """This request's fate: "slow_down", "reset" or "forward" (seeded, thread-safe)."""
        with self.counts.lock:
            x = self.random.random()
            fate = (
                "slow_down"
                if x < self.slow_down
                else "reset"
                if x < self.slow_down + self.reset
                else "forward"
            )
            if fate == "slow_down":
                self.counts.slow_down += 1
            elif fate == "reset":
                self.counts.reset += 1
            else:
                self.counts.forwarded += 1
            return fate


@dataclass(frozen=True)
class FaultyProxy:
    """A running proxy: its endpoint (for `storage.endpoint_url`) and its fault counts."""

    endpoint: str
    counts: FaultCounts


@contextmanager
def faulty_proxy(
    upstream: str, slow_down: float = 0.1, reset: float = 0.05, seed: int = 0
) -> Iterator[FaultyProxy]:
    """Serve a proxy to `upstream` (an http:// endpoint) on a free loopback port that
    answers a `slow_down` share of requests 503 SlowDown and cuts a `reset` share off
    mid-body; stopped on exit."""
    server = _ProxyServer(upstream, slow_down, reset, seed)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield FaultyProxy(f"http://{host}:{port}", server.counts)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
