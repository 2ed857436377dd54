"""End to end: the daemon reads a real Prometheus scraping a test exporter and writes a real
Redis; a GPU value crossing the threshold tightens a limit, its return loosens it only after
the stabilization window, and a broken policy change is rejected while the old set acts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from tests.daemon.harness import (
    ADDRESS,
    FOR_SECONDS,
    FREE_RPM,
    POLICY,
    STABILIZATION_SECONDS,
    STAMPING_SECONDS,
    TICK_SECONDS,
    Daemon,
    Gpu,
    events,
    limit,
    write_throttle,
)
from tests.support.prometheus import wait_for

pytestmark = pytest.mark.integration

TIGHT = FREE_RPM * 0.5


def test_a_hot_gpu_tightens_the_limit_and_it_returns_after_stabilization(
    db: redis.Redis[str], gpu: Gpu, daemon: Daemon
) -> None:
    hot_at = time.time()
    gpu.set(0.95)
    wait_for(lambda: limit(db) == TIGHT, "the hot GPU halves the free tier")
    # A tick's journal events reach the stream when it ends, just after its writes.
    wait_for(lambda: bool(events(db, "limit.changed", new=TIGHT)), "the change is journalled")
    [engaged] = events(db, "policy.transition", policy=POLICY)
    [tightened] = events(db, "limit.changed", address=ADDRESS, new=TIGHT)
    assert tightened["old"] == FREE_RPM
    assert tightened["policy"] == POLICY
    assert tightened["dry_run"] is False
    [reading] = tightened["signals"]
    assert (reading["name"], reading["value"], reading["validity"]) == ("gpu_util", 0.95, "ok")
    assert "gpu_util=0.95" in tightened["reason"]
    # `for: 2s`: pending from the first tick that saw 0.95, which came after the change.
    assert engaged["at"] >= hot_at + FOR_SECONDS

    gpu.set(0.5)
    wait_for(
        lambda: len(events(db, "policy.transition", policy=POLICY)) == 2,
        "the policy is released",
    )
    released = events(db, "policy.transition", policy=POLICY)[-1]
    assert released["details"]["event"] == "released"
    # Released, but loosening waits for the window: still tightened right after the release.
    assert limit(db) == TIGHT
    wait_for(lambda: limit(db) == FREE_RPM, "the baseline returns", timeout=20)
    wait_for(lambda: bool(events(db, "limit.changed", new=FREE_RPM, old=TIGHT)), "journalled")
    [restored] = events(db, "limit.changed", address=ADDRESS, new=FREE_RPM, old=TIGHT)
    assert restored["source"] == "baseline"
    # Nothing restrictive for the whole window: the last one came a tick before the release.
    window = STABILIZATION_SECONDS - TICK_SECONDS
    assert restored["at"] - released["at"] >= window - STAMPING_SECONDS
    assert restored["tick"] > released["tick"]
    for direction in ("tighten", "loosen"):  # counted right after the write: wait for it
        daemon.wait_for_metric(
            "governor_limit_changes_total", 1.0, scope="plan", direction=direction
        )


BROKEN = """apiVersion: governor/v1
kind: ThrottlePolicy
metadata: {name: broken}
spec:
  when: nonsense > 1
  actions:
    - {target: plan/free/requests_per_minute, scale: 0.1}
"""


def test_an_invalid_policy_is_rejected_and_the_old_set_keeps_acting(
    db: redis.Redis[str], gpu: Gpu, policy_dir: Path, daemon: Daemon
) -> None:
    first_version = daemon.wait_for_log("governor.started")["policy_version"]

    (policy_dir / "broken.yaml").write_text(BROKEN)
    daemon.wait_for_metric("governor_policy_reload_failures_total", 1.0, reason="invalid")
    wait_for(lambda: bool(events(db, "policy.rejected")), "the rejection is journalled")
    [rejected] = events(db, "policy.rejected")
    assert rejected["policy_version"] == first_version
    assert rejected["tick"] > 1
    assert any(
        error.startswith(f"{policy_dir / 'broken.yaml'}:5:")
        for error in rejected["details"]["errors"]
    ), rejected["details"]
    assert daemon.metric("governor_policy_version_info", version=first_version) == 1
    assert daemon.http("/readyz")[0] == 200  # a rejected change does not degrade the loop

    gpu.set(0.95)  # the old set still acts: scale 0.5, not the broken policy's 0.1
    wait_for(lambda: limit(db) == TIGHT, "the old set tightens the free tier")

    (policy_dir / "broken.yaml").unlink()
    write_throttle(policy_dir, gpu.case, scale=0.25)
    wait_for(lambda: limit(db) == FREE_RPM * 0.25, "the reloaded set tightens further")
    wait_for(lambda: bool(events(db, "policy.reloaded")), "the reload is journalled")
    [reloaded] = events(db, "policy.reloaded")
    assert reloaded["policy_version"] != first_version
    assert reloaded["reason"] == f"policy set {first_version} → {reloaded['policy_version']}"
    assert daemon.metric("governor_policy_version_info", version=reloaded["policy_version"]) == 1
    assert daemon.metric("governor_policy_version_info", version=first_version) is None
    # The same broken content was reported once, not on every tick.
    assert len(events(db, "policy.rejected")) == 1
    assert daemon.metric("governor_policy_reload_failures_total", reason="invalid") == 1
