"""`governor run` as a real subprocess for the end-to-end tests: its environment, its stdout
(structlog JSON lines, the journal among them), its telemetry port, and test policy files."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.support.prometheus import Exporter, PrometheusServer, prometheus_config, wait_for
from tests.support.redis import free_port

REPO = Path(__file__).resolve().parents[2]
TICK_SECONDS = 0.5
LEASE_SECONDS = 3.0
STABILIZATION_SECONDS = 4.0
HOLD_FOR_SECONDS = 3.0
FOR_SECONDS = 2.0
# An event is stamped when journalled, some milliseconds into its tick (after the fetch, or
# after the write), while windows run on the ticks' clock: differences of stamps allow this.
STAMPING_SECONDS = 0.1
FREE_RPM = 10.0  # the free plan's baseline requests_per_minute
POLICY = "ThrottlePolicy/gpu-hot"
ADDRESS = "plan/free/requests_per_minute"
LIMITS_KEY = "governor:limits:plan:free"
FIELD = "requests_per_minute"
JOURNAL_KEY = "governor:journal"
LOCK_KEY = "governor:leader"
EXIT_TIMEOUT_SECONDS = 20.0


def write_policies(directory: Path, case: str, scale: float = 0.5) -> Path:
    """The test policy set: the free plan's rpm halves (× `scale`) while `gpu_util{case=…}`
    stays above 0.9 for 2 s, until it drops below 0.75; loosening waits 4 s; stale signals
    hold for 3 s, then the baseline returns."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "plans.yaml").write_text(
        "apiVersion: governor/v1\nkind: Plan\nmetadata: {name: free}\n"
        f"spec:\n  limits: {{requests_per_minute: {FREE_RPM:g}}}\n"
    )
    (directory / "limits.yaml").write_text(
        "apiVersion: governor/v1\nkind: Limits\nmetadata: {name: global}\n"
        "spec:\n"
        "  default_plan: free\n"
        "  global: {requests_per_second: 100}\n"
        "  behavior:\n"
        "    tighten: {stabilization: 0s}\n"
        f"    loosen: {{stabilization: {STABILIZATION_SECONDS:g}s}}\n"
    )
    write_throttle(directory, case, scale)
    return directory


def write_throttle(directory: Path, case: str, scale: float) -> None:
    """(Re)write the one ThrottlePolicy; a hot reload picks the change up."""
    (directory / "gpu-hot.yaml").write_text(
        "apiVersion: governor/v1\nkind: ThrottlePolicy\nmetadata: {name: gpu-hot}\n"
        "spec:\n"
        "  signals:\n"
        f"    gpu_util: {{query: 'max(gpu_util{{case=\"{case}\"}})', stale_after: 30s}}\n"
        "  when: gpu_util > 0.9\n"
        f"  for: {FOR_SECONDS:g}s\n"
        "  until: gpu_util < 0.75\n"
        "  actions:\n"
        f"    - {{target: {ADDRESS}, scale: {scale:g}}}\n"
        f"  on_stale: {{hold_for: {HOLD_FOR_SECONDS:g}s, then: baseline}}\n"
    )


def stream(client: redis.Redis[str]) -> list[dict[str, Any]]:
    """Every journal event in the stream, oldest first (the event JSON of each entry)."""
    return [json.loads(fields["data"]) for _id, fields in client.xrange(JOURNAL_KEY)]


def events(client: redis.Redis[str], kind: str, **fields: object) -> list[dict[str, Any]]:
    """The stream's events of one kind whose fields have the given values."""
    return [
        e
        for e in stream(client)
        if e["kind"] == kind and all(e.get(k) == v for k, v in fields.items())
    ]


def limit(client: redis.Redis[str], key: str = LIMITS_KEY, name: str = FIELD) -> float | None:
    """The value a gateway reads for one limit now (NaN: not a number)."""
    text = client.hget(key, name)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return math.nan


def daemon_env(
    redis_url: str | None, prometheus_url: str, policy_dir: Path, **extra: str
) -> dict[str, str]:
    """The process environment: the parent's minus every GOVERNOR_* and in-cluster hint."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GOVERNOR_") and k != "KUBERNETES_SERVICE_HOST"
    }
    env.update(
        GOVERNOR_PROMETHEUS__URL=prometheus_url,
        GOVERNOR_PROMETHEUS__TIMEOUT_SECONDS="1",
        GOVERNOR_CONTROLLER__POLICY_DIR=str(policy_dir),
        GOVERNOR_CONTROLLER__TICK_SECONDS=f"{TICK_SECONDS:g}",
        GOVERNOR_LEADER__MODE="redis",
        GOVERNOR_LEADER__LEASE_SECONDS=f"{LEASE_SECONDS:g}",
        GOVERNOR_TELEMETRY__HOST="127.0.0.1",
        GOVERNOR_TELEMETRY__PORT="0",
        GOVERNOR_REDIS__SOCKET_TIMEOUT_SECONDS="1",
        GOVERNOR_REDIS__RETRIES="1",
    )
    if redis_url is not None:
        env["GOVERNOR_REDIS__URL"] = redis_url
    env.update(extra)
    return env


def scraping(directory: Path, exporter: Exporter) -> PrometheusServer:
    """A Prometheus scraping `exporter` every second, ready once the first sample is in."""
    config = prometheus_config([exporter.target], interval="1s")
    server = PrometheusServer(directory, config=config).start()
    wait_for(
        lambda: bool(server.query("exporter_up", time.time())),
        "the first scrape is queryable",
    )
    return server


class Gpu:
    """The `gpu_util{case=…}` series one test drives through the exporter."""

    def __init__(self, exporter: Exporter, case: str) -> None:
        self.exporter = exporter
        self.case = case

    def set(self, value: float) -> None:
        self.exporter.set("gpu_util", value, {"case": self.case})

    def scraped(self, prometheus: PrometheusServer, value: float) -> None:
        """Wait until Prometheus answers `value` for the series."""

        def seen() -> bool:
            found = prometheus.query(f'gpu_util{{case="{self.case}"}}', time.time())
            return bool(found) and float(found[0]["value"][1]) == value

        wait_for(seen, f"Prometheus holds gpu_util{{case={self.case!r}}} = {value}")


@dataclass
class Daemon:
    """One `python -m controller run` process; stdout and stderr go to files under `directory`."""

    directory: Path
    env: Mapping[str, str]
    args: Sequence[str] = ()
    telemetry_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def stdout(self) -> Path:
        return self.directory / "stdout.jsonl"

    @property
    def stderr(self) -> Path:
        return self.directory / "stderr.txt"

    def start(self) -> Daemon:
        self.directory.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "GOVERNOR_TELEMETRY__PORT": str(self.telemetry_port)}
        with self.stdout.open("ab") as out, self.stderr.open("ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "controller", "run", *self.args],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=err,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def logs(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far (a torn last line is left for the next read)."""
        lines = []
        for line in self.stdout.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return lines

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.logs() if line.get("event") == event]

    def journalled(self) -> list[dict[str, Any]]:
        """The journal events this process emitted (each carries an event_id)."""
        return [line for line in self.logs() if "event_id" in line]

    def wait_for_log(self, event: str, timeout: float = 15.0) -> dict[str, Any]:
        wait_for(
            lambda: bool(self.logged(event)) or not self._alive(), f"{event} is logged", timeout
        )
        return self.logged(event)[0]

    def _alive(self) -> bool:
        if self.running():
            return True
        raise AssertionError(f"the daemon exited early:\n{self.diagnostics()}")

    def http(self, path: str) -> tuple[int, str]:
        """GET a telemetry path: (status, body); (0, reason) while nothing listens."""
        url = f"http://127.0.0.1:{self.telemetry_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return int(answer.status), answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except (urllib.error.URLError, ConnectionError) as exc:
            return 0, str(exc)

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of /metrics (None while absent or unreachable)."""
        status, text = self.http("/metrics")
        if status != 200:
            return None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return None

    def wait_for_metric(
        self, name: str, value: float, timeout: float = 15.0, **labels: str
    ) -> None:
        wait_for(
            lambda: self._alive() and self.metric(name, **labels) == value,
            f"{name}{labels or ''} == {value} on pid {self.pid}",
            timeout,
        )

    def terminate(self) -> int:
        """SIGTERM by PID; the exit code."""
        return self._signal(signal.SIGTERM)

    def kill(self) -> int:
        """SIGKILL by PID: a crash, nothing cleaned up."""
        return self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)
        return self.process.wait(timeout=EXIT_TIMEOUT_SECONDS)

    def diagnostics(self) -> str:
        """The tail of stdout and stderr, for assertion messages."""
        out = self.stdout.read_text(errors="replace")[-3000:] if self.stdout.exists() else ""
        err = self.stderr.read_text(errors="replace")[-3000:] if self.stderr.exists() else ""
        return f"--- stdout\n{out}\n--- stderr\n{err}"

    def stop(self) -> None:
        """Teardown: SIGKILL a process a test left running."""
        if self.running():
            self.kill()


DaemonFactory = Callable[..., Daemon]
