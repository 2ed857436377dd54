"""The journal: structlog events, a capped stream, no loss across a Redis restart, loud overflow."""

from __future__ import annotations

import io
import json
from pathlib import Path

import redis
import structlog
from structlog.testing import capture_logs
from typer.testing import CliRunner

from controller.cli import app
from controller.clients.redis import connect
from controller.contract.keys import KeySchema
from controller.control.leader import RedisLeaderLock
from controller.journal.events import JournalEvent, Kind
from controller.journal.reader import read_events
from controller.journal.writer import EVENTS_PER_APPEND, Journal
from controller.logging import MASK, configure_logging
from controller.settings import JournalSettings, RedisSettings
from tests.support.prometheus import wait_for
from tests.support.redis import RedisServer
from tests.support.slowlog import ran, watch

KEYS = KeySchema("governor")


def event(n: int, address: str = "global/requests_per_second") -> JournalEvent:
    return JournalEvent(
        kind=Kind.LIMIT_CHANGED,
        actor="controller",
        reason=f"change {n}",
        address=address,
        old=float(n),
        new=float(n + 1),
        tick=n,
        policy="ThrottlePolicy/gpu-saturation",
        policy_version="sha256:abc",
        signals=({"name": "gpu_util", "value": 0.95, "timestamp": 1700000000.0},),
        runbook="https://example.org/runbooks/GovernorGpuSaturation.md",
    )


def stream_reasons(client: redis.Redis[str]) -> list[str]:
    return [json.loads(f["data"])["reason"] for _, f in client.xrange("governor:journal")]


def test_each_event_is_logged_and_stored(journal: Journal, db: redis.Redis[str]) -> None:
    with capture_logs() as logs:
        journal.emit(event(1))
    assert logs == [
        {
            "event": "limit.changed",
            "log_level": "info",
            **{k: v for k, v in event(1).to_dict().items() if k not in ("kind", "at", "event_id")},
            "at": logs[0]["at"],
            "event_id": logs[0]["event_id"],
        }
    ]
    (entry,) = read_events(db, KEYS, count=5)
    assert entry.event.reason == "change 1"
    assert entry.event.signals[0]["value"] == 0.95
    assert entry.event.event_id == logs[0]["event_id"]


def test_tail_filters_by_address_prefix_and_count(journal: Journal, db: redis.Redis[str]) -> None:
    for n in range(30):
        journal.emit(event(n, "tenant/acme/tokens_per_minute" if n % 3 == 0 else "global/x"))
    found = read_events(db, KEYS, count=4, address="tenant/acme")
    assert [e.event.tick for e in found] == [18, 21, 24, 27]
    assert len(read_events(db, KEYS, count=100)) == 30


def test_the_stream_is_capped(redis_server: RedisServer, db: redis.Redis[str]) -> None:
    client = connect(redis_server.url, RedisSettings(), retries=0)
    small = Journal(client, KEYS, JournalSettings(stream_max_length=100, buffer_max_events=10))
    with capture_logs():
        for n in range(1000):
            small.emit(event(n))
    assert 100 <= db.xlen("governor:journal") < 1000


def test_no_event_is_lost_across_a_redis_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r", persistent=True).start()
    client = connect(server.url, RedisSettings(), retries=0)
    journal = Journal(client, KEYS, JournalSettings(buffer_max_events=1000))
    emitted = 0
    with capture_logs() as logs:
        for _ in range(10):
            journal.emit(event(emitted))
            emitted += 1
        server.stop()
        for _ in range(25):  # Redis is down: they wait in the buffer
            journal.emit(event(emitted))
            emitted += 1
        assert journal.pending == 25
        server.start()  # same port, same data directory
        assert journal.flush()
        for _ in range(5):
            journal.emit(event(emitted))
            emitted += 1
    assert journal.pending == 0
    assert journal.dropped == 0
    assert stream_reasons(server.client()) == [f"change {n}" for n in range(emitted)]
    assert any(log["event"] == "journal.redis_unavailable" for log in logs)
    server.stop()


def test_buffer_overflow_is_counted_logged_and_marked_in_the_stream(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "o").start()
    journal = Journal(
        connect(server.url, RedisSettings(), retries=0),
        KEYS,
        JournalSettings(buffer_max_events=5),
    )
    server.stop()
    with capture_logs() as logs:
        for n in range(8):
            journal.emit(event(n))
    assert journal.dropped == 3
    assert journal.pending == 5
    overflow = [log for log in logs if log["event"] == "journal.buffer_overflow"]
    assert [log["dropped_total"] for log in overflow] == [1, 2, 3]
    assert [log["log_level"] for log in overflow] == ["error"] * 3
    server.start()
    with capture_logs():
        assert journal.flush()
    stored = [json.loads(f["data"]) for _, f in server.client().xrange("governor:journal")]
    assert stored[0]["kind"] == "journal.gap"
    assert stored[0]["details"] == {"dropped": 3}
    assert [e["reason"] for e in stored[1:]] == [f"change {n}" for n in range(3, 8)]
    server.stop()


def test_secrets_are_masked_in_log_lines() -> None:
    from pydantic import SecretStr

    out = io.StringIO()
    configure_logging("info", out)
    try:
        structlog.get_logger().info(
            "connecting",
            url="redis://:hunter2@10.0.0.1:6379/0",
            password="hunter2",
            settings={"bearer_token": "hunter2", "nested": ["rediss://u:hunter2@h/1"]},
            secret=SecretStr("hunter2"),
            error=ValueError("failed for redis://bob:hunter2@h:1"),
            token_url="https://hunter2@prom.example/api",  # a token written as the user
            lone=ValueError("redis://hunter2@10.0.0.2:6379 refused"),
            slash=ValueError("redis://:hun/ter2@10.0.0.3:6379 refused"),  # a base64 password
        )
    finally:
        structlog.reset_defaults()
    line = json.loads(out.getvalue())
    assert "hunter2" not in out.getvalue()
    assert line["url"] == f"redis://:{MASK}@10.0.0.1:6379/0"
    assert line["settings"]["nested"] == [f"rediss://u:{MASK}@h/1"]
    assert line["password"] == MASK
    assert line["lone"] == f"redis://{MASK}@10.0.0.2:6379 refused"
    assert line["slash"] == f"redis://:{MASK}@10.0.0.3:6379 refused"


def test_an_event_the_stream_cannot_hold_is_dropped_and_never_wedges_the_journal(
    journal: Journal, db: redis.Redis[str], keys: KeySchema
) -> None:
    bad = JournalEvent(kind="limit.changed", actor="controller", reason="x", old=float("nan"))
    with capture_logs() as logs:
        journal.emit(bad)
        journal.emit(JournalEvent(kind="limit.changed", actor="controller", reason="fine"))
    assert journal.flush()
    assert [fields["kind"] for _, fields in db.xrange(keys.journal)] == ["limit.changed"]
    assert journal.dropped == 1
    assert any(entry["event"] == "journal.unencodable" for entry in logs)


def test_a_batch_reaches_the_stream_whole_and_in_order_when_it_ends(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    client = connect(redis_server.url, RedisSettings(), retries=0)
    journal = Journal(client, KEYS, JournalSettings(buffer_max_events=10))
    db.delete("governor:journal")
    with capture_logs(), journal.batch():
        for n in range(5):
            journal.emit(event(n))
        assert db.xlen("governor:journal") == 0  # held until the batch ends
        assert journal.pending == 5
        # More events than the buffer holds: sent early rather than dropped.
        for n in range(5, 25):
            journal.emit(event(n))
    assert (journal.pending, journal.dropped) == (0, 0)
    assert stream_reasons(db) == [f"change {n}" for n in range(25)]


def test_a_batch_while_redis_is_down_stays_buffered_until_it_returns(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "b", persistent=True).start()
    journal = Journal(connect(server.url, RedisSettings(), retries=0), KEYS, JournalSettings())
    server.stop()
    with capture_logs():
        with journal.batch():
            for n in range(3):
                journal.emit(event(n))
        assert journal.pending == 3
        server.start()
        with journal.batch():
            journal.emit(event(3))
    assert (journal.pending, journal.dropped) == (0, 0)
    assert stream_reasons(server.client()) == [f"change {n}" for n in range(4)]
    server.stop()


def test_an_event_as_a_dict_holds_every_field_as_asdict_would() -> None:
    # to_dict is written by hand for speed: a field added to JournalEvent must not be lost.
    import dataclasses

    full = JournalEvent(
        kind=Kind.LIMIT_CHANGED,
        actor="controller",
        reason="r",
        address="tenant/acme/requests_per_minute",
        old=1.0,
        new=2.0,
        tick=7,
        policy="p",
        policy_version="v",
        source="policy",
        signals=({"name": "gpu", "value": 0.9},),
        runbook="runbooks/x.md",
        dry_run=True,
        details={"sink": "redis"},
    )
    data = full.to_dict()
    assert list(data) == [f.name for f in dataclasses.fields(JournalEvent)]
    assert data == dataclasses.asdict(full) | {"signals": [{"name": "gpu", "value": 0.9}]}
    assert JournalEvent.from_dict(data) == full


def test_a_batch_logs_its_first_events_then_one_summary_and_streams_them_all(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    client = connect(redis_server.url, RedisSettings(), retries=0)
    journal = Journal(client, KEYS, JournalSettings(log_events_per_tick=3))
    db.delete("governor:journal")
    with capture_logs() as logs, journal.batch():
        for n in range(7):
            journal.emit(event(n))
        journal.emit(JournalEvent(kind=Kind.LIMIT_DRIFT, actor="controller", reason="drift"))
    assert [log.get("reason") for log in logs[:3]] == ["change 0", "change 1", "change 2"]
    (summary,) = logs[3:]
    assert summary["event"] == "journal.summary"
    assert summary["events"] == 8
    assert summary["not_logged"] == 5
    assert summary["by_kind"] == {"limit.changed": 7, "limit.drift": 1}
    assert stream_reasons(db) == [f"change {n}" for n in range(7)] + ["drift"]


def test_a_batch_within_the_cap_and_single_events_log_every_line_and_no_summary(
    journal: Journal,
) -> None:
    with capture_logs() as logs:
        with journal.batch():
            for n in range(3):
                journal.emit(event(n))
        for n in range(3, 6):  # outside a batch: never capped
            journal.emit(event(n))
    assert [log["event"] for log in logs] == ["limit.changed"] * 6


def test_events_held_back_from_the_log_are_logged_when_the_stream_cannot_take_them(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "c").start()
    journal = Journal(
        connect(server.url, RedisSettings(), retries=0),
        KEYS,
        JournalSettings(log_events_per_tick=2),
    )
    with capture_logs() as logs:
        with journal.batch():
            for n in range(5):
                journal.emit(event(n))
            server.stop()  # the batch's flush fails: the 3 unlogged events are logged then
        with journal.batch():  # Redis still away: no cap while the stream is not writable
            for n in range(5, 9):
                journal.emit(event(n))
    changed = [log["reason"] for log in logs if log["event"] == "limit.changed"]
    assert sorted(changed) == [f"change {n}" for n in range(9)]
    assert [log["event"] for log in logs].count("journal.summary") == 1
    assert journal.pending == 9


def test_a_deposed_leaders_late_journal_write_is_marked_stale_leader(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    with connect(redis_server.url, RedisSettings(), retries=0) as client:
        old = RedisLeaderLock(client, KEYS.prefix, "old", lease_seconds=0.2)
        new = RedisLeaderLock(client, KEYS.prefix, "new", lease_seconds=30)
        assert old.ensure()
        journal = Journal(client, KEYS, JournalSettings())
        journal.fence = old.fence  # as the daemon wires it
        with capture_logs():
            journal.emit(event(1))  # written while leading: current
            # The leader stalls (SIGSTOP, GC pause) past its lease; another replica takes over.
            wait_for(new.ensure, "the new replica takes the expired lock", timeout=10)
            with journal.batch():  # it wakes mid-tick and journals a transition
                journal.emit(_transition("zombie"))
            rivals = Journal(client, KEYS, JournalSettings())
            rivals.fence = new.fence
            rivals.emit(_transition("current"))

    entries = read_events(db, KEYS, count=10)
    assert [(e.event.reason, e.stale_leader) for e in entries] == [
        ("change 1", False),
        ("zombie engaged", True),
        ("current engaged", False),
    ]
    stored = db.xrange("governor:journal")
    assert [f.get("stale_leader") for _, f in stored] == [None, "1", None]

    result = CliRunner().invoke(
        app, ["audit", "tail", "--json"], env={"GOVERNOR_REDIS__URL": redis_server.url}
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line.get("stale_leader", False) for line in lines] == [False, True, False]
    # Wide enough for one line per event (narrower, the table is stacked column by column).
    wide = {"GOVERNOR_REDIS__URL": redis_server.url, "COLUMNS": "250"}
    table = CliRunner().invoke(app, ["audit", "tail"], env=wide)
    assert table.exit_code == 0, table.output
    [zombie_row] = [line for line in table.stdout.splitlines() if "zombie engaged" in line]
    assert "(stale" in zombie_row  # the event column: "(stale leader: not in force)"
    assert table.stdout.count("(stale") == 1


def test_a_flush_after_the_replica_learned_it_lost_still_marks_what_it_buffered(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    with connect(redis_server.url, RedisSettings(), retries=0) as client:
        old = RedisLeaderLock(client, KEYS.prefix, "old", lease_seconds=0.2)
        new = RedisLeaderLock(client, KEYS.prefix, "new", lease_seconds=30)
        assert old.ensure()
        journal = Journal(client, KEYS, JournalSettings())
        journal.fence = old.fence
        with capture_logs() as logs, journal.batch():
            journal.emit(_transition("zombie"))
            wait_for(new.ensure, "the new replica takes the expired lock", timeout=10)
            assert not old.ensure()  # it learns it lost: no fence any more
            assert old.fence() is None
    [entry] = read_events(db, KEYS, count=10)
    assert entry.stale_leader
    assert [line["event"] for line in logs if line["log_level"] == "error"] == [
        "journal.stale_leader"
    ]


def _transition(who: str) -> JournalEvent:
    return JournalEvent(
        kind=Kind.POLICY_TRANSITION,
        actor="controller",
        reason=f"{who} engaged",
        policy="ThrottlePolicy/gpu-hot",
        details={"event": "engaged", "key": ""},
    )


def test_a_large_batch_is_stored_in_order_by_bounded_script_calls(
    client: redis.Redis[str], db: redis.Redis[str]
) -> None:
    """One script call with a tick's 10k events would hold Redis for its whole length (#18)."""
    journal = Journal(client, KEYS, JournalSettings(stream_max_length=10_000))
    watch(db)
    count = 2 * EVENTS_PER_APPEND + 7
    with journal.batch():
        for n in range(count):
            journal.emit(event(n))
    calls = [c for c in ran(db) if c.name == "EVALSHA"]
    assert stream_reasons(db) == [f"change {n}" for n in range(count)]
    # EVALSHA sha numkeys key maxlen token, then 3 arguments per event.
    assert [(c.argc - 6) / 3 for c in calls] == [EVENTS_PER_APPEND, EVENTS_PER_APPEND, 7]


def test_a_redis_of_another_key_contract_gets_neither_journal_nor_leader_lock(
    journal: Journal, client: redis.Redis[str], db: redis.Redis[str]
) -> None:
    # The sink refused such a Redis, but the daemon still took the lock there (a new epoch
    # key too) and appended its journal: our keys in another layout's keyspace.
    db.set("governor:contract", "2")
    lock = RedisLeaderLock(client, KEYS.prefix, "replica-1", lease_seconds=30)
    with capture_logs() as logs:
        leading = lock.ensure()
        journal.emit(event(1))
        flushed = journal.flush()

    assert not leading
    assert lock.fence() is None
    assert not flushed
    assert journal.pending == 1  # kept, as in an outage: sent once the contract is ours
    refusals = [log for log in logs if log["event"] in ("leader.refused", "journal.refused")]
    assert [log["event"] for log in refusals][:2] == ["leader.refused", "journal.refused"]
    for log in refusals:
        assert "holds key contract '2' in governor:contract" in log["error"]
    assert db.keys("*") == ["governor:contract"]
    db.delete("governor:contract")
    assert lock.ensure()
    assert journal.flush()
    assert stream_reasons(db) == ["change 1"]


def test_token_counts_are_logged_while_tokens_that_are_credentials_are_masked() -> None:
    out = io.StringIO()
    configure_logging("info", out)
    try:
        structlog.get_logger().info(
            "upstream sent no usage; settled from an estimate",
            tokens=130,
            details={"max_tokens": 256, "tokens_per_minute": 4000},
            bearer_token="hunter2",
            access_token="hunter2",
        )
    finally:
        structlog.reset_defaults()
    line = json.loads(out.getvalue())
    assert "hunter2" not in out.getvalue()
    assert line["tokens"] == 130
    assert line["details"] == {"max_tokens": 256, "tokens_per_minute": 4000}
    assert line["bearer_token"] == line["access_token"] == MASK
