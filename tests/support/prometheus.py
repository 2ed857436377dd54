"""A real Prometheus on a free loopback port (started and stopped by PID), its backfilled
history written with `promtool`, and a small exporter the test controls."""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import bcrypt
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tests.support.redis import free_port
from tests.support.tls import TlsFiles

READY_TIMEOUT_SECONDS = 15.0
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"


def wait_for(
    condition: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT_SECONDS
) -> None:
    """Poll `condition` until it holds; raise naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f}s waiting until {what}")
        time.sleep(0.05)


@dataclass(frozen=True)
class Series:
    """One backfilled series: metric name, labels, (unix seconds, value) pairs, and type."""

    name: str
    labels: Mapping[str, str]
    samples: Sequence[tuple[float, float]]
    kind: str = "gauge"  # or "counter"


def openmetrics(series: Iterable[Series]) -> str:
    """OpenMetrics text for promtool: one family per name, each series' samples together and
    ascending, `# EOF` last. Counters get the `_total` suffix OpenMetrics requires."""
    by_name: dict[str, list[Series]] = {}
    for one in series:
        by_name.setdefault(one.name, []).append(one)
    lines: list[str] = []
    for name, members in by_name.items():
        kind = members[0].kind
        lines.append(f"# TYPE {name} {kind}")
        suffix = "_total" if kind == "counter" else ""
        for one in members:
            labels = ",".join(f'{k}="{v}"' for k, v in one.labels.items())
            head = f"{name}{suffix}{{{labels}}}" if labels else f"{name}{suffix}"
            lines.extend(f"{head} {_number(value)} {ts:.3f}" for ts, value in sorted(one.samples))
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def tenant_counters(now: float, tenants: int, name: str = "tenant_cost_usd") -> Iterator[Series]:
    """`tenants` counter series `name_total{tenant="t<i>"}`, 4 samples a minute apart ending a
    minute before `now`; tenant i grows by i+1 per minute, so its rate is (i+1)/60 (starting
    above 0, so Prometheus' extrapolation over `[5m]` is not cut at the counter's zero)."""
    times = [now - 60.0 * k for k in (4, 3, 2, 1)]
    for i in range(tenants):
        samples = [(t, float((i + 1) * (k + 1))) for k, t in enumerate(times)]
        yield Series(name, {"tenant": f"t{i}"}, samples, kind="counter")


def _number(value: float) -> str:
    """OpenMetrics spells the special values NaN, +Inf and -Inf."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def backfill(data_dir: Path, text: str) -> None:
    """Write `text` (OpenMetrics) as TSDB blocks into `data_dir` with promtool."""
    data_dir.mkdir(parents=True, exist_ok=True)
    source = data_dir.parent / f"{data_dir.name}-backfill.om"
    source.write_text(text)
    result = subprocess.run(
        [PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", str(source), str(data_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    source.unlink()
    if result.returncode != 0:
        raise RuntimeError(f"promtool backfill failed:\n{result.stderr[-2000:]}")


def prometheus_config(
    targets: Sequence[str] = (), interval: str = "1s", remote_read: str | None = None
) -> str:
    """A Prometheus config scraping `targets` (host:port) every `interval`; `remote_read`
    adds a remote-read endpoint whose failures Prometheus reports as query warnings."""
    lines = [f"global: {{scrape_interval: {interval}, scrape_timeout: {interval}}}"]
    if targets:
        listed = ", ".join(f'"{t}"' for t in targets)
        lines += [
            "scrape_configs:",
            f"  - {{job_name: exporter, static_configs: [{{targets: [{listed}]}}]}}",
        ]
    if remote_read:
        lines += ["remote_read:", f"  - {{url: '{remote_read}', read_recent: true}}"]
    return "\n".join(lines) + "\n"


@dataclass
class PrometheusServer:
    """One Prometheus process on its own data directory and port; with `tls` it serves HTTPS
    with that certificate, with `basic_auth` (user, password) it asks for that login (both
    through Prometheus' own --web.config.file)."""

    directory: Path
    config: str = field(default_factory=prometheus_config)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    tls: TlsFiles | None = None
    basic_auth: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_file(self) -> Path:
        return self.directory / "prometheus.log"

    def start(self) -> PrometheusServer:
        """Start on the same port and data directory as before; wait until /-/ready answers."""
        self.directory.mkdir(parents=True, exist_ok=True)
        config_file = self.directory / "prometheus.yml"
        config_file.write_text(self.config)
        web = self._web_config()
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={self.data_dir}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=30d",
                    "--web.enable-lifecycle",
                    *([f"--web.config.file={web}"] if web else []),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(self._ready, f"Prometheus on port {self.port} is ready")
        except TimeoutError:
            self.kill()
            raise RuntimeError(self.log_file.read_text(errors="replace")[-3000:]) from None
        return self

    def stop(self) -> None:
        """SIGTERM by PID and wait for the exit (the TSDB is closed cleanly)."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL by PID: the crash case (no clean shutdown)."""
        self._signal(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def query(self, expression: str, at: float) -> list[dict[str, Any]]:
        """The raw result list of an instant query, for test set-up and polling."""
        params = urllib.parse.urlencode({"query": expression, "time": f"{at:.3f}"})
        with self._open(f"/api/v1/query?{params}", timeout=5) as answer:
            body = json.load(answer)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def _web_config(self) -> Path | None:
        """Prometheus' web config file for TLS and basic auth, or None without either."""
        lines = []
        if self.tls is not None:
            lines += [
                "tls_server_config:",
                f"  cert_file: {self.tls.cert_file}",
                f"  key_file: {self.tls.key_file}",
            ]
        if self.basic_auth is not None:
            user, password = self.basic_auth
            hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
            lines += ["basic_auth_users:", f"  {user}: '{hashed}'"]
        if not lines:
            return None
        path = self.directory / "web.yml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _open(self, path: str, timeout: float) -> Any:
        """GET `path` as a trusted client: the test CA, the login."""
        request = urllib.request.Request(f"{self.url}{path}")
        if self.basic_auth is not None:
            token = base64.b64encode(":".join(self.basic_auth).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        context = ssl.create_default_context(cafile=str(self.tls.ca_file)) if self.tls else None
        return urllib.request.urlopen(request, timeout=timeout, context=context)

    def _signal(self, signum: int) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            os.kill(process.pid, signum)
        process.wait(timeout=READY_TIMEOUT_SECONDS)

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"Prometheus exited with {self.process.returncode}:\n"
                + self.log_file.read_text(errors="replace")[-3000:]
            )
        try:
            with self._open("/-/ready", timeout=1) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False


class _Gauges(Collector):
    """Gauges whose values and (optional) explicit sample timestamps the test sets."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[float, float | None]] = {}

    def collect(self) -> Iterable[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        for (name, labels), (value, timestamp) in list(self.values.items()):
            names = [k for k, _ in labels]
            family = families.setdefault(name, GaugeMetricFamily(name, name, labels=names))
            family.add_metric([v for _, v in labels], value, timestamp=timestamp)
        return list(families.values())


@dataclass
class Exporter:
    """A /metrics endpoint on a free loopback port, with its own registry."""

    port: int = field(default_factory=free_port)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    _gauges: _Gauges = field(default_factory=_Gauges)
    _server: WSGIServer | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Exporter:
        self.registry.register(self._gauges)
        self._server, _ = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)
        return self

    def set(
        self,
        name: str,
        value: float,
        labels: Mapping[str, str] | None = None,
        timestamp: float | None = None,
    ) -> None:
        """Expose `name{labels} value [timestamp]`; a fixed timestamp freezes the sample time."""
        key = (name, tuple(sorted((labels or {}).items())))
        self._gauges.values[key] = (value, timestamp)

    def stop(self) -> None:
        """Stop answering scrapes (the target goes down)."""
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            server.server_close()
