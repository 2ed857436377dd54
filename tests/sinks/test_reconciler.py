"""A reconcile tick on real Redis: changes journalled, drift once, dry run writes nothing."""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from typing import Any

import redis
from structlog.testing import capture_logs

from controller.control.reconciler import Reconciler
from controller.journal.writer import Journal
from controller.model import Address, Decision, Proposal, SignalReading, Source
from controller.sinks.redis import RedisSink

A = Address.parse
GPU = SignalReading("gpu_util", 0.95, 1_700_000_000.0)
FREE_RPM = A("plan/free/requests_per_minute")


def decisions(free_rpm: float) -> dict[Address, Decision]:
    proposal = Proposal(FREE_RPM, 5.0, "ThrottlePolicy/gpu-saturation", "gpu_util > 0.9", (GPU,))
    policy = free_rpm != 10.0
    return {
        A("global/requests_per_second"): Decision(
            A("global/requests_per_second"), 2000.0, Source.BASELINE, None, "Limits/global"
        ),
        FREE_RPM: Decision(
            FREE_RPM,
            free_rpm,
            Source.POLICY if policy else Source.BASELINE,
            "ThrottlePolicy/gpu-saturation" if policy else None,
            "gpu_util > 0.9 for 2m" if policy else "Plan/free",
            signals=(GPU,) if policy else (),
            proposals=(proposal,) if policy else (),
            baseline=10.0,
        ),
    }


def changed(logs: list[MutableMapping[str, Any]]) -> list[tuple[object, object, object]]:
    return [(e["address"], e["old"], e["new"]) for e in logs if e["event"] == "limit.changed"]


def test_a_tick_applies_journals_and_records_decisions(
    sink: RedisSink, journal: Journal, db: redis.Redis[str]
) -> None:
    reconciler = Reconciler(sink, journal, runbook_base_url="https://git.example/gov/")
    runbooks = {"ThrottlePolicy/gpu-saturation": "runbooks/GovernorGpuSaturation.md"}
    with capture_logs() as logs:
        first = reconciler.tick(decisions(10.0), tick=1, policy_version="v1")
        second = reconciler.tick(decisions(5.0), tick=2, policy_version="v2", runbooks=runbooks)
        third = reconciler.tick(decisions(5.0), tick=3, policy_version="v2", runbooks=runbooks)
    assert changed(logs) == [
        ("global/requests_per_second", None, 2000.0),
        ("plan/free/requests_per_minute", None, 10.0),
        ("plan/free/requests_per_minute", 10.0, 5.0),
    ]
    event = [e for e in logs if e["event"] == "limit.changed"][-1]
    assert event["tick"] == 2
    assert event["policy"] == "ThrottlePolicy/gpu-saturation"
    assert event["policy_version"] == "v2"
    assert event["signals"] == [
        {"name": "gpu_util", "value": 0.95, "timestamp": 1_700_000_000.0, "validity": "ok"}
    ]
    assert event["runbook"] == "https://git.example/gov/runbooks/GovernorGpuSaturation.md"
    assert event["actor"] == "controller"
    assert event["dry_run"] is False
    assert [r.result.version if r.result else None for r in (first, second, third)] == [1, 2, 2]
    assert third.changes == ()
    record = json.loads(db.hget("governor:decisions", "plan/free/requests_per_minute") or "")
    assert record["source"] == "policy"
    assert record["tick"] == 2  # tick 3 decided the same: the record was not rewritten
    assert record["proposals"][0]["signals"][0]["name"] == "gpu_util"
    assert db.xlen("governor:journal") == 3


def test_dry_run_journals_but_writes_no_limit(
    sink: RedisSink, journal: Journal, db: redis.Redis[str]
) -> None:
    with capture_logs() as logs:
        report = Reconciler(sink, journal).tick(
            decisions(5.0), tick=1, policy_version="v1", dry_run=True
        )
    assert report.result is None
    assert len(report.changes) == 2
    assert all(e["dry_run"] for e in logs if e["event"] == "limit.changed")
    assert db.keys("governor:limits*") == []
    assert db.get("governor:version") is None


def test_drift_is_journalled_once_and_corrected(
    sink: RedisSink, journal: Journal, db: redis.Redis[str]
) -> None:
    reconciler = Reconciler(sink, journal)
    reconciler.tick(decisions(10.0), tick=1, policy_version="v1")
    db.hset("governor:limits:plan:free", "requests_per_minute", "77")
    with capture_logs() as logs:
        reconciler.tick(decisions(10.0), tick=2, policy_version="v1")
        reconciler.tick(decisions(10.0), tick=3, policy_version="v1")
    drift = [e for e in logs if e["event"] == "limit.drift"]
    assert [(e["address"], e["old"], e["new"], e["tick"]) for e in drift] == [
        ("plan/free/requests_per_minute", 10.0, 77.0, 2)
    ]
    assert changed(logs) == [("plan/free/requests_per_minute", 77.0, 10.0)]
    assert db.hget("governor:limits:plan:free", "requests_per_minute") == "10"


def test_a_foreign_entry_is_warned_of_once_while_it_stays(
    sink: RedisSink, journal: Journal, db: redis.Redis[str]
) -> None:
    """It was warned of every tick (every 5 s, for good): a field an older version spelled
    otherwise (`limit@GPT-4`, before models were kept in lower case) or a hand-made one."""
    reconciler = Reconciler(sink, journal)
    reconciler.tick(decisions(10.0), tick=1, policy_version="v1")
    db.hset("governor:limits:plan:free", "tokens_per_minute@GPT-4", "9")
    with capture_logs() as logs:
        for tick in (2, 3, 4):
            reconciler.tick(decisions(10.0), tick=tick, policy_version="v1")
        db.hdel("governor:limits:plan:free", "tokens_per_minute@GPT-4")
        reconciler.tick(decisions(10.0), tick=5, policy_version="v1")
        db.hset("governor:limits:plan:free", "tokens_per_minute@GPT-4", "9")  # back again
        reconciler.tick(decisions(10.0), tick=6, policy_version="v1")
    warned = [(e["entry"], e["tick"]) for e in logs if e["event"] == "limit.foreign_entry"]
    entry = "governor:limits:plan:free tokens_per_minute@GPT-4"
    assert warned == [(entry, 2), (entry, 6)]


def test_an_address_that_leaves_the_desired_state_is_deleted(
    sink: RedisSink, journal: Journal, db: redis.Redis[str]
) -> None:
    reconciler = Reconciler(sink, journal)
    reconciler.tick(decisions(10.0), tick=1, policy_version="v1")
    only_global = {a: d for a, d in decisions(10.0).items() if a != FREE_RPM}
    with capture_logs() as logs:
        reconciler.tick(only_global, tick=2, policy_version="v1")
    assert changed(logs) == [("plan/free/requests_per_minute", 10.0, None)]
    assert db.exists("governor:limits:plan:free") == 0
    assert db.hkeys("governor:decisions") == ["global/requests_per_second"]


def test_decision_records_follow_the_desired_addresses(
    sink: RedisSink, db: redis.Redis[str]
) -> None:
    wanted = decisions(5.0)
    db.hset("governor:decisions", "tenant/gone/tokens_per_minute", "{}")  # an earlier run's
    assert sink.record_decisions(wanted, 1) == 3  # both written, the stale one removed
    assert sorted(db.hkeys("governor:decisions")) == sorted(str(a) for a in wanted)
    assert sink.record_decisions(wanted, 2) == 0  # nothing changed: nothing written
    del wanted[FREE_RPM]
    assert sink.record_decisions(wanted, 3) == 1
    assert db.hkeys("governor:decisions") == ["global/requests_per_second"]
    assert sink.record_decisions(decisions(10.0), 4) == 1  # back, decided anew
    record = json.loads(db.hget("governor:decisions", str(FREE_RPM)) or "")
    assert (record["tick"], record["value"]) == (4, 10.0)
