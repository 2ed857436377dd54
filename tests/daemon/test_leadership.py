"""Leader election end to end: two daemons on one Redis, exactly one writes; a killed leader is
replaced once its lease runs out, a stopped one (SIGTERM) hands over at once; and a deposed
leader's late write is refused by the fence (in-process: the race cannot be timed from
outside)."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from controller.changes import Change
from controller.clients.redis import connect
from controller.contract.fence import FencedError
from controller.contract.keys import KeySchema
from controller.control.leader import RedisLeaderLock
from controller.model import Address
from controller.settings import RedisSettings
from controller.sinks.redis import RedisSink
from tests.daemon.harness import (
    ADDRESS,
    FREE_RPM,
    LEASE_SECONDS,
    LOCK_KEY,
    TICK_SECONDS,
    Daemon,
    DaemonFactory,
    Gpu,
    limit,
    stream,
)
from tests.support.prometheus import wait_for
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

TIGHT = FREE_RPM * 0.5
POLICY_LOOSEN_SECONDS = 8.0
STAMPING = 0.1  # an event is stamped some milliseconds into its tick


def _logged_at(line: dict[str, object]) -> float:
    return dt.datetime.fromisoformat(str(line["timestamp"])).timestamp()


def _pair(
    db: redis.Redis[str], daemons: DaemonFactory, env: dict[str, str]
) -> tuple[Daemon, Daemon]:
    """Start replicas `a` and `b`; return (leader, follower) once exactly one leads and the
    baseline is written."""
    a = daemons("a", {**env, "GOVERNOR_LEADER__IDENTITY": "a"})
    b = daemons("b", {**env, "GOVERNOR_LEADER__IDENTITY": "b"})

    def settled() -> bool:
        roles = [a.metric("governor_leader"), b.metric("governor_leader")]
        return None not in roles and sorted(roles) == [0.0, 1.0]  # type: ignore[type-var]

    wait_for(lambda: settled() and a.running() and b.running(), "exactly one replica leads")
    wait_for(lambda: limit(db) == FREE_RPM, "the baseline is written")
    return (a, b) if a.metric("governor_leader") == 1 else (b, a)


def _ids(daemon: Daemon) -> set[str]:
    return {e["event_id"] for e in daemon.journalled()}


def test_two_daemons_one_writer_and_a_killed_leader_is_replaced_within_the_lease(
    db: redis.Redis[str], gpu: Gpu, ready_env: dict[str, str], daemons: DaemonFactory
) -> None:
    leader, follower = _pair(db, daemons, ready_env)
    assert str(db.get(LOCK_KEY)).startswith(f"{leader.env['GOVERNOR_LEADER__IDENTITY']}#")

    gpu.set(0.95)
    wait_for(lambda: limit(db) == TIGHT, "the hot GPU halves the free tier")
    # Both evaluate (the follower saw the policy engage too), only the leader writes.
    wait_for(lambda: bool(follower.logged("policy.transition")), "the follower sees it")
    assert not follower.journalled()
    assert not follower.logged("limit.changed")
    assert follower.metric("governor_limit_changes_total", scope="plan", direction="tighten") == 0.0
    leader.wait_for_metric("governor_limit_changes_total", 1.0, scope="plan", direction="tighten")
    assert {e["event_id"] for e in stream(db)} <= _ids(leader)

    assert leader.kill() == -9
    killed_at = time.time()
    remaining = db.pttl(LOCK_KEY) / 1000
    assert 0 < remaining <= LEASE_SECONDS
    follower.wait_for_metric("governor_leader", 1.0, timeout=LEASE_SECONDS + 10)
    acquired = _logged_at(follower.logged("leader.acquired")[-1])
    assert acquired >= killed_at + remaining - 0.01  # not before the dead leader's lease ran out
    # ... but right after: the lease, the follower's next tick, and a tick of slack.
    assert acquired - killed_at <= LEASE_SECONDS + 3 * TICK_SECONDS
    assert follower.logged("leader.acquired")[-1]["fence"] == db.get(LOCK_KEY)
    assert str(db.get(LOCK_KEY)).startswith(f"{follower.env['GOVERNOR_LEADER__IDENTITY']}#")

    gpu.set(0.5)  # the new leader writes: release, then the baseline after stabilization
    wait_for(lambda: limit(db) == FREE_RPM, "the new leader restores the baseline", 20)
    # A tick's journal events reach the stream when it ends, just after its writes.
    wait_for(
        lambda: any(e["kind"] == "limit.changed" and e["at"] > killed_at for e in stream(db)),
        "the change is journalled",
    )
    journal = stream(db)
    mine, theirs = _ids(follower), _ids(leader)
    assert all((e["event_id"] in mine) != (e["event_id"] in theirs) for e in journal)
    after = [e for e in journal if e["at"] > killed_at]
    assert {e["kind"] for e in after} == {"policy.transition", "limit.changed"}
    assert all(e["event_id"] in mine for e in after)


def test_sigterm_exits_0_flushes_the_journal_and_hands_over_at_once(
    db: redis.Redis[str], ready_env: dict[str, str], daemons: DaemonFactory
) -> None:
    lease = 30.0  # long: a hand-over "at once" cannot be mistaken for a lease running out
    env = {**ready_env, "GOVERNOR_LEADER__LEASE_SECONDS": f"{lease:g}"}
    leader, follower = _pair(db, daemons, env)
    token = db.get(LOCK_KEY)

    stopped_at = time.time()
    assert leader.terminate() == 0
    assert db.get(LOCK_KEY) != token  # released, not left to expire
    assert leader.logged("governor.stopped")
    assert _ids(leader) <= {e["event_id"] for e in stream(db)}  # all of it reached the stream

    follower.wait_for_metric("governor_leader", 1.0)
    acquired = _logged_at(follower.logged("leader.acquired")[-1])
    assert acquired - stopped_at < lease / 2
    assert follower.terminate() == 0
    assert db.get(LOCK_KEY) is None


def test_a_deposed_leaders_late_write_is_refused(redis_server: RedisServer) -> None:
    keys = KeySchema("governor")
    address = Address.parse(ADDRESS)
    with connect(redis_server.url, RedisSettings(), retries=0) as client:
        old = RedisLeaderLock(client, keys.prefix, "old", lease_seconds=0.2)
        new = RedisLeaderLock(client, keys.prefix, "new", lease_seconds=30)
        assert old.ensure()
        sink = RedisSink(client, keys)
        sink.fence = old.fence  # as the daemon wires it
        sink.apply([Change(address, None, 10.0)])
        version = sink.version()

        # The old leader stalls (GC pause, network partition) past its lease; another takes over.
        wait_for(new.ensure, "the new replica takes the expired lock", timeout=10)
        with pytest.raises(FencedError, match="no longer holds the leader lock"):
            sink.apply([Change(address, 10.0, 1.0)])
        assert sink.stored(address) == 10.0
        assert sink.version() == version
        assert client.hget(keys.written, ADDRESS) == "10"

        # On its next tick the old leader learns it lost: no fence, no write attempt.
        assert not old.ensure()
        assert old.fence() is None
        sink.fence = new.fence
        sink.apply([Change(address, 10.0, 1.0)])
        assert sink.stored(address) == 1.0


def test_a_leader_that_loses_and_wins_back_the_lock_keeps_its_policies_behaviour(
    db: redis.Redis[str],
    gpu: Gpu,
    policy_dir: Path,
    ready_env: dict[str, str],
    daemons: DaemonFactory,
) -> None:
    # Limits make every limit wait 120 s before loosening; the policy's own behaviour 8 s.
    limits = policy_dir / "limits.yaml"
    limits.write_text(limits.read_text().replace("stabilization: 4s", "stabilization: 120s"))
    with (policy_dir / "gpu-hot.yaml").open("a") as policy:
        policy.write(f"  behavior: {{loosen: {{stabilization: {POLICY_LOOSEN_SECONDS:g}s}}}}\n")
    daemon = daemons("a", ready_env)
    wait_for(lambda: limit(db) == FREE_RPM, "the baseline is written")
    gpu.set(0.95)
    wait_for(lambda: limit(db) == TIGHT, "the hot GPU halves the free tier")
    gpu.set(0.5)
    wait_for(lambda: bool(_released(db)), "the policy is released: the loosening window opens")
    released_at = _released(db)[0]["at"]

    # Within the window another replica takes the lock (as after a pause past the lease),
    # then gives it back: the window must go on at the policy's pace.
    db.set(LOCK_KEY, "intruder#999", px=60_000)
    daemon.wait_for_metric("governor_leader", 0.0)
    db.delete(LOCK_KEY)
    daemon.wait_for_metric("governor_leader", 1.0)
    assert len(daemon.logged("leader.acquired")) == 2
    assert time.time() < released_at + POLICY_LOOSEN_SECONDS  # regained within the window
    assert limit(db) == TIGHT

    wait_for(lambda: limit(db) == FREE_RPM, "the free tier loosens at the policy's pace", 30)
    wait_for(
        lambda: any(e["kind"] == "limit.changed" and e["new"] == FREE_RPM for e in stream(db)),
        "the change is journalled",
    )
    [restored] = [e for e in stream(db) if e["kind"] == "limit.changed" and e["at"] > released_at]
    assert (restored["old"], restored["new"]) == (TIGHT, FREE_RPM)
    # The policy's 8 s window, not the Limits' 120 s one, and not restarted at the regain.
    assert restored["at"] - released_at >= POLICY_LOOSEN_SECONDS - TICK_SECONDS - STAMPING
    assert restored["at"] - released_at < 60


def _released(db: redis.Redis[str]) -> list[dict[str, Any]]:
    return [
        e
        for e in stream(db)
        if e["kind"] == "policy.transition" and e["details"]["event"] == "released"
    ]


def test_a_dry_run_beside_the_leader_never_takes_the_lock(
    db: redis.Redis[str], gpu: Gpu, ready_env: dict[str, str], daemons: DaemonFactory
) -> None:
    """A `governor run --dry-run` pointed at production must not contend for leadership: it
    writes nothing, so winning the lock would leave nobody writing limits."""
    leader = daemons("leader", {**ready_env, "GOVERNOR_LEADER__IDENTITY": "leader"})
    wait_for(lambda: limit(db) == FREE_RPM, "the leader writes the baseline")
    token = db.get(LOCK_KEY)
    assert str(token).startswith("leader#")
    trial = daemons("trial", {**ready_env, "GOVERNOR_LEADER__IDENTITY": "trial"}, "--dry-run")
    trial.wait_for_metric("governor_leader", 1.0)  # it evaluates as if it led ...

    assert leader.kill() == -9  # ... and when the lock is free for the taking,
    wait_for(lambda: db.get(LOCK_KEY) is None, "the dead leader's lease runs out", 20)
    time.sleep(3 * TICK_SECONDS)
    assert db.get(LOCK_KEY) is None  # the dry run still does not take it
    assert trial.running()
    assert not trial.logged("leader.acquired")
    gpu.set(0.95)
    trial.wait_for_log("policy.transition")
    assert limit(db) == FREE_RPM  # and it wrote nothing
