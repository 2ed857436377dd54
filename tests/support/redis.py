"""A real redis-server process on a free loopback port, started and stopped by PID."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.support.process import stop_pid, wait_for
from tests.support.tls import TlsFiles

_READY_TIMEOUT_SECONDS = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RedisServer:
    """One redis-server under `directory`; `persistent` keeps data across restarts (AOF)."""

    directory: Path
    port: int = field(default_factory=free_port)
    password: str | None = None
    persistent: bool = False
    pid: int | None = None
    tls: TlsFiles | None = None  # TLS only (no plain port) with this certificate when set

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.directory / "redis.pid"

    def client(self) -> redis.Redis[str]:
        """A plain client for assertions (decoded strings); it trusts the test CA."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            decode_responses=True,
            ssl=self.tls is not None,
            ssl_ca_certs=str(self.tls.ca_file) if self.tls is not None else None,
        )

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pidfile.unlink(missing_ok=True)
        args = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--daemonize", "yes",
            "--save", "",
            "--dir", str(self.directory),
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        # The journal-restart test needs data to outlive the process: AOF, fsync per write.
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else [
            "--appendonly", "no"
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls is not None:
            args[args.index("--port") + 1] = "0"  # no plain-text port at all
            args += [
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert_file),
                "--tls-key-file", str(self.tls.key_file),
                "--tls-ca-cert-file", str(self.tls.ca_file),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        subprocess.run(args, check=True, capture_output=True)
        self._wait(lambda: self.pidfile.exists() and self._pings(), "answer PING")
        self.pid = int(self.pidfile.read_text().strip())
        return self

    def stop(self) -> None:
        """Stop the server by its PID (SIGTERM: with AOF it flushes first) and wait for exit."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        stop_pid(pid, signal.SIGTERM, self._wait)

    def restart(self) -> None:
        """Stop, then start again on the same port and directory."""
        self.stop()
        self.start()

    def _pings(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        def failure() -> str:
            log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
            return f"redis-server on port {self.port} did not {what}:\n{log}"

        wait_for(ready, failure, _READY_TIMEOUT_SECONDS)
