"""Full control-loop ticks at 1k / 10k / 100k tenants × 3 signals, against the floor.

Run from the repository root: `.venv/bin/python -m benchmarks.tick_scale [--tenants N ...]`.
Each scale runs in a child process of its own (so its RSS is its own), with its own
Prometheus (backfilled with promtool: per tenant `tenant_load`, `tenant_queue`,
`tenant_errors`) and its own redis-server, both on free loopback ports. The controller is
the daemon's (`controller.control.daemon.build`: real PrometheusSource, RedisSink, journal), ticking
on a virtual clock 5 s apart through the backfilled history. Every tick one tenth of the
tenants turns hot or cool, so 10% of the 100k+ limits change per tick (each change written,
journalled, its decision recorded).

The floor, measured in the same run right after each tick: the same 3 queries fetched
concurrently (as the source fetches them) and JSON-decoded by httpx (the standard library's
json), plus one raw pipelined HSET of the same changed (key, field, value) triples. Nearly
all of it is Prometheus evaluating and sending 3 × N series, which no controller can skip.
It runs in a helper process forked before the controller is built (timed inside it): the
3 × N decoded series would otherwise sit in the controller's heap and count in its RSS. The
backfill's OpenMetrics text is made there too, for the same reason.
Redis' own view of the controller: SLOWLOG (every command over 100 µs, with its duration in
µs) and the LATENCY monitor (threshold 1 ms; it also sees EXEC) are reset before the
start-up tick and read after it, then reset again and read after the timed ticks: the
longest single command is how long the controller kept every gateway's admission waiting
(issue #18: ≤ 5 ms). On a loaded machine even a one-field HSET can wait milliseconds for a
CPU: the worst of such constant-work commands is printed beside, as the run's noise.
Targets at 100k tenants: ≤ 1.0 s per tick, ≤ 3× the floor, RSS ≤ 300 MB, longest Redis
command ≤ 5 ms. `--profile`
prints where each scale's ticks spend their time (pyinstrument; the timings are then
inflated by the profiler).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import redis
from pyinstrument import Profiler

from controller.contract.keys import KeySchema, format_value
from controller.control.daemon import Daemon, build
from controller.logging import configure_logging
from controller.model import Address
from controller.settings import (
    ControllerSettings,
    LeaderSettings,
    PrometheusSettings,
    RedisSettings,
    Settings,
    TelemetrySettings,
)
from tests.support.prometheus import PrometheusServer, Series, backfill, openmetrics
from tests.support.redis import RedisServer

GROUPS = 10  # tenant i belongs to group i % 10; one group flips per tick: 10% change
TICK_SECONDS = 5.0  # virtual time between ticks (the daemon's default)
QUERIES = {
    "load": "max by (tenant) (tenant_load)",
    "queue": "max by (tenant) (tenant_queue)",
    "errors": "max by (tenant) (tenant_errors)",
}
BASE_TPM = 1000  # the free plan's tokens_per_minute
BASELINES = 3  # global rps, the free plan's tpm and rpm: limits besides the tenants'
POLICIES = {
    "plans.yaml": f"""
apiVersion: governor/v1
kind: Plan
metadata: {{name: free}}
spec:
  limits: {{tokens_per_minute: {BASE_TPM}, requests_per_minute: 60}}
""",
    "limits.yaml": """
apiVersion: governor/v1
kind: Limits
metadata: {name: global}
spec:
  default_plan: free
  global: {requests_per_second: 2000}
  behavior:
    tighten: {stabilization: 0s}
    loosen: {stabilization: 0s}
""",
}


def throttle(name: str, signals: list[str], when: str, scale: float) -> str:
    """A per-tenant ThrottlePolicy scaling each tenant's tokens_per_minute."""
    listed = "".join(f"    {s}: {{query: '{QUERIES[s]}', stale_after: 30m}}\n" for s in signals)
    return (
        f"apiVersion: governor/v1\nkind: ThrottlePolicy\nmetadata: {{name: {name}}}\n"
        f"spec:\n  per: tenant\n  signals:\n{listed}  when: {when}\n"
        f"  actions:\n    - {{target: tenant/$tenant/tokens_per_minute, scale: {scale}}}\n"
    )


# Every tenant gets a limit of its own (so 100k limits exist); hot tenants a lower one.
POLICIES["tenant-share.yaml"] = throttle("tenant-share", ["errors"], "errors >= 0", 0.9)
POLICIES["tenant-hot.yaml"] = throttle(
    "tenant-hot", list(QUERIES), "load > 0.9 && queue > 5.0 && errors < 0.5", 0.5
)


def tick_times(start: float, ticks: int) -> list[float]:
    """Tick 0 (start-up, untimed) and the timed ticks 1..ticks."""
    return [start + TICK_SECONDS * k for k in range(ticks + 1)]


def history(tenants: int, times: list[float]) -> Iterator[Series]:
    """Queue and errors constant; load flips for group (k-1) % 10 just before tick k."""
    first = times[0] - 30.0
    for i in range(tenants):
        labels = {"tenant": f"t{i}"}
        yield Series("tenant_queue", labels, [(first, 10.0)])
        yield Series("tenant_errors", labels, [(first, 0.1)])
    for i in range(tenants):
        hot, samples = False, [(first, 0.5)]
        for k, at in enumerate(times[1:], start=1):
            if (k - 1) % GROUPS == i % GROUPS:
                hot = not hot
                samples.append((at - 1.0, 0.95 if hot else 0.5))
        yield Series("tenant_load", {"tenant": f"t{i}"}, samples)


def write_history(data_dir: Path, tenants: int, times: list[float]) -> None:
    """In the floor process: backfill the series `history` describes."""
    backfill(data_dir, openmetrics(history(tenants, times)))


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB."""
    current = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            current = int(line.split()[1]) / 1024
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(tenants: int, ticks: int, profile: bool = False) -> dict[str, Any]:
    """One scale, measured in this process; returns the figures."""
    now = float(int(time.time()))
    times = tick_times(now - 20 * 60, ticks)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        # Forked now, while this process is small and has no threads.
        floors = stack.enter_context(
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
        )
        floors.submit(rss_mb).result()
        directory = Path(tmp)
        prometheus = PrometheusServer(directory / "prometheus")
        started = time.perf_counter()
        # In the helper process too: the 3 × N series' text (tens of MB at 100k tenants)
        # would otherwise leave its high-water mark in the controller's RSS.
        floors.submit(write_history, prometheus.data_dir, tenants, times).result()
        backfilled = time.perf_counter() - started
        stack.callback(prometheus.stop)
        prometheus.start()
        server = RedisServer(directory / "redis").start()
        stack.callback(server.stop)
        # The journal's log lines are produced (their cost counts), not kept.
        configure_logging("info", stack.enter_context(open(os.devnull, "w")))
        daemon = build(settings_for(directory, prometheus, server))
        stack.callback(daemon.close)
        figures = _ticks(daemon, floors, prometheus, server, tenants, times, profile)
    figures["backfill_seconds"] = backfilled
    return figures


def settings_for(directory: Path, prometheus: PrometheusServer, server: RedisServer) -> Settings:
    policy_dir = directory / "policies"
    policy_dir.mkdir()
    for name, text in POLICIES.items():
        (policy_dir / name).write_text(text.lstrip())
    return Settings(
        prometheus=PrometheusSettings(url=prometheus.url, timeout_seconds=30),
        redis=RedisSettings(url=server.url, socket_timeout_seconds=30),
        controller=ControllerSettings(policy_dir=policy_dir, tick_seconds=TICK_SECONDS),
        leader=LeaderSettings(mode="none"),
        telemetry=TelemetrySettings(port=0),
    )


def _ticks(
    daemon: Daemon,
    floors: ProcessPoolExecutor,
    prometheus: PrometheusServer,
    server: RedisServer,
    tenants: int,
    times: list[float],
    profile: bool = False,
) -> dict[str, Any]:
    controller = daemon.controller
    clock = [times[0]]
    controller.clock = lambda: clock[0]
    monitor = server.client()
    _watch(monitor)
    first = controller.tick()  # start-up: every limit written once, not timed
    startup = _longest(monitor)
    _watch(monitor)
    assert first.ready, first.reasons
    assert len(first.changes) == tenants + BASELINES, len(first.changes)
    # The daemon drops each tick's outcome (evaluation, resolution, changes): so does this.
    del first
    prefix = daemon.settings.redis.key_prefix
    ticks, bottoms, fetches, writes = [], [], [], []
    profiler = Profiler(interval=0.001) if profile else None
    if profiler is not None:
        profiler.start()
    for at in times[1:]:
        clock[0] = at
        started = time.perf_counter()
        outcome = controller.tick()
        ticks.append(time.perf_counter() - started)
        assert outcome.ready, outcome.reasons
        written = [(c.address, c.new) for c in outcome.changes if c.new is not None]
        del outcome
        assert len(written) == tenants // GROUPS, len(written)
        fetch, write = floors.submit(
            floor, prometheus.url, server.url, prefix, at, written
        ).result()
        fetches.append(fetch)
        writes.append(write)
        bottoms.append(fetch + write)
    if profiler is not None:
        profiler.stop()
    steady = _longest(monitor)
    monitor.close()
    current, peak = rss_mb()
    tick, bottom = statistics.median(ticks), statistics.median(bottoms)
    return {
        "tenants": tenants,
        "limits": tenants + BASELINES,
        "changes_per_tick": tenants // GROUPS,
        "ticks": len(ticks),
        "tick_seconds": tick,
        "tick_max_seconds": max(ticks),
        "floor_seconds": bottom,
        "floor_fetch_seconds": statistics.median(fetches),
        "floor_write_seconds": statistics.median(writes),
        "ratio": tick / bottom,
        "rss_mb": current,
        "peak_rss_mb": peak,
        "startup_longest": startup,
        "tick_longest": steady,
        "profile": profiler.output_text(color=False, unicode=False) if profiler else "",
    }


SLOW_MICROSECONDS = 100  # SLOWLOG's threshold: every command this long or longer is kept


def _watch(client: redis.Redis[str]) -> None:
    """Start counting afresh: SLOWLOG keeps commands over 100 µs, LATENCY events over 1 ms."""
    client.config_set("slowlog-log-slower-than", SLOW_MICROSECONDS)
    client.config_set("slowlog-max-len", 100_000)
    client.config_set("latency-monitor-threshold", 1)
    client.slowlog_reset()
    client.execute_command("LATENCY", "RESET")


# Commands whose work is constant (one key, at most one field or one stream entry), with
# their most arguments so: when one of them takes milliseconds, Redis was waiting for a CPU,
# not working. Their worst is the run's noise.
_CONSTANT = dict.fromkeys(("GET", "SET", "HLEN", "HGET", "HSET", "HDEL", "INCR", "PUBLISH"), 4)
_CONSTANT["XADD"] = 16


def _longest(client: redis.Redis[str]) -> dict[str, Any]:
    """Since `_watch`: the longest command (µs), how many took over 1 ms and 5 ms, the worst
    few command kinds (name and first key), and the LATENCY monitor's worst 'command' event
    (ms; it also sees EXEC, which SLOWLOG leaves out for the commands it runs)."""
    # The raw reply: redis-py's own parser joins the arguments into one string.
    entries = client.execute_command("SLOWLOG", "GET", 100_000)
    worst: dict[str, int] = {}
    for entry in entries:
        words = [w.decode() if isinstance(w, bytes) else str(w) for w in entry[3]]
        scripted = words[0].upper() in ("EVAL", "EVALSHA") and len(words) > 3
        key = words[3] if scripted else [*words, ""][1]
        kind = f"{words[0].upper()} {re.sub(r'[{]t:[^}]*[}]', '{t:*}', key)}"[:60]
        worst[kind] = max(worst.get(kind, 0), int(entry[2]))
        if len(words) <= _CONSTANT.get(words[0].upper(), 0):
            worst["noise"] = max(worst.get("noise", 0), int(entry[2]))
    latency = {str(row[0]): int(row[3]) for row in client.execute_command("LATENCY", "LATEST")}
    durations = [int(e[2]) for e in entries]
    noise = worst.pop("noise", 0)
    ranked = sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    return {
        "micros": max(durations, default=0),
        "kinds": ", ".join(f"{kind} {micros / 1000:.1f}" for kind, micros in ranked),
        "over_1ms": sum(d > 1000 for d in durations),
        "over_5ms": sum(d > 5000 for d in durations),
        "latency_ms": latency.get("command", 0),
        "noise_micros": noise,
    }


_FLOOR_CLIENTS: dict[str, Any] = {}  # the floor process's connections, made once


def floor(
    prometheus_url: str,
    redis_url: str,
    prefix: str,
    at: float,
    written: list[tuple[Address, float]],
) -> tuple[float, float]:
    """In the floor process: (fetch + decode of the 3 queries, concurrently as the source
    runs them; one raw pipelined HSET of the same changes)."""
    if not _FLOOR_CLIENTS:
        _FLOOR_CLIENTS["http"] = httpx.Client(base_url=prometheus_url, timeout=60)
        _FLOOR_CLIENTS["redis"] = redis.Redis.from_url(redis_url, decode_responses=True)
    http: httpx.Client = _FLOOR_CLIENTS["http"]
    raw: redis.Redis[str] = _FLOOR_CLIENTS["redis"]
    keys = KeySchema(prefix)

    def fetch(query: str) -> None:
        answer = http.get("/api/v1/query", params={"query": query, "time": f"{at:.3f}"}).json()
        assert answer["status"] == "success"

    started = time.perf_counter()
    with ThreadPoolExecutor(len(QUERIES)) as pool:
        list(pool.map(fetch, QUERIES.values()))
    fetched = time.perf_counter()
    pipe = raw.pipeline(transaction=False)
    for address, value in written:
        key, name = keys.owner_and_field(address)
        pipe.hset(key, name, format_value(value))  # the values just written: a no-op
    pipe.execute()
    return fetched - started, time.perf_counter() - fetched


def report(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'tenants':>8} {'limits':>7} {'changed':>8} {'tick ms':>9} {'max ms':>8} "
        f"{'floor ms':>9} {'(fetch':>7} {'+ write)':>8} {'ratio':>6} {'RSS MB':>7} {'peak MB':>8}"
    )
    for r in rows:
        print(
            f"{r['tenants']:>8} {r['limits']:>7} {r['changes_per_tick']:>8} "
            f"{r['tick_seconds'] * 1000:>9.1f} {r['tick_max_seconds'] * 1000:>8.1f} "
            f"{r['floor_seconds'] * 1000:>9.1f} {r['floor_fetch_seconds'] * 1000:>7.1f} "
            f"{r['floor_write_seconds'] * 1000:>8.1f} {r['ratio']:>5.2f}x "
            f"{r['rss_mb']:>7.0f} {r['peak_rss_mb']:>8.0f}"
        )
    print(f"{'tenants':>8}  longest Redis command (SLOWLOG, > 100 µs kept; LATENCY max)")
    for r in rows:
        for phase in ("startup", "tick"):
            w = r[f"{phase}_longest"]
            print(
                f"{r['tenants']:>8}  {phase + ':':<9}{w['micros'] / 1000:>8.2f} ms "
                f"({w['over_1ms']} over 1 ms, {w['over_5ms']} over 5 ms; LATENCY "
                f"{w['latency_ms']} ms); worst kinds (ms): {w['kinds']}; constant-work "
                f"commands up to {w['noise_micros'] / 1000:.1f} ms (CPU contention)"
            )
    big = rows[-1]
    print(
        f"targets at {big['tenants']} tenants: tick {big['tick_seconds']:.2f} s (<= 1.0), "
        f"{big['ratio']:.2f}x floor (<= 3), RSS {big['rss_mb']:.0f} MB (<= 300), longest "
        f"Redis command {big['tick_longest']['micros'] / 1000:.2f} ms during the ticks "
        f"(LATENCY {big['tick_longest']['latency_ms']} ms; <= 5)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--ticks", type=int, default=10, help="timed ticks per scale")
    parser.add_argument(
        "--profile", action="store_true", help="print a pyinstrument profile of each scale"
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.ticks, args.profile)))
        return
    rows = []
    for tenants in args.tenants:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.tick_scale", "--child", str(tenants),
             "--ticks", str(args.ticks), *(["--profile"] if args.profile else [])],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            sys.exit(f"{tenants} tenants failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.splitlines()[-1]))
        print(f"  {tenants} tenants done (backfill {rows[-1]['backfill_seconds']:.1f} s)")
        print(rows[-1]["profile"], end="")
    report(rows)


if __name__ == "__main__":
    main()
