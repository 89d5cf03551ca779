"""An HTTP proxy in front of the tests' S3 endpoint that, for windows of seconds, answers every request with a 503
or drops its connection without an answer: the transient faults a real object store has (throttling, a restarted
front end, a dropped connection).

It runs as a thread of the process that controls it; clients reach it through AWS_ENDPOINT_URL=`proxy.url`.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
KINDS = ("503", "drop")
# Hop-by-hop headers: about one connection, not forwarded (RFC 9110 7.6.1); the body is resent with its length.
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultyProxy:
    """`fault(kind, seconds)` opens a window; `faulted[kind]` counts the requests it spoiled; `forwarded` the rest."""

    def __init__(self, upstream: str):
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.faulted = dict.fromkeys(KINDS, 0)
        self.forwarded = 0
        self._window: tuple[str, float] | None = None  # (kind, monotonic end)
        self._lock = threading.Lock()
        self.server = _QuietServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fault(self, kind: str, seconds: float) -> None:
        assert kind in KINDS, kind
        with self._lock:
            self._window = (kind, time.monotonic() + seconds)

    def current_fault(self) -> str | None:
        """The kind of the open window, counting this request as spoiled by it; None: forward the request."""
        with self._lock:
            if self._window and time.monotonic() < self._window[1]:
                self.faulted[self._window[0]] += 1
                return self._window[0]
            self.forwarded += 1
            return None

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that gave up on a request (its own timeout) leaves a broken pipe here: nothing to report."""


def _handler(proxy: FaultyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the AWS SDK's connection pool expects

        def _relay(self) -> None:
            body = self._body()
            fault = proxy.current_fault()
            if fault == "drop":  # the connection goes away without an answer
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if fault == "503":
                self._answer(503, [("Content-Type", "application/xml"), ("Retry-After", "1")], SLOW_DOWN)
                return
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                kept = [(k, v) for k, v in answer.getheaders()
                        if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]
                self._answer(answer.status, kept, data, head=self.command == "HEAD",
                             length=answer.getheader("Content-Length"))
            finally:
                upstream.close()

        def _body(self) -> bytes | None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else None

        def _answer(self, status: int, headers: list, data: bytes, head: bool = False,
                    length: str | None = None) -> None:
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", length if head and length else str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        def log_message(self, *args) -> None:  # quiet: the tests print what they measure
            pass

    return Handler
