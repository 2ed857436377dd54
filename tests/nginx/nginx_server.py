"""A real nginx (Debian nginx-extras) running deploy/nginx/ on a free port, started and stopped
by PID, with its own prefix directory, configuration, pid file and error log."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.process import stop_pid, wait_for
from tests.support.redis import free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "nginx"
_READY_TIMEOUT_SECONDS = 15.0

# The example's placeholders, and what a test puts there: every one must occur exactly once,
# so the example cannot drift from what the tests run.
LUA_PATH = "/opt/governor/nginx/lua/?.lua"
EXPORT_DIR = 'export_dir = "/opt/governor/nginx/scripts"'
SERVER_D = "/opt/governor/nginx/server.d/"
LISTEN = "listen 8080;"
UPSTREAM = "server 127.0.0.1:8000;"
METRICS_DICT = "lua_shared_dict governor_metrics 16m;"


def render(example: str, replacements: Mapping[str, str]) -> str:
    """The example configuration with each placeholder replaced (each must occur once)."""
    text = example
    for old, new in replacements.items():
        found = text.count(old)
        if found != 1:
            raise AssertionError(f"deploy/nginx/nginx.conf holds {old!r} {found} times, not once")
        text = text.replace(old, new)
    return text


@dataclass
class NginxServer:
    """deploy/nginx/nginx.conf under `prefix`, pointed at `export_dir`, `upstream`, Redis."""

    prefix: Path
    export_dir: Path
    upstream_port: int
    env: Mapping[str, str]
    extra_locations: str = ""
    init_options: str = ""  # more `init{...}` options, e.g. 'held_retry_seconds = 0.5'
    metrics_dict: str = METRICS_DICT  # the metrics' lua_shared_dict line ("" for none)
    workers: int | None = None  # worker_processes (None: the shipped `auto`); each has its queue
    read_timeout: str | None = None  # proxy_read_timeout (None: the shipped 600s), e.g. "1s"
    port: int = field(default_factory=free_port)
    pid: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def error_log(self) -> Path:
        return self.prefix / "logs" / "error.log"

    @property
    def pidfile(self) -> Path:
        return self.prefix / "logs" / "nginx.pid"

    def start(self) -> NginxServer:
        (self.prefix / "logs").mkdir(parents=True, exist_ok=True)
        server_d = self.prefix / "server.d"
        server_d.mkdir(exist_ok=True)
        (server_d / "test.conf").write_text(self.extra_locations)
        conf = render(
            (DEPLOY / "nginx.conf").read_text(),
            {
                LUA_PATH: f"{DEPLOY / 'lua'}/?.lua",
                EXPORT_DIR: f'export_dir = "{self.export_dir}"'
                + (f", {self.init_options}" if self.init_options else ""),
                SERVER_D: f"{server_d}/",
                LISTEN: f"listen 127.0.0.1:{self.port};",
                UPSTREAM: f"server 127.0.0.1:{self.upstream_port};",
                METRICS_DICT: self.metrics_dict,
            },
        )
        if self.workers is not None:
            conf = conf.replace("worker_processes auto;", f"worker_processes {self.workers};")
        if self.read_timeout is not None:  # both locations: streamed and fetched whole
            conf = conf.replace(
                "proxy_read_timeout 600s;", f"proxy_read_timeout {self.read_timeout};"
            )
        # As root, nginx would run its workers as `nobody`, who cannot read a test's tmp dir.
        if os.geteuid() == 0:
            conf = "user root;\n" + conf
        path = self.prefix / "nginx.conf"
        path.write_text(conf)
        command = ["nginx", "-p", str(self.prefix), "-e", str(self.error_log), "-c", str(path)]
        started = subprocess.run(command, env=dict(self.env), capture_output=True, text=True)
        if started.returncode != 0:
            raise RuntimeError(f"nginx did not start:\n{started.stderr}\n{self.log_tail()}")
        self._wait(self._ready, "answer /healthz")
        self.pid = int(self.pidfile.read_text().strip())
        return self

    def stop(self) -> None:
        """SIGQUIT (graceful: in-flight timers finish) by PID, and wait for the exit."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        stop_pid(pid, signal.SIGQUIT, self._wait)

    def log_tail(self, size: int = 4000) -> str:
        if not self.error_log.exists():
            return ""
        return self.error_log.read_text(errors="replace")[-size:]

    def problems(self) -> list[str]:
        """Error-log lines of Lua failures: an unexpected error in the module shows here."""
        text = self.error_log.read_text(errors="replace") if self.error_log.exists() else ""
        markers = ("lua entry thread aborted", "runtime error", "[alert]", "[emerg]")
        return [line for line in text.splitlines() if any(m in line for m in markers)]

    def _ready(self) -> bool:
        if not self.pidfile.exists():
            return False
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        wait_for(
            ready,
            lambda: f"nginx on port {self.port} did not {what}:\n{self.log_tail()}",
            _READY_TIMEOUT_SECONDS,
            step=0.02,
        )
