"""The controller's own telemetry: Prometheus metrics, /healthz and /readyz on one HTTP port.

Counters whose label sets are closed start at 0, so `increase()` sees their first event; no
counter exports a `_created` series (docs/operations.md, Metrics).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from controller.model import Address, Scope
from controller.shipped import is_shipped, shipped_page

# `_created` series would double every counter's series for a value nothing reads; the
# switch is process-wide, so it is set where the metrics are made.
disable_created_metrics()  # type: ignore[no-untyped-call]

FLAP_WINDOW_SECONDS = 3600.0
# The closed label sets, exported at 0 before their first event.
TICK_OUTCOMES = ("ok", "degraded")
DIRECTIONS = ("tighten", "loosen", "add", "remove")
REDIS_OPERATIONS = ("catalog", "control", "leader", "sink")


def repeat_due(count: int, first: int, every: int) -> bool:
    """Whether the `count`th poll or tick in a row of a lasting problem is worth a log line:
    the `first`th, then every `every` after it (a line per tick is a flood, none a secret)."""
    return count >= first and (count - first) % every == 0


class Metrics:
    """Every metric the controller exports, in its own registry (no global state)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tick_seconds = Histogram(
            "governor_tick_duration_seconds",
            "Time of one control-loop tick (signals, engine, resolver, sink, journal).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.ticks = Counter(
            "governor_ticks_total", "Ticks run, by outcome.", ["outcome"], registry=r
        )
        self.changes = Counter(
            "governor_limit_changes_total",
            "Limit changes written, by scope and direction (tighten, loosen, add, remove).",
            ["scope", "direction"],
            registry=r,
        )
        self.signals_invalid = Gauge(
            "governor_signals_invalid",
            "Signals that could not be trusted in the last tick, by policy.",
            ["policy"],
            registry=r,
        )
        self.leader = Gauge(
            "governor_leader", "1 while this replica is the leader (the only writer).", registry=r
        )
        self.ready = Gauge("governor_ready", "1 while /readyz answers 200.", registry=r)
        self.last_success = Gauge(
            "governor_last_successful_tick_timestamp_seconds",
            "Unix time at which the last tick without a reason against readiness ended.",
            registry=r,
        )
        self.fallback = Gauge(
            "governor_policy_in_fallback",
            "1 while a policy acts on untrustworthy signals (on_stale hold or fallback).",
            ["policy"],
            registry=r,
        )
        self.fallback_seconds = Counter(
            "governor_fallback_seconds_total",
            "Time policies spent acting on untrustworthy signals.",
            ["policy"],
            registry=r,
        )
        self.active = Gauge(
            "governor_policy_active",
            "Label values (1 for a policy without `per:`) for which a policy is active.",
            ["policy"],
            registry=r,
        )
        self.labels_dropped = Counter(
            "governor_signal_labels_dropped_total",
            "Series dropped because their label value is not valid (control characters, "
            "over 256 characters: docs/signals.md).",
            registry=r,
        )
        self.reload_failures = Counter(
            "governor_policy_reload_failures_total",
            "Policy directory changes rejected (the last good set kept running), by reason: "
            "invalid, removal (waits for confirm-reload), error.",
            ["reason"],
            registry=r,
        )
        # At 0 from the start, so that increase() (the alert) sees a reason's first failure.
        for reason in ("invalid", "removal", "error"):
            self.reload_failures.labels(reason)
        self.policy_version = Gauge(
            "governor_policy_version_info",
            "The policy set in force (value 1, version as a label).",
            ["version"],
            registry=r,
        )
        self.drift = Counter(
            "governor_drift_detected_total",
            "Limits found changed by someone else than Governor.",
            registry=r,
        )
        self.journal_pending = Gauge(
            "governor_journal_buffer_events",
            "Journal events waiting for Redis.",
            registry=r,
        )
        self.journal_dropped = Counter(
            "governor_journal_dropped_events",
            "Journal events dropped from the full buffer (they are in the log).",
            registry=r,
        )
        self.flapping = Gauge(
            "governor_limits_flapping",
            "Limits that changed direction more than the threshold within the last hour.",
            ["scope"],
            registry=r,
        )
        self.direction_changes = Counter(
            "governor_limit_direction_changes_total",
            "Times a limit turned from tightening to loosening or back.",
            ["scope"],
            registry=r,
        )
        self.overshoot = Gauge(
            "governor_adaptive_overshoot_ratio",
            "How far an AdaptiveLimit's signal is above its setpoint (0 when at or below).",
            ["policy"],
            registry=r,
        )
        self.sink_errors = Counter(
            "governor_sink_errors_total", "Sink reads or writes that failed.", registry=r
        )
        self.redis_errors = Counter(
            "governor_redis_errors_total",
            "Redis operations that failed, by operation (control, catalog, leader lock, sink).",
            ["operation"],
            registry=r,
        )
        self.limit = Gauge(
            "governor_limit",
            "The desired value of every global, per-IP and per-plan limit (tenant and user "
            "limits are left out to bound cardinality: see `governor limits get`).",
            ["address"],
            registry=r,
        )
        self.at_floor = Gauge(
            "governor_limit_at_floor",
            "1 while a limit with a floor sits at it (the service is protected hard).",
            ["address"],
            registry=r,
        )
        self.frozen = Gauge(
            "governor_automation_frozen", "1 while `governor freeze` holds.", registry=r
        )
        self.unwritten = Counter(
            "governor_engagements_unwritten",
            "Policy engagements for a label value that wrote no limit (e.g. a tenant without "
            "a known plan): the policy says it acts, and nothing is enforced.",
            ["policy"],
            registry=r,
        )
        self._start_at_zero()

    def _start_at_zero(self) -> None:
        """Export every child of a closed label set before its first event."""
        for outcome in TICK_OUTCOMES:
            self.ticks.labels(outcome)
        for scope in Scope:
            self.direction_changes.labels(scope.value)
            for direction in DIRECTIONS:
                self.changes.labels(scope.value, direction)
        for operation in REDIS_OPERATIONS:
            self.redis_errors.labels(operation)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class FlapDetector:
    """Counts direction changes per address over the last hour (flaps = oscillation)."""

    threshold: int = 4
    # Per address only the newest threshold + 1 turns are kept: enough to tell "more than
    # threshold" (the controller's question) without a timestamp per turn of a limit that
    # keeps turning all hour. The simulator keeps all: its scorecard counts them.
    keep_all: bool = False
    _last_direction: dict[Address, int] = field(default_factory=dict)
    # Turn times, oldest first. Lists, not deques: a deque allocates a 64-slot block even
    # for one entry, and at 100k tenants every limit that ever turned keeps one.
    _turns: dict[Address, list[float]] = field(default_factory=dict)

    def observe(self, address: Address, old: float | None, new: float | None, now: float) -> bool:
        """Record a change; True when it turned the limit's direction."""
        if old is None or new is None or old == new:
            return False
        direction = 1 if new > old else -1
        previous = self._last_direction.get(address)
        self._last_direction[address] = direction
        if previous is None or previous == direction:
            return False
        turns = self._turns.setdefault(address, [])
        turns.append(now)
        if not self.keep_all and len(turns) > self.threshold + 1:
            del turns[0]  # the oldest: the newest threshold + 1 decide whether it flaps
        return True

    def flapping(self, now: float) -> dict[Address, int]:
        """Addresses whose turns in the last hour exceed the threshold, with their count
        (at most threshold + 1 unless `keep_all`)."""
        out: dict[Address, int] = {}
        since = now - FLAP_WINDOW_SECONDS
        for address, turns in list(self._turns.items()):
            if turns[0] < since:
                del turns[: bisect.bisect_left(turns, since)]
            if not turns:
                del self._turns[address]
            elif len(turns) > self.threshold:
                out[address] = len(turns)
        return out


@dataclass
class Health:
    """What /healthz and /readyz answer. The loop reports each tick's outcome; readiness is
    worked out when asked, so a tick that never ends (a stalled Redis) still shows."""

    tick_seconds: float
    # Not ready once the last successful tick is older than this many intervals.
    unready_after_ticks: float = 3.0
    started: float = field(default_factory=time.time)
    last_tick: float | None = None
    last_success: float | None = None  # the end of the last tick without a reason
    ready: bool = False
    reasons: list[str] = field(default_factory=lambda: ["no tick has run yet"])
    # Per policy with signals: (last time one of its signals was usable, its stale_after).
    _usable: dict[str, tuple[float, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def update(
        self,
        ready: bool,
        reasons: list[str],
        now: float,
        usable: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        with self._lock:
            self.last_tick, self.ready, self.reasons = now, ready, reasons
            if ready:
                self.last_success = now
            if usable is not None:
                self._usable = dict(usable)

    def live(self, now: float) -> tuple[bool, str]:
        """Alive while ticks keep coming (a wedged loop fails liveness and is restarted)."""
        with self._lock:
            reference = self.last_tick if self.last_tick is not None else self.started
        allowed = max(3 * self.tick_seconds, 30.0)
        if now - reference > allowed:
            return False, f"no tick for {now - reference:.0f}s (allowed {allowed:.0f}s)"
        return True, "ok"

    def readiness(self, now: float) -> tuple[bool, str]:
        """Ready when the last tick had no reason against it, the last successful one is
        recent, and every policy with signals had a usable one within its stale_after; else
        each reason on a line of its own."""
        with self._lock:
            reasons = [] if self.ready else list(self.reasons)
            reasons += self._tick_age(now) + _signal_ages(self._usable, now)
        return (False, "\n".join(reasons)) if reasons else (True, "ok")

    def _tick_age(self, now: float) -> list[str]:
        allowed = self.unready_after_ticks * self.tick_seconds
        since = self.last_success if self.last_success is not None else self.started
        age = now - since
        if age <= allowed:
            return []
        what = "last successful tick" if self.last_success is not None else "no successful tick"
        when = "ago" if self.last_success is not None else "since start"
        return [
            f"{what} {age:.0f} s {when} > {self.unready_after_ticks:g} × "
            f"{self.tick_seconds:g} s (GOVERNOR_CONTROLLER__UNREADY_AFTER_TICKS)"
        ]


def _signal_ages(usable: Mapping[str, tuple[float, float]], now: float) -> list[str]:
    return [
        f"no usable signal for policy {policy} for {now - seen:.0f} s "
        f"(stale_after {stale_after:g} s)"
        for policy, (seen, stale_after) in sorted(usable.items())
        if now - seen > stale_after
    ]


class TelemetryServer:
    """A small threaded HTTP server for /metrics, /healthz and /readyz."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        health: Health,
        clock: Callable[[], float] = time.time,
    ) -> None:
        handler = _handler(metrics, health, clock)
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="governor-telemetry", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(
    metrics: Metrics, health: Health, clock: Callable[[], float]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok, text = health.live(clock())
                self._send(200 if ok else 503, (text + "\n").encode(), "text/plain")
            elif path == "/readyz":
                ok, text = health.readiness(clock())
                self._send(200 if ok else 503, (text + "\n").encode(), "text/plain")
            elif is_shipped(path):  # the runbooks and docs that links point to
                self._send(*shipped_page(path))
            else:
                self._send(404, b"try /metrics, /healthz or /readyz\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # probes every few seconds would drown the journal in noise

    return Handler
