"""The Redis sink never holds Redis with one long command (#18): what Redis itself ran, from
its SLOWLOG (threshold 0: every command, with its arguments), is bounded per command, and
the chunked read-back, apply and decision records still do exactly what they did whole."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from controller.changes import diff
from controller.clients.paging import (
    CHANGES_PER_TRANSACTION,
    FIELDS_PER_READ,
    FIELDS_PER_WRITE,
    KEYS_PER_READ,
    SCAN_COUNT,
)
from controller.contract.fence import Fence
from controller.control.overrides import ControlStore
from controller.control.reconciler import Reconciler
from controller.journal.writer import Journal
from controller.model import Address, Decision, Source
from controller.sinks import PartialApplyError
from controller.sinks.redis import RedisSink
from tests.support.slowlog import Command, ran, watch

A = Address.parse
TENANTS = 1500  # one limit each: several ledger pages and read batches
WIDE = 300  # tenants with 6 model limits each: hashes of several fields, kept whole
MODELS = [f"m{j}" for j in range(6)]
BIG_MODELS = FIELDS_PER_READ + 100  # one tenant's hash too big for any read call: scanned
Fields = Mapping[str | bytes, str | bytes | float | int]  # what redis-py's HSET takes


def desired() -> dict[Address, float]:
    limits = {A("global/requests_per_second"): 2000.0, A("plan/free/requests_per_minute"): 60.0}
    limits.update({A(f"tenant/t{i}/tokens_per_minute"): 1000.0 + i for i in range(TENANTS)})
    for i in range(WIDE):
        for model in MODELS:
            limits[A(f"tenant/w{i}/requests_per_minute@{model}")] = 10.0 + i % 7
    for j in range(BIG_MODELS):
        limits[A(f"tenant/big/tokens_per_day@b{j}")] = 5.5 + j
    return limits


def split(commands: list[Command], name: str) -> list[list[Command]]:
    """`commands` cut before each command called `name`."""
    parts: list[list[Command]] = [[]]
    for command in commands:
        if command.name == name:
            parts.append([])
        parts[-1].append(command)
    return parts


def edited(db: redis.Redis[str]) -> dict[Address, float]:
    """Hand edits across the range (drift, a non-number, a deletion, foreign fields); what
    a gateway now finds."""
    actual = desired()
    db.hset("governor:{t:t10}:limits", "tokens_per_minute", "7")
    actual[A("tenant/t10/tokens_per_minute")] = 7.0
    db.hset("governor:{t:t1400}:limits", "tokens_per_minute", "8.25")
    actual[A("tenant/t1400/tokens_per_minute")] = 8.25
    db.hset("governor:{t:t700}:limits", "tokens_per_minute", "oops")
    actual[A("tenant/t700/tokens_per_minute")] = math.nan
    db.hdel("governor:{t:t1200}:limits", "tokens_per_minute")
    del actual[A("tenant/t1200/tokens_per_minute")]
    db.hset("governor:{t:w299}:limits", "requests_per_minute@m3", "1")
    actual[A("tenant/w299/requests_per_minute@m3")] = 1.0
    db.hset("governor:{t:big}:limits", "tokens_per_day@b3", "4")
    actual[A("tenant/big/tokens_per_day@b3")] = 4.0
    db.hset("governor:{t:t900}:limits", "bogus", "1")
    db.hset("governor:{t:big}:limits", "not a limit", "2")
    return actual


def same(got: dict[Address, float], expected: dict[Address, float]) -> bool:
    return got.keys() == expected.keys() and all(
        got[a] == v or (math.isnan(got[a]) and math.isnan(v)) for a, v in expected.items()
    )


@pytest.fixture
def filled(sink: RedisSink, db: redis.Redis[str]) -> dict[Address, float]:
    """The desired limits applied (in chunks), then edited by hand: what gateways see."""
    result = sink.apply(diff(desired(), sink.read()))
    assert result.verified
    assert result.version == 1
    return edited(db)


def test_the_read_back_is_exact_across_chunk_boundaries(
    sink: RedisSink, filled: dict[Address, float]
) -> None:
    state = sink.read()
    assert same(dict(state.actual), filled)
    assert dict(state.written) == desired()
    assert state.version == 1
    assert sorted(state.foreign) == [
        "governor:{t:big}:limits not a limit",
        "governor:{t:t900}:limits bogus",
    ]
    assert {d.address for d in state.drift} == {
        A("tenant/t10/tokens_per_minute"),
        A("tenant/t1400/tokens_per_minute"),
        A("tenant/t700/tokens_per_minute"),
        A("tenant/t1200/tokens_per_minute"),
        A("tenant/w299/requests_per_minute@m3"),
        A("tenant/big/tokens_per_day@b3"),
    }


def test_no_read_back_command_goes_over_its_bound(
    sink: RedisSink, db: redis.Redis[str], filled: dict[Address, float]
) -> None:
    watch(db)
    sink.read()
    commands = ran(db)
    names = {c.name for c in commands}
    assert names <= {"GET", "MGET", "HSCAN", "EVAL", "HLEN", "HGETALL"}, names
    # The version and the key contract, in one round trip.
    assert [c.args[1:] for c in commands if c.name == "MGET"] == [
        ("governor:version", "governor:contract")
    ]
    scans = [c for c in commands if c.name == "HSCAN"]
    assert all(int(c.args[-1]) <= SCAN_COUNT for c in scans)
    # The ledger (over 4000 fields) in pages; the big hash walked, never read whole.
    assert {c.args[1] for c in scans} == {"governor:written", "governor:{t:big}:limits"}
    assert len([c for c in scans if c.args[1] == "governor:written"]) > 4
    reads = [c for c in commands if c.name == "EVAL"]
    # EVAL script numkeys key... budget
    assert reads
    assert all(c.argc == 4 + int(c.args[2]) <= 4 + KEYS_PER_READ for c in reads)
    whole = [c.args[1] for c in commands if c.name == "HGETALL"]
    assert "governor:{t:big}:limits" not in whole
    assert "governor:written" not in whole
    # Each hash the ledger names read once (global, plan, tenants; the big one scanned).
    assert len(whole) == len(set(whole)) == 2 + TENANTS + WIDE


def test_an_apply_is_cut_into_bounded_transactions_with_one_version_bump(
    sink: RedisSink, db: redis.Redis[str], filled: dict[Address, float]
) -> None:
    halved = {a: v / 2 for a, v in desired().items()}
    changes = diff(halved, sink.read())
    watch(db)
    result = sink.apply(changes)
    commands = ran(db)
    assert result.verified
    assert result.version == 2
    # SLOWLOG leaves EXEC out but logs each command it runs, after its MULTI.
    transactions = split(commands, "MULTI")[1:]
    assert len(transactions) >= math.ceil(len(changes) / CHANGES_PER_TRANSACTION)
    for commands_of_one in transactions:
        writes = [c for c in commands_of_one if c.name in ("HSET", "HDEL")]
        limits = sum(c.argc - 2 for c in writes if c.args[1] != "governor:written")
        ledger = sum(c.argc - 2 for c in writes if c.args[1] == "governor:written")
        assert limits == ledger <= 2 * CHANGES_PER_TRANSACTION  # HSET: field and value each
    bumps = [i for i, t in enumerate(transactions) if any(c.name == "INCR" for c in t)]
    assert bumps == [len(transactions) - 1]  # the version moves with the last one only
    # Each transaction read back by one call of the verify script.
    verifies = [c for c in commands if c.name == "EVALSHA"]
    assert len(verifies) == len(transactions)
    assert all(int(c.args[2]) <= CHANGES_PER_TRANSACTION for c in verifies)
    assert [c.name for c in commands].count("PUBLISH") == 1
    assert same(dict(sink.read().actual), halved)


def decided(limits: dict[Address, float]) -> dict[Address, Decision]:
    return {
        a: Decision(a, v, Source.BASELINE, None, "Limits/global", (), (), v, ())
        for a, v in limits.items()
    }


def fence_lost_after(db: redis.Redis[str], transactions: int) -> Callable[[], Fence]:
    """A leader fence that another replica takes over once `transactions` were fenced."""
    calls = iter(range(1_000_000))
    db.set("governor:leader", "me")

    def fence() -> Fence:
        if next(calls) == transactions:
            db.set("governor:leader", "other")
        return Fence("governor:leader", "me")

    return fence


def changed(logs: list[MutableMapping[str, Any]]) -> list[object]:
    return [e["address"] for e in logs if e["event"] == "limit.changed"]


def test_an_apply_stopped_part_way_leaves_no_drift_and_the_old_version(
    sink: RedisSink, db: redis.Redis[str], journal: Journal
) -> None:
    limits = {a: v for a, v in desired().items() if "big" not in str(a)}
    reconciler = Reconciler(sink, journal)
    sink.fence = fence_lost_after(db, 2)
    with capture_logs() as logs, pytest.raises(PartialApplyError) as stopped:
        reconciler.tick(decided(limits), tick=1, policy_version="v1")
    landed = {c.address for c in stopped.value.applied}
    assert len(landed) == 2 * CHANGES_PER_TRANSACTION
    assert "leader lock" in str(stopped.value)
    assert "next tick writes the rest" in str(stopped.value)
    # What landed is journalled (the next diff will not show it), with its ledger entries.
    assert sorted(map(str, changed(logs))) == sorted(map(str, landed))
    state = sink.read()
    assert state.version == 0
    assert not state.drift
    assert dict(state.actual) == dict(state.written) == {a: limits[a] for a in landed}
    # Leadership back: the next tick writes the rest only, and bumps the version once.
    sink.fence = fence_lost_after(db, -1)
    with capture_logs() as logs:
        report = reconciler.tick(decided(limits), tick=2, policy_version="v1")
    assert {c.address for c in report.changes} == limits.keys() - landed
    assert len(changed(logs)) == len(limits) - len(landed)
    assert report.result is not None
    assert report.result.version == 1
    assert dict(sink.read().actual) == limits


def test_decision_records_are_written_and_pruned_in_bounded_commands(
    sink: RedisSink, db: redis.Redis[str]
) -> None:
    limits = {a: v for a, v in desired().items() if "big" not in str(a)}
    stale: Fields = {f"tenant/gone{i}/tokens_per_minute": "{}" for i in range(3 * SCAN_COUNT)}
    db.hset("governor:decisions", mapping=stale)
    watch(db)
    written = sink.record_decisions(decided(limits), tick=1)
    commands = ran(db)
    assert written == len(limits) + len(stale)
    assert set(db.hkeys("governor:decisions")) == {str(a) for a in limits}
    names = {c.name for c in commands}
    assert names <= {"EVAL", "HSCAN", "HSET", "HDEL"}, names
    assert all(int(c.args[-1]) <= SCAN_COUNT for c in commands if c.name == "HSCAN")
    edits = [c for c in commands if c.name in ("HSET", "HDEL")]
    assert max(c.argc for c in edits) <= 2 + 2 * FIELDS_PER_WRITE
    assert sum(c.argc - 2 for c in edits if c.name == "HDEL") == len(stale)


def test_a_hash_of_any_size_is_read_whole(sink: RedisSink, db: redis.Redis[str]) -> None:
    """The read script answers a hash over its budget with the size; it is scanned instead."""
    many: Fields = {f"tokens_per_day@x{j}": str(j) for j in range(3 * FIELDS_PER_READ)}
    db.hset("governor:{t:huge}:limits", mapping=many)
    db.hset("governor:written", "tenant/huge/tokens_per_day@x0", "0")
    state = sink.read()
    assert len(state.actual) == len(many)
    assert state.actual[A("tenant/huge/tokens_per_day@x77")] == 77.0


def test_a_read_call_stops_at_its_field_budget_and_the_rest_follow(
    sink: RedisSink, db: redis.Redis[str]
) -> None:
    tenants, width = 600, 10  # one ledger entry each, but 10 limits in each hash
    for i in range(tenants):
        fields: Fields = {f"tokens_per_day@x{j}": str(j) for j in range(width)}
        db.hset(f"governor:{{t:u{i}}}:limits", mapping=fields)
        db.hset("governor:written", f"tenant/u{i}/tokens_per_day@x0", "0")
    watch(db)
    state = sink.read()
    commands = ran(db)
    assert len(state.actual) == tenants * width
    whole = [c.args[1] for c in commands if c.name == "HGETALL"]
    assert len(whole) == len(set(whole)) == tenants
    reads = [c for c in commands if c.name == "EVAL"]
    assert len(reads) >= tenants * width / FIELDS_PER_READ


def test_the_control_read_walks_a_large_tenant_registry_in_pages(
    control: ControlStore, db: redis.Redis[str]
) -> None:
    registry: Fields = {f"t{i}": ("pro" if i % 3 else "free") for i in range(3 * SCAN_COUNT)}
    db.hset("governor:tenants", mapping=registry)
    watch(db)
    state = control.read()
    commands = ran(db)
    assert dict(state.tenants) == registry
    scans = [c for c in commands if c.name == "HSCAN"]
    assert len([c for c in scans if c.args[1] == "governor:tenants"]) > 2
    assert all(int(c.args[-1]) <= SCAN_COUNT for c in scans)
    assert not [c for c in commands if c.name in ("HGETALL", "HKEYS", "HVALS")]
