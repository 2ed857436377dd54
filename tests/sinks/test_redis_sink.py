"""The Redis sink on a real redis-server: diff-only writes, versions, drift, verify, failures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import redis

from controller.changes import diff
from controller.clients.redis import connect
from controller.contract.keys import KeySchema
from controller.errors import SinkError
from controller.model import Address, AddressTemplate
from controller.settings import RedisSettings
from controller.sinks import Sink, sink_from_url
from controller.sinks.redis import RedisSink
from tests.support.redis import RedisServer

A = Address.parse
DESIRED = {
    A("global/requests_per_second"): 2000.0,
    A("plan/free/requests_per_minute"): 10.0,
    A("tenant/acme/tokens_per_minute"): 20000.0,
    A("tenant/acme/tokens_per_minute@gpt-4"): 5000.0,
    A("user/acme/alice/requests_per_minute"): 12.5,
}
WRITES = {"hset", "hdel", "set", "del", "incr", "publish", "xadd", "unlink", "multi", "exec"}


def sync(sink: RedisSink, desired: dict[Address, float]) -> int:
    """One level-triggered pass: read, diff, apply; returns the version after it."""
    return sink.apply(diff(desired, sink.read())).version


def changes_counter(db: redis.Redis[str]) -> int:
    """Redis's dirty counter: every write to the keyspace increments it."""
    return int(db.info("persistence")["rdb_changes_since_last_save"])


def commands_called(db: redis.Redis[str]) -> set[str]:
    stats = db.info("commandstats")
    return {name.removeprefix("cmdstat_") for name in stats}


def test_first_apply_writes_everything_and_gateways_see_it(
    sink: RedisSink, db: redis.Redis[str]
) -> None:
    assert sync(sink, DESIRED) == 1
    assert db.hgetall("governor:limits:global") == {"requests_per_second": "2000"}
    assert db.hgetall("governor:{t:acme}:limits") == {
        "tokens_per_minute": "20000",
        "tokens_per_minute@gpt-4": "5000",
    }
    assert db.hget("governor:{t:acme}:user:alice:limits", "requests_per_minute") == "12.5"
    assert db.get("governor:contract") == "1"
    assert dict(sink.read()) == DESIRED


def test_a_tick_with_no_change_writes_nothing(sink: RedisSink, db: redis.Redis[str]) -> None:
    sync(sink, DESIRED)
    db.config_resetstat()
    dirty = changes_counter(db)
    state = sink.read()
    changes = diff(DESIRED, state)
    result = sink.apply(changes)
    assert changes == []
    assert result.version == 1
    assert changes_counter(db) == dirty  # Redis's own count of writes did not move
    assert commands_called(db) & WRITES == set()
    assert db.get("governor:version") == "1"


def test_only_the_difference_is_written_and_the_version_is_monotonic(
    sink: RedisSink, db: redis.Redis[str]
) -> None:
    assert sync(sink, DESIRED) == 1
    changed = dict(DESIRED)
    changed[A("tenant/acme/tokens_per_minute")] = 15000.0
    del changed[A("user/acme/alice/requests_per_minute")]
    changes = diff(changed, sink.read())
    assert [(str(c.address), c.old, c.new) for c in changes] == [
        ("tenant/acme/tokens_per_minute", 20000.0, 15000.0),
        ("user/acme/alice/requests_per_minute", 12.5, None),
    ]
    db.config_resetstat()
    result = sink.apply(changes)
    assert result.version == 2
    assert result.verified
    stats = db.info("commandstats")
    assert stats["cmdstat_hset"]["calls"] == 2  # the tenant hash and the ledger
    assert stats["cmdstat_hdel"]["calls"] == 2  # the user hash and the ledger
    assert stats["cmdstat_exec"]["calls"] == 1
    assert db.exists("governor:{t:acme}:user:alice:limits") == 0
    assert dict(sink.read()) == changed
    versions = [sync(sink, {**changed, A("ip/requests_per_minute"): float(n)}) for n in (1, 2, 3)]
    assert versions == [3, 4, 5]


def test_each_apply_publishes_the_new_version(sink: RedisSink, db: redis.Redis[str]) -> None:
    pubsub = db.pubsub()
    pubsub.subscribe("governor:changes")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    sync(sink, DESIRED)
    message = pubsub.get_message(timeout=5)
    pubsub.close()
    assert message is not None
    assert message["data"] == "1"


def test_a_hand_edit_is_reported_as_drift_and_reconciled(
    sink: RedisSink, db: redis.Redis[str]
) -> None:
    sync(sink, DESIRED)
    db.hset("governor:{t:acme}:limits", "tokens_per_minute", "999")
    db.hset("governor:{t:acme}:limits", "requests_per_minute", "abc")  # not ours, not a number
    db.hdel("governor:limits:plan:free", "requests_per_minute")
    state = sink.read()
    drift = {str(d.address): (d.written, d.actual) for d in state.drift}
    assert drift.keys() == {
        "tenant/acme/tokens_per_minute",
        "tenant/acme/requests_per_minute",
        "plan/free/requests_per_minute",
    }
    assert drift["tenant/acme/tokens_per_minute"] == (20000.0, 999.0)
    assert drift["plan/free/requests_per_minute"] == (10.0, None)
    sink.apply(diff(DESIRED, state))
    after = sink.read()
    assert after.drift == []
    assert dict(after) == DESIRED


def test_a_limit_of_ours_edited_into_a_non_number_is_drift_and_rewritten(
    sink: RedisSink, db: redis.Redis[str]
) -> None:
    sync(sink, DESIRED)
    db.hset("governor:{t:acme}:limits", "tokens_per_minute@gpt-4", "lots")
    state = sink.read()
    [drift] = state.drift
    assert str(drift.address) == "tenant/acme/tokens_per_minute@gpt-4"
    assert drift.written == 5000.0
    assert math.isnan(drift.actual or 0.0)
    [change] = diff(DESIRED, state)
    assert (change.address, change.new) == (drift.address, 5000.0)
    assert math.isnan(change.old or 0.0)
    sink.apply([change])
    assert sink.read().drift == []


def test_limits_read_back_are_the_instances_policies_target(sink: RedisSink) -> None:
    # One parsed address per limit in the process, however many layers hold it.
    sync(sink, DESIRED)
    target = AddressTemplate.parse("tenant/$tenant/tokens_per_minute").fill({"tenant": "acme"})
    [read] = [address for address in sink.read() if address == target]
    assert read is target


def test_a_key_replaced_by_another_type_is_a_sink_error_naming_the_fix(
    sink: RedisSink, db: redis.Redis[str]
) -> None:
    sync(sink, DESIRED)
    db.delete("governor:{t:acme}:limits")
    db.set("governor:{t:acme}:limits", "oops")
    with pytest.raises(SinkError, match=r"WRONGTYPE.*delete it"):
        sink.read()


def test_verify_reports_what_does_not_read_back(sink: RedisSink, db: redis.Redis[str]) -> None:
    # A concurrent writer between EXEC and the read-back is simulated by a keyspace
    # that already differs in the ledger-less global hash: here we check the verify script
    # itself by asking it about a change that was not written.
    changes = diff(DESIRED, sink.read())
    result = sink.apply(changes)
    assert result.verified
    bad = sink._verify(keys=["governor:limits:global"], args=["requests_per_second", "1"])
    assert bad == [1]


def test_hostile_ids_cannot_touch_another_tenants_keys(
    sink: RedisSink, db: redis.Redis[str]
) -> None:
    sync(sink, DESIRED)
    before = {k: db.dump(k) for k in db.keys("governor:{t:acme}*")}
    # Valid but tricky ids: separators and tag lookalikes are escaped or impossible.
    tricky = {
        A("tenant/acme:limits/tokens_per_minute"): 1.0,
        A("user/acme:user/alice:limits/requests_per_minute"): 2.0,
        A("tenant/acme.evil/tokens_per_minute"): 3.0,
    }
    sync(sink, {**DESIRED, **tricky})
    assert {k: db.dump(k) for k in db.keys("governor:{t:acme}*")} == before
    assert dict(sink.read()) == {**DESIRED, **tricky}
    from controller.model import LimitKind, Scope

    hostile = Address(Scope.TENANT, LimitKind.TOKENS_PER_MINUTE, tenant="acme}{t:evil")
    with pytest.raises(ValueError, match="not a safe id"):
        sync(sink, {**DESIRED, hostile: 1.0})
    assert {k: db.dump(k) for k in db.keys("governor:{t:acme}*")} == before


def test_a_down_server_is_a_sink_error_after_bounded_retries(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "down", persistent=True).start()
    sink = RedisSink.from_url(server.url, RedisSettings(retries=2, retry_backoff_seconds=0.01))
    sync(sink, DESIRED)
    server.stop()
    with pytest.raises(SinkError, match=f"127.0.0.1:{server.port}.*apply 5 limit changes"):
        sink.apply(diff({A("global/requests_per_second"): 1.0}, DESIRED))
    server.start()
    state = sink.read()  # the failed apply changed nothing; the version did not move
    assert (dict(state), state.version) == (DESIRED, 1)
    server.stop()


def test_a_retried_apply_lands_once_the_server_is_back(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "back", persistent=True).start()
    sink = RedisSink.from_url(server.url, RedisSettings(retries=3, retry_backoff_seconds=0.01))
    assert sync(sink, DESIRED) == 1
    server.restart()  # the client's pooled connection is now dead: the retry reconnects
    result = sink.apply(diff({**DESIRED, A("ip/requests_per_minute"): 100.0}, sink.read()))
    assert result.version == 2
    assert result.verified
    server.stop()


def test_check_refuses_another_contract_and_the_factory_picks_redis(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    sink = sink_from_url(redis_server.url, RedisSettings())
    assert isinstance(sink, Sink)
    sink.check()
    db.set("governor:contract", "2")
    with pytest.raises(SinkError, match="contract '2'"):
        sink.check()


@pytest.mark.parametrize("contract", ["2", "99", "not a number"])
def test_a_redis_of_another_contract_is_neither_read_nor_written(
    sink: RedisSink, db: redis.Redis[str], contract: str
) -> None:
    # Only check() refused it, and nothing calls check(): every tick read the other
    # layout's keys as limits, wrote contract 1 keys beside them and stamped 1 over its
    # number, and published its plans to the gateways reading that Redis.
    from controller.control.catalog import publish_catalog
    from controller.policy.loader import load_directory

    db.set("governor:contract", contract)
    refused = f"holds key contract {contract!r} in governor:contract, this Governor speaks 1"

    with pytest.raises(SinkError, match=refused):
        sink.read()
    with pytest.raises(SinkError, match=refused):
        sink.apply(diff(DESIRED, {}))
    with pytest.raises(SinkError, match=refused):
        publish_catalog(db, load_directory(Path("policies")), prefix="governor")

    assert db.keys("*") == ["governor:contract"]
    assert db.get("governor:contract") == contract


def test_unsupported_urls_name_the_supported_schemes(redis_server: RedisServer) -> None:
    from controller.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"redis://, rediss://, unix://"):
        sink_from_url("http://x", RedisSettings())
    with pytest.raises(ConfigurationError, match="a Cluster has database 0 only"):
        connect("redis+cluster://:pw@h:1/2", RedisSettings())
    sink = RedisSink(connect(redis_server.url, RedisSettings()), KeySchema("other"))
    assert sink.read().version == 0


def test_a_version_governor_never_wrote_is_a_sink_error_naming_the_key_and_fix(
    sink: RedisSink, db: redis.Redis[str]
) -> None:
    """It raised a bare ValueError from int(): every tick failed with no hint of the key."""
    db.set("governor:version", "abc")

    for read in (sink.read, sink.version):
        with pytest.raises(SinkError, match=r"governor:version holds 'abc'.*delete the key"):
            read()
    db.delete("governor:version")
    assert sink.read().version == 0
