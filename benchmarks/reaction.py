"""Reaction time: from the exporter changing a value to the limit changing in Redis.

Run from the repository root: `.venv/bin/python -m benchmarks.reaction [--trials 20]`.
Starts an exporter, a Prometheus scraping it every second, a redis-server and `governor run`
(a real process, 1 s tick), all on free loopback ports. Each trial waits a random part of a
second (so changes land at every phase of the scrape and tick cycles), flips the GPU value
across the threshold and polls until the limit in Redis follows; tightening and loosening
alternate. The baseline, measured in the same trials: the time until the new value is
visible to an instant query in Prometheus (what any Prometheus-driven controller waits for).
The controller's own share is the difference: at most one tick interval plus a tick (with
equal scrape and tick intervals it is nearly constant within a run: their phase is fixed).
Target: p95 ≤ 2.5 s with a 1 s scrape and a 1 s tick.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import redis

from tests.daemon.harness import Daemon, daemon_env
from tests.support.prometheus import Exporter, PrometheusServer, prometheus_config, wait_for
from tests.support.redis import RedisServer

TICK_SECONDS = 1.0
SCRAPE = "1s"
BASE_RPM = 10.0
POLL_SECONDS = 0.005
TIMEOUT_SECONDS = 15.0
POLICIES = {
    "plans.yaml": "apiVersion: governor/v1\nkind: Plan\nmetadata: {name: free}\n"
    f"spec:\n  limits: {{requests_per_minute: {BASE_RPM:g}}}\n",
    "limits.yaml": "apiVersion: governor/v1\nkind: Limits\nmetadata: {name: global}\n"
    "spec:\n  default_plan: free\n  global: {requests_per_second: 100}\n"
    "  behavior: {tighten: {stabilization: 0s}, loosen: {stabilization: 0s}}\n",
    # No `for:` and no stabilization: the reaction is the pipeline's, not a policy's delay.
    "gpu.yaml": "apiVersion: governor/v1\nkind: ThrottlePolicy\nmetadata: {name: gpu}\n"
    "spec:\n  signals:\n    gpu_util: {query: 'max(gpu_util)', stale_after: 30s}\n"
    "  when: gpu_util > 0.9\n  until: gpu_util < 0.75\n"
    "  actions:\n    - {target: plan/free/requests_per_minute, scale: 0.5}\n",
}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def trial(
    exporter: Exporter, prometheus: PrometheusServer, db: redis.Redis[str], hot: bool
) -> tuple[float, float]:
    """(seconds until Prometheus answers the new value, seconds until Redis holds the limit)."""
    value, wanted = (0.95, str(int(BASE_RPM * 0.5))) if hot else (0.5, str(int(BASE_RPM)))
    changed_at = time.perf_counter()
    exporter.set("gpu_util", value)
    visible = limited = None
    while visible is None or limited is None:
        now = time.perf_counter()
        if now - changed_at > TIMEOUT_SECONDS:
            raise TimeoutError(f"no reaction within {TIMEOUT_SECONDS:g}s (gpu_util={value})")
        if (
            limited is None
            and db.hget("governor:limits:plan:free", "requests_per_minute") == wanted
        ):
            limited = now - changed_at
        if visible is None:
            answer = prometheus.query("max(gpu_util)", time.time())
            if answer and float(answer[0]["value"][1]) == value:
                visible = time.perf_counter() - changed_at
        time.sleep(POLL_SECONDS)
    return visible, limited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        policy_dir = directory / "policies"
        policy_dir.mkdir()
        for name, text in POLICIES.items():
            (policy_dir / name).write_text(text)
        exporter = Exporter().start()
        exporter.set("gpu_util", 0.5)
        server = RedisServer(directory / "redis").start()
        config = prometheus_config([exporter.target], interval=SCRAPE)
        prometheus = PrometheusServer(directory / "prometheus", config=config).start()
        env = daemon_env(
            server.url,
            prometheus.url,
            policy_dir,
            GOVERNOR_CONTROLLER__TICK_SECONDS=f"{TICK_SECONDS:g}",
        )
        daemon = Daemon(directory / "daemon", env).start()
        try:
            with server.client() as db:
                wait_for(
                    lambda: db.hget("governor:limits:plan:free", "requests_per_minute") == "10",
                    "the daemon writes the baseline",
                    timeout=30,
                )
                # Trials start once the daemon trusts the signal (first scrape in, its age known).
                daemon.wait_for_metric(
                    "governor_signals_invalid", 0.0, timeout=60, policy="ThrottlePolicy/gpu"
                )
                run(exporter, prometheus, db, args.trials, rng)
        finally:
            daemon.terminate()
            prometheus.stop()
            server.stop()
            exporter.stop()


def run(
    exporter: Exporter,
    prometheus: PrometheusServer,
    db: redis.Redis[str],
    trials: int,
    rng: random.Random,
) -> None:
    visible, limited = [], []
    for n in range(trials):
        time.sleep(rng.uniform(0.0, 1.0))  # the stimulus' phase, not a wait for an outcome
        seen, done = trial(exporter, prometheus, db, hot=n % 2 == 0)
        visible.append(seen)
        limited.append(done)
        print(f"  trial {n + 1:>2} {'tighten' if n % 2 == 0 else 'loosen ':<7} "
              f"visible {seen:5.2f} s  limit {done:5.2f} s")  # fmt: skip
    own = [d - s for s, d in zip(visible, limited, strict=True)]
    print(f"scrape {SCRAPE}, tick {TICK_SECONDS:g} s, {trials} trials:")
    for name, values in (("Prometheus visible (baseline)", visible), ("limit in Redis", limited),
                         ("controller's own share", own)):  # fmt: skip
        print(f"  {name:<30} p50 {statistics.median(values):5.2f} s   "
              f"p95 {percentile(values, 0.95):5.2f} s   max {max(values):5.2f} s")  # fmt: skip
    p95 = percentile(limited, 0.95)
    ratio = statistics.median(limited) / statistics.median(visible)
    print(f"p50 ratio limit/visible {ratio:.2f}x; target p95 <= 2.5 s: {p95:.2f} s "
          f"({'met' if p95 <= 2.5 else 'missed'})")  # fmt: skip


if __name__ == "__main__":
    main()
