"""A signal that turns to NaN in Prometheus (a gauge exported as NaN: a division by zero in
the exporter) is not a number the engine reads: the engaged policy holds, then falls back,
and the journal's stale-hold event says which signal was bad and why."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.daemon.harness import (
    FREE_RPM,
    POLICY,
    TICK_SECONDS,
    Daemon,
    DaemonFactory,
    Gpu,
    daemon_env,
    events,
    limit,
)
from tests.support.prometheus import PrometheusServer, wait_for
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration


def test_a_nan_signal_holds_then_falls_back_and_the_journal_says_why(
    db: redis.Redis[str],
    redis_server: RedisServer,
    prometheus: PrometheusServer,
    gpu: Gpu,
    policy_dir: Path,
    daemons: DaemonFactory,
) -> None:
    gpu.set(0.95)
    gpu.scraped(prometheus, 0.95)
    daemons("nan", daemon_env(redis_server.url, prometheus.url, policy_dir))
    wait_for(lambda: limit(db) == FREE_RPM * 0.5, "the hot GPU halves the free tier")

    gpu.set(math.nan)
    wait_for(
        lambda: (
            bool(events(db, "policy.transition", policy=POLICY)[-1:])
            and events(db, "policy.transition", policy=POLICY)[-1]["details"]["event"]
            == "stale-hold"
        ),
        "the NaN starts a stale hold",
    )
    [held] = [e for e in events(db, "policy.transition") if e["details"]["event"] == "stale-hold"]
    assert [(s["name"], s["value"], s["validity"]) for s in held["signals"]] == [
        ("gpu_util", None, "not_finite")
    ]
    # Was only the validity: which query failed, and how, was in the log line alone.
    assert held["details"]["invalid"] == {"gpu_util": "not_finite: value is nan"}
    wait_for(lambda: limit(db) == FREE_RPM, "the declared fallback (baseline) returns", 20)


def test_a_value_outside_the_signals_range_holds_then_falls_back_and_says_why(
    db: redis.Redis[str],
    redis_server: RedisServer,
    prometheus: PrometheusServer,
    gpu: Gpu,
    policy_dir: Path,
    daemons: DaemonFactory,
) -> None:
    """A utilisation of 95 (an exporter's percent where the policy reads a ratio) is finite,
    and above 0.9 it would have kept the cut for good: declared `range: {min: 0, max: 1}`,
    it is no reading, and the journal names the range and the likely mistake."""
    policy = policy_dir / "gpu-hot.yaml"
    text = policy.read_text()
    assert "stale_after: 30s}" in text
    policy.write_text(
        text.replace("stale_after: 30s}", "stale_after: 30s, range: {min: 0, max: 1}}")
    )
    gpu.set(0.95)
    gpu.scraped(prometheus, 0.95)
    daemons("range", daemon_env(redis_server.url, prometheus.url, policy_dir))
    wait_for(lambda: limit(db) == FREE_RPM * 0.5, "the hot GPU halves the free tier")

    gpu.set(95.0)
    wait_for(
        lambda: any(e["details"]["event"] == "stale-hold" for e in events(db, "policy.transition")),
        "the out-of-range value starts a stale hold",
    )
    [held] = [e for e in events(db, "policy.transition") if e["details"]["event"] == "stale-hold"]
    assert [(s["name"], s["validity"]) for s in held["signals"]] == [("gpu_util", "out_of_range")]
    reason = held["details"]["invalid"]["gpu_util"]
    assert reason.startswith("out_of_range: value 95 is outside the signal's range 0–1")
    wait_for(lambda: limit(db) == FREE_RPM, "the declared fallback (baseline) returns", 20)


def test_a_throttle_hold_ending_inside_hold_for_is_journalled_with_its_signal(
    db: redis.Redis[str],
    redis_server: RedisServer,
    prometheus: PrometheusServer,
    gpu: Gpu,
    policy_dir: Path,
    daemons: DaemonFactory,
) -> None:
    """An engaged ThrottlePolicy whose signal came back inside `hold_for` journalled the
    hold's beginning and nothing after: on-call read a stale-hold that never ended."""
    policy = policy_dir / "gpu-hot.yaml"
    text = policy.read_text()
    assert "hold_for: 3s" in text
    policy.write_text(text.replace("hold_for: 3s", "hold_for: 1h"))
    gpu.set(0.95)
    gpu.scraped(prometheus, 0.95)
    daemons("recovered", daemon_env(redis_server.url, prometheus.url, policy_dir))
    wait_for(lambda: limit(db) == FREE_RPM * 0.5, "the hot GPU halves the free tier")

    def stale_events() -> list[str]:
        found = events(db, "policy.transition", policy=POLICY)
        return [e["details"]["event"] for e in found if e["details"]["event"] != "engaged"]

    gpu.set(math.nan)
    wait_for(lambda: stale_events() == ["stale-hold"], "the NaN starts a stale hold")
    gpu.set(0.95)
    wait_for(lambda: len(stale_events()) == 2, "the usable signal ends the hold")
    assert stale_events() == ["stale-hold", "stale-recovered"]
    ended = events(db, "policy.transition", policy=POLICY)[-1]
    assert ended["reason"].startswith(f"{POLICY} stale-recovered: gpu_util usable again after")
    assert ended["reason"].endswith("unusable: the condition decides again")
    assert [(s["name"], s["value"], s["validity"]) for s in ended["signals"]] == [
        ("gpu_util", 0.95, "ok")
    ]
    assert limit(db) == FREE_RPM * 0.5  # still hot: still engaged


ADAPTIVE = "AdaptiveLimit/rps-by-gpu"


def _adaptive_only(policy_dir: Path, gpu: Gpu, on_stale: str) -> None:
    """Only an AdaptiveLimit (global rps, baseline 100, bounds 10–100) reads the series."""
    (policy_dir / "gpu-hot.yaml").unlink()
    (policy_dir / "rps-by-gpu.yaml").write_text(
        "apiVersion: governor/v1\nkind: AdaptiveLimit\nmetadata: {name: rps-by-gpu}\n"
        "spec:\n"
        "  target: global/requests_per_second\n"
        f"  signal: {{name: gpu_util, query: 'max(gpu_util{{case=\"{gpu.case}\"}})', "
        "stale_after: 30s, range: {min: 0, max: 1}}\n"
        "  setpoint: 0.8\n"
        "  aimd: {increase: 1, decrease_factor: 0.9, tolerance: 0.05}\n"
        "  bounds: {min: 10, max: 100}\n"
        f"  on_stale: {on_stale}\n"
    )


Transitions = Callable[[], list[dict[str, Any]]]


def _adaptive_daemon(
    name: str, on_stale: str, db: redis.Redis[str], redis_server: RedisServer,
    prometheus: PrometheusServer, gpu: Gpu, policy_dir: Path, daemons: DaemonFactory,
) -> tuple[Daemon, Transitions]:  # fmt: skip
    """A ready daemon with only the AdaptiveLimit, its signal usable (0.8), and a reader of
    its journalled transitions."""
    _adaptive_only(policy_dir, gpu, on_stale)
    gpu.set(0.8)
    gpu.scraped(prometheus, 0.8)
    daemon = daemons(name, daemon_env(redis_server.url, prometheus.url, policy_dir))
    daemon.wait_for_metric("governor_ready", 1.0)
    return daemon, lambda: events(db, "policy.transition", policy=ADAPTIVE)


def test_an_adaptive_limit_holding_on_a_bad_signal_journals_when_and_why_once(
    db: redis.Redis[str],
    redis_server: RedisServer,
    prometheus: PrometheusServer,
    gpu: Gpu,
    policy_dir: Path,
    daemons: DaemonFactory,
) -> None:
    """An AdaptiveLimit whose signal turned bad held its value and journalled nothing: no
    write (the value stands still), no transition, so on-call saw a limit that did not move
    and no line saying why. Now one event when the hold begins, naming the policy, the signal
    and why, none for the ticks it lasts, and one when it ends."""
    on_stale = "{hold_for: 1h, then: baseline}"
    daemon, transitions = _adaptive_daemon(
        "adaptive", on_stale, db, redis_server, prometheus, gpu, policy_dir, daemons
    )

    gpu.set(95.0)  # a percent where the policy reads a ratio
    wait_for(lambda: bool(transitions()), "the out-of-range value starts a hold")
    held_at = time.time()
    daemon.wait_for_metric("governor_policy_in_fallback", 1.0, policy=ADAPTIVE)
    [held] = transitions()
    assert held["details"]["event"] == "stale-hold"
    assert held["reason"].startswith(f"{ADAPTIVE} stale-hold: gpu_util is out_of_range for 0s")
    assert [(s["name"], s["validity"]) for s in held["signals"]] == [("gpu_util", "out_of_range")]
    why = held["details"]["invalid"]["gpu_util"]
    assert why.startswith("out_of_range: value 95 is outside the signal's range 0–1")
    wait_for(lambda: time.time() > held_at + 6 * TICK_SECONDS, "six more ticks of the hold")
    assert len(transitions()) == 1  # not one per tick
    # The log, too, said it once (it warned every tick): when it turned bad, and why.
    [warned] = daemon.logged("signal.invalid")
    assert (warned["policy"], warned["signal"], warned["validity"]) == (
        ADAPTIVE,
        "gpu_util",
        "out_of_range",
    )
    assert daemon.logged("signal.recovered") == []

    gpu.set(0.8)
    wait_for(lambda: len(transitions()) == 2, "the usable signal ends the hold")
    ended = transitions()[-1]
    assert ended["details"]["event"] == "stale-recovered"
    assert ended["reason"].startswith(f"{ADAPTIVE} stale-recovered: gpu_util usable again after")
    assert [(s["name"], s["validity"]) for s in ended["signals"]] == [("gpu_util", "ok")]
    daemon.wait_for_metric("governor_policy_in_fallback", 0.0, policy=ADAPTIVE)
    wait_for(lambda: time.time() > ended["at"] + 6 * TICK_SECONDS, "six more ticks")
    assert len(transitions()) == 2
    [recovered] = daemon.logged("signal.recovered")
    assert (recovered["policy"], recovered["signal"], recovered["was"]) == (
        ADAPTIVE,
        "gpu_util",
        "out_of_range",
    )
    assert recovered["bad_for"] != "0s"
    assert len(daemon.logged("signal.invalid")) == 1


def test_an_adaptive_limit_falling_back_journals_its_signal_and_then_once(
    db: redis.Redis[str],
    redis_server: RedisServer,
    prometheus: PrometheusServer,
    gpu: Gpu,
    policy_dir: Path,
    daemons: DaemonFactory,
) -> None:
    """With `hold_for: 0s` an AdaptiveLimit on a bad signal fell back to `bounds.min` at
    once and journalled no transition: only the limit's change, whose reason on-call could
    not tie to a transition. Now one `stale-fallback` naming the signal, why and `then`."""
    on_stale = "{hold_for: 0s, then: min}"
    _, transitions = _adaptive_daemon(
        "fallback", on_stale, db, redis_server, prometheus, gpu, policy_dir, daemons
    )
    gpu.set(95.0)
    wait_for(lambda: bool(transitions()), "the out-of-range value makes it fall back")
    [fell] = transitions()
    assert fell["details"]["event"] == "stale-fallback"
    assert fell["reason"] == (
        f"{ADAPTIVE} stale-fallback: gpu_util is out_of_range for 0s: falling back to "
        "bounds.min 10 (on_stale: hold_for 0s, then min)"
    )
    assert [(s["name"], s["validity"]) for s in fell["signals"]] == [("gpu_util", "out_of_range")]
    why = fell["details"]["invalid"]["gpu_util"]
    assert why.startswith("out_of_range: value 95 is outside the signal's range 0–1")
    wait_for(
        lambda: bool(events(db, "limit.changed", address="global/requests_per_second", new=10)),
        "the fallback is written",
    )
    fell_at = time.time()
    wait_for(lambda: time.time() > fell_at + 6 * TICK_SECONDS, "six more ticks of it")
    assert len(transitions()) == 1  # not one per tick

    gpu.set(0.8)
    wait_for(lambda: len(transitions()) == 2, "the usable signal ends the fallback")
    assert transitions()[-1]["details"]["event"] == "stale-recovered"
