"""A threaded HTTP server on a loopback port that answers every request with JSON from one
callback: the transport under the contract-test fakes of Kubernetes and Kong."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from tests.support.tls import TlsFiles

# (method, path with query, lower-cased headers, raw body) → (status, JSON body; None: empty)
Respond = Callable[[str, str, Mapping[str, str], bytes], tuple[int, Any]]


class Loopback:
    """`start()` serves `respond` on 127.0.0.1:`port` until `stop()`."""

    def __init__(self, port: int, respond: Respond, tls: TlsFiles | None = None) -> None:
        self.port = port
        self.respond = respond
        self.tls = tls
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self.respond))
        self._server.daemon_threads = True
        if self.tls is not None:  # HTTPS with the test CA's certificate for 127.0.0.1
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        # A short poll interval: shutdown() waits for the next poll.
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()

    def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            server.server_close()


class Served:
    """start/stop for a fake API object that has a `port` and answers in `_respond`."""

    port: int
    _server: Loopback | None
    tls: TlsFiles | None = None  # HTTPS when set

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _respond(
        self, method: str, path: str, headers: Mapping[str, str], raw: bytes
    ) -> tuple[int, Any]:
        raise NotImplementedError

    def start(self) -> Self:
        self._server = Loopback(self.port, self._respond, self.tls)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.stop()


def _handler(respond: Respond) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, answer = respond(self.command, self.path, headers, raw)
            data = b"" if answer is None else json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self._answer()

        def do_PUT(self) -> None:
            self._answer()

        def do_PATCH(self) -> None:
            self._answer()

        def do_DELETE(self) -> None:
            self._answer()

        def log_message(self, format: str, *args: object) -> None:
            return  # the fakes keep their own request logs

    return Handler
