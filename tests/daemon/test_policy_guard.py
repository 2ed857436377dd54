"""Issue #14, "what stopped control", end to end against the real daemon, Redis and
Prometheus: an emptied or hostile policy directory never replaces the set in force (at start
it exits 2), every refusal is counted and journalled, a file broken again is reported again,
and a reload that removes most limits waits for `governor policy confirm-reload`."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from tests.daemon.harness import (
    FREE_RPM,
    REPO,
    STABILIZATION_SECONDS,
    TICK_SECONDS,
    Daemon,
    Gpu,
    events,
    limit,
)
from tests.daemon.test_run_command import run
from tests.support.prometheus import wait_for

pytestmark = pytest.mark.integration

GLOBAL_KEY = "governor:limits:global"
CATALOG_KEY = "governor:plans"
FAILURES = "governor_policy_reload_failures_total"
DEEP = """apiVersion: governor/v1
kind: ThrottlePolicy
metadata: {name: deep}
spec:
  signals: {x: {query: up}}
  when: '%s(x > 1.0)'
  actions: [{target: plan/free/requests_per_minute, scale: 0.1}]
""" % ("!" * 500)


def ticks(daemon: Daemon) -> float:
    return sum(daemon.metric("governor_ticks_total", outcome=o) or 0.0 for o in ("ok", "degraded"))


def wait_ticks(daemon: Daemon, count: int) -> None:
    """Let `count` more ticks run (the loosening window passes in ticks, not in a sleep)."""
    target = ticks(daemon) + count
    wait_for(lambda: ticks(daemon) >= target, f"{count} more ticks", timeout=60)


def test_an_emptied_policy_directory_is_refused_and_every_limit_stays(
    db: redis.Redis[str], policy_dir: Path, daemon: Daemon
) -> None:
    version = daemon.wait_for_log("governor.started")["policy_version"]
    catalog = db.hgetall(CATALOG_KEY)
    assert catalog  # the plan list gateways read

    for file in policy_dir.iterdir():  # a botched ConfigMap sync
        file.unlink()
    daemon.wait_for_metric(FAILURES, 1.0, reason="invalid")
    # Past the loosening window, nothing was deleted or changed.
    wait_ticks(daemon, round(STABILIZATION_SECONDS / TICK_SECONDS) + 4)

    assert limit(db) == FREE_RPM
    assert db.hget(GLOBAL_KEY, "requests_per_second") is not None
    assert db.hgetall(CATALOG_KEY) == catalog
    assert daemon.metric("governor_policy_version_info", version=version) == 1
    [rejected] = events(db, "policy.rejected")
    assert rejected["details"]["reason"] == "invalid"
    assert f"{policy_dir}:1:1: the policy set has no `kind: Limits` document" in " ".join(
        rejected["details"]["errors"]
    )
    assert daemon.metric(FAILURES, reason="invalid") == 1  # reported once, not every tick


def test_a_hostile_file_keeps_the_last_good_set_and_is_reported_again_when_broken_again(
    db: redis.Redis[str], gpu: Gpu, policy_dir: Path, daemon: Daemon
) -> None:
    (policy_dir / "deep.yaml").write_text(DEEP)
    daemon.wait_for_metric(FAILURES, 1.0, reason="invalid")
    wait_for(lambda: bool(events(db, "policy.rejected")), "the rejection is journalled")
    [first] = events(db, "policy.rejected")
    assert any(e.startswith(f"{policy_dir / 'deep.yaml'}:6:9:") for e in first["details"]["errors"])
    wait_ticks(daemon, 3)
    assert daemon.logged("tick.failed") == []  # the reload failed, no tick did

    gpu.set(0.95)  # the last good set acts (scale 0.5), not the hostile file's 0.1
    wait_for(lambda: limit(db) == FREE_RPM * 0.5, "the last good set tightens")

    (policy_dir / "deep.yaml").unlink()  # reverted...
    wait_ticks(daemon, 3)
    (policy_dir / "deep.yaml").write_text(DEEP)  # ...and broken again the same way
    daemon.wait_for_metric(FAILURES, 2.0, reason="invalid")
    wait_for(lambda: len(events(db, "policy.rejected")) == 2, "reported again")
    assert "Traceback" not in daemon.stdout.read_text() + daemon.stderr.read_text()


def confirm(env: dict[str, str], version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "controller", "policy", "confirm-reload", version),
            *("--reason", "global limit retired (CHG-1)", "--actor", "sre-on-call"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_reload_removing_most_limits_waits_for_confirm_reload(
    db: redis.Redis[str], policy_dir: Path, daemon: Daemon, ready_env: dict[str, str]
) -> None:
    first = daemon.wait_for_log("governor.started")["policy_version"]
    limits = policy_dir / "limits.yaml"
    limits.write_text(limits.read_text().replace("  global: {requests_per_second: 100}\n", ""))

    daemon.wait_for_metric(FAILURES, 1.0, reason="removal")
    wait_for(lambda: bool(events(db, "policy.rejected")), "the refusal is journalled")
    [refused] = events(db, "policy.rejected")
    details = refused["details"]
    new = details["version"]
    assert details["removed"] == ["global/requests_per_second"]
    assert details["confirm"] == f"governor policy confirm-reload {new} --reason '...'"
    assert f"governor policy confirm-reload {new}" in refused["reason"]
    assert f"version {first} keeps running" in refused["reason"]
    logged = daemon.wait_for_log("policy.reload_rejected")
    assert f"governor policy confirm-reload {new}" in logged["error"]
    wait_ticks(daemon, 3)
    assert db.hget(GLOBAL_KEY, "requests_per_second") is not None  # not removed meanwhile

    wrong = confirm(ready_env, first)  # a confirmation of another set lets nothing in
    assert wrong.returncode == 0, wrong.stderr
    wait_ticks(daemon, 3)
    assert daemon.metric("governor_policy_version_info", version=first) == 1

    done = confirm(ready_env, new)
    assert done.returncode == 0, done.stderr
    assert f"policy set {new} confirmed until" in done.stdout
    wait_for(lambda: bool(events(db, "policy.reloaded")), "the confirmed set is taken")
    [reloaded] = events(db, "policy.reloaded")
    assert reloaded["policy_version"] == new
    assert reloaded["details"]["confirmed_by"] == "sre-on-call"
    [confirmed] = events(db, "policy.confirmed", policy_version=new)
    assert confirmed["actor"] == "sre-on-call"
    assert confirmed["reason"] == "global limit retired (CHG-1)"
    assert daemon.metric(FAILURES, reason="removal") == 1


def test_a_hand_written_confirmation_holds_the_removal_back_naming_its_key(
    db: redis.Redis[str], policy_dir: Path, daemon: Daemon, ready_env: dict[str, str]
) -> None:
    # Not JSON: it failed the whole reload as a bug ('the policy reload failed
    # (JSONDecodeError: ...)', reason="error", naming the directory) instead of saying which
    # key holds what and holding the set back for confirm-reload like any removal.
    db.set("governor:reload-confirmation", "yes, go ahead")
    daemon.wait_for_log("governor.started")
    limits = policy_dir / "limits.yaml"
    limits.write_text(limits.read_text().replace("  global: {requests_per_second: 100}\n", ""))

    daemon.wait_for_metric(FAILURES, 1.0, reason="removal")
    unreadable = daemon.wait_for_log("policy.confirmation_unreadable")
    assert unreadable["error"].startswith("governor:reload-confirmation holds 'yes, go ahead'")
    assert (
        "`governor policy confirm-reload VERSION --reason '...'` replaces it"
        in (unreadable["error"])
    )
    # The metric and the log come before the journal's write: wait for the write itself.
    wait_for(lambda: bool(events(db, "policy.rejected")), "the refusal is journalled")
    [refused] = events(db, "policy.rejected")
    new = refused["details"]["version"]
    assert daemon.metric(FAILURES, reason="error") == 0
    assert db.hget(GLOBAL_KEY, "requests_per_second") is not None  # not removed meanwhile

    done = confirm(ready_env, new)  # the fix the message names
    assert done.returncode == 0, done.stderr
    wait_for(lambda: bool(events(db, "policy.reloaded")), "the confirmed set is taken")


@pytest.mark.parametrize(
    ("keep", "missing"),
    [((), "Limits"), (("plans.yaml",), "Limits"), (("limits.yaml",), "Plan")],
    ids=["empty directory", "no Limits", "no Plan"],
)
def test_an_incomplete_set_at_start_up_exits_2_with_one_line_per_error(
    policy_dir: Path, env: dict[str, str], keep: tuple[str, ...], missing: str
) -> None:
    for file in policy_dir.iterdir():
        if file.name not in keep:
            file.unlink()

    done = run(env, "--once")

    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert f"{policy_dir}:1:1: the policy set has no `kind: {missing}` document" in done.stderr


def test_a_hostile_file_at_start_up_exits_2_naming_file_line_and_column(
    policy_dir: Path, env: dict[str, str]
) -> None:
    (policy_dir / "deep.yaml").write_text(DEEP)

    done = run(env, "--once")

    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert f"{policy_dir / 'deep.yaml'}:6:9: spec.when:" in done.stderr


def test_a_directory_rewritten_at_every_poll_is_said_and_the_set_in_force_kept(
    db: redis.Redis[str], policy_dir: Path, daemon: Daemon
) -> None:
    """A generator that stamps the files on every write, faster than the tick: no two reads
    agree, so nothing is loaded, and the daemon says why instead of staying silent."""
    version = daemon.wait_for_log("governor.started")["policy_version"]
    limits = policy_dir / "limits.yaml"
    text = limits.read_text()
    stop = threading.Event()

    def rewrite() -> None:
        n = 0
        while not stop.wait(TICK_SECONDS / 4):
            n += 1
            limits.write_text(f"{text}\n# generated {n}\n")

    writer = threading.Thread(target=rewrite, daemon=True)
    writer.start()
    try:
        said = daemon.wait_for_log("policy.unsettled")
    finally:
        stop.set()
        writer.join()

    assert said["polls"] == 3
    assert said["directory"] == str(policy_dir)
    assert "no change is loaded until two reads in a row agree" in said["detail"]
    assert limit(db) == FREE_RPM
    assert daemon.metric("governor_policy_version_info", version=version) == 1
