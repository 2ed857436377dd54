"""A fresh install comes up quiet: the shipped cost-anomaly policy against a Prometheus that
has neither gateway series nor a day of history. Its baseline is "not enough history yet"
(`no_history`), its event counters are absent (`absent: zero`), and so no signal counts as
invalid, nothing is in fallback, nothing warns every tick, and /readyz stays green past the
signals' stale_after."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml

from tests.daemon.harness import REPO, DaemonFactory, daemon_env, scraping
from tests.support.prometheus import Exporter, PrometheusServer, wait_for
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

POLICY = "ThrottlePolicy/tenant-cost-anomaly"
STALE_AFTER = "2s"  # the shipped default is 2m: shortened so the test outlives it


def shipped_cost_policy(directory: Path) -> Path:
    """The shipped plans, limits and cost-anomaly policy, its signals' stale_after short."""
    directory.mkdir(parents=True)
    for name in ("plans.yaml", "limits.yaml"):
        shutil.copy(REPO / "policies" / name, directory / name)
    policy = yaml.safe_load((REPO / "policies" / "tenant-cost-anomaly.yaml").read_text())
    for signal in policy["spec"]["signals"].values():
        signal["stale_after"] = STALE_AFTER
    (directory / "tenant-cost-anomaly.yaml").write_text(yaml.safe_dump(policy))
    return directory


def test_a_fresh_install_is_quiet_ready_and_not_in_fallback(
    tmp_path: Path,
    redis_server: RedisServer,
    db: redis.Redis[str],
    prometheus: PrometheusServer,
    daemons: DaemonFactory,
) -> None:
    policies = shipped_cost_policy(tmp_path / "policies")
    env = daemon_env(redis_server.url, prometheus.url, policies)
    daemon = daemons("fresh", env)
    daemon.wait_for_metric("governor_ready", 1.0)
    started = time.time()
    # Well past stale_after (2 s) at a 0.5 s tick: a signal counted unusable would show.
    wait_for(lambda: time.time() - started > 5.0, "5 s of ticks", timeout=10.0)
    wait_for(
        lambda: (daemon.metric("governor_ticks_total", outcome="ok") or 0) >= 10,
        "ten ticks",
    )
    assert daemon.metric("governor_signals_invalid", policy=POLICY) == 0.0
    assert daemon.metric("governor_policy_in_fallback", policy=POLICY) == 0.0
    assert daemon.metric("governor_ticks_total", outcome="degraded") == 0.0
    # Per-policy counters exist at 0 before their first event (increase() sees it).
    assert daemon.metric("governor_fallback_seconds_total", policy=POLICY) == 0.0
    assert daemon.metric("governor_engagements_unwritten_total", policy=POLICY) == 0.0
    assert daemon.http("/readyz") == (200, "ok\n")
    assert daemon.logged("signal.invalid") == []
    waiting = daemon.logged("signal.no_history")
    assert [line["signal"] for line in waiting] == ["usual"]  # said once, not every tick
    assert "not enough history yet" in waiting[0]["detail"]

    # `governor signals` shows the state and exits 0; spend and refused read as 0.
    shown = subprocess.run(
        [sys.executable, "-m", "controller", "signals", "--policies", str(policies), "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    validity = {r["signal"]: r["validity"] for r in json.loads(shown.stdout)["signals"]}
    assert validity == {"spend": "ok", "usual": "no_history", "refused": "ok"}


ADAPTIVE = "AdaptiveLimit/global-inflight-by-gpu"
TTFT = "vllm:time_to_first_token_seconds"


def test_an_idle_pool_is_no_signal_failure_of_the_shipped_adaptive_limit(
    tmp_path: Path, redis_server: RedisServer, daemons: DaemonFactory
) -> None:
    """A vLLM pool with no traffic (the night, a fresh install) made the shipped AdaptiveLimit
    warn every tick and count two signals invalid, so GovernorSignalsStale paged for nothing:
    no gateway had admitted a request (`admitted_rps`: no series) and no first token came in
    2m (`ttft_p99`: NaN). Neither is a fault: none arrive, and nothing was slow.

    The series come from prometheus_client, as vLLM's do: scraped in OpenMetrics, its 0.26
    writes `vllm:kv_cache_usage_perc` as `vllm_kv_cache_usage_perc` (client_python#1177), and
    the shipped queries, which named the colon spelling only, matched nothing at all."""
    exporter = Exporter().start()
    exporter.set("exporter_up", 1.0)
    for name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", f"{TTFT}_count", f"{TTFT}_sum"):  # fmt: skip
        exporter.set(name, 0.0)
    for edge in ("0.1", "1.0", "+Inf"):
        exporter.set(f"{TTFT}_bucket", 0.0, {"le": edge})
    prometheus = scraping(tmp_path / "prometheus", exporter)
    try:
        policies = tmp_path / "policies"
        policies.mkdir()
        for name in ("plans.yaml", "limits.yaml", "global-inflight-by-gpu.yaml"):
            shutil.copy(REPO / "policies" / name, policies / name)
        daemon = daemons("idle", daemon_env(redis_server.url, prometheus.url, policies))
        daemon.wait_for_metric("governor_ready", 1.0)
        started = time.time()

        def ticks() -> float:
            return sum(daemon.metric("governor_ticks_total", outcome=o) or 0.0
                       for o in ("ok", "degraded"))  # fmt: skip

        # Ten ticks, on two scrapes at least (a rate needs them).
        wait_for(lambda: ticks() >= 10 and time.time() - started > 3.0, "ten ticks")
        assert daemon.metric("governor_ticks_total", outcome="degraded") == 0.0
        stored = {r["metric"]["__name__"] for r in prometheus.query(
            '{__name__=~"vllm[:_]kv_cache_usage_perc"}', time.time())}  # fmt: skip
        assert stored in ({"vllm_kv_cache_usage_perc"}, {"vllm:kv_cache_usage_perc"})
        assert daemon.metric("governor_signals_invalid", policy=ADAPTIVE) == 0.0
        assert daemon.logged("signal.invalid") == []
    finally:
        prometheus.stop()
        exporter.stop()
