"""The controller and the CLI on a real Redis Cluster (contract 2): `run --once` and
`limits get`, commands that write and journal, and the sink's per-slot writes with their
fence, version token, ledger and decision records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from controller.changes import Change
from controller.cli import app
from controller.clients.redis import close, connect
from controller.contract.fence import Fence, FencedError
from controller.contract.keys import KeySchema
from controller.contract.slots import slot_of
from controller.model import Address, Decision, Source
from controller.settings import RedisSettings
from controller.sinks.redis import RedisSink
from tests.support.redis_cluster import RedisClusterServers, master_of

POLICIES = Path(__file__).resolve().parents[2] / "policies"
V2 = KeySchema("governor", sharded=True)
TENANTS = [f"tenant{i}" for i in range(40)]  # spread over the three masters


def env_for(cluster: RedisClusterServers) -> dict[str, str]:
    return {
        **os.environ,
        "GOVERNOR_REDIS__URL": cluster.url,
        "GOVERNOR_CONTROLLER__POLICY_DIR": str(POLICIES),
        "GOVERNOR_GATEWAY__API_KEY_SECRET": "cluster-secret",
        "GOVERNOR_PROMETHEUS__URL": "http://127.0.0.1:9",  # the signals fail: baselines
    }


def run_once(cluster: RedisClusterServers) -> str:
    """`governor run --once`'s output. No Prometheus here: the tick writes the baselines and
    the command exits 1 "not ready" for that reason alone, never for Redis."""
    done = subprocess.run(
        [sys.executable, "-m", "controller", "run", "--once"],
        env=env_for(cluster), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "tick.failed" not in done.stderr
    assert "not ready: every signal query failed (Prometheus unreachable?)" in done.stderr
    return done.stdout


@pytest.fixture
def sink(cluster: RedisClusterServers) -> Iterator[RedisSink]:
    client = connect(cluster.url, RedisSettings())
    yield RedisSink(client, V2)
    close(client)


def test_run_once_then_limits_get_on_a_cluster(cluster: RedisClusterServers) -> None:
    # The shipped baselines: 4 global (in flight and its headroom, requests/s, tokens/min), 1 per
    # IP, 12 plans (3 of them the plans' in-flight weights).
    assert "tick 1: changed 17 limits" in run_once(cluster)
    shown = CliRunner().invoke(app, ["limits", "get", "--json"], env=env_for(cluster))
    assert shown.exit_code == 0, shown.output
    shown_json = json.loads(shown.stdout)
    limits = shown_json["limits"]
    assert limits["plan/free/requests_per_minute"] == 10
    assert limits["plan/paid/tokens_per_minute"] == 20000
    with cluster.client() as client:
        version = int(client.get(V2.version) or 0)
        assert version == shown_json["version"]
        assert version > 10**15  # a time-ordered token (server µs), not a counter
        assert client.get(V2.contract) == "2"
        assert client.hget(V2.catalog, "free") is not None
    usage = CliRunner().invoke(
        app, ["usage", "acme", "--plan", "paid", "--json"], env=env_for(cluster)
    )
    assert usage.exit_code == 0, usage.output
    assert "tenant/acme/tokens_per_day" in usage.stdout  # the plan's value, per tenant
    # Read back and diffed: nothing to write, no new version.
    assert "tick 1: changed 0 limits" in run_once(cluster)
    with cluster.client() as client:
        assert int(client.get(V2.version) or 0) == version


def test_commands_that_write_then_journal_work_on_a_cluster(cluster: RedisClusterServers) -> None:
    runner, env = CliRunner(), env_for(cluster)
    for command in (
        ["tenants", "set", "acme", "paid"],
        ["keys", "create", "--tenant", "acme", "--plan", "paid"],
        ["tenants", "set", "acme", "free"],  # moves the key (WATCH/MULTI in one slot)
        ["override", "set", "tenant/acme/requests_per_minute", "5", "--ttl", "10m",
         "--reason", "INC-1"],
        ["freeze", "--ttl", "5m", "--reason", "INC-1"],
    ):  # fmt: skip
        result = runner.invoke(app, command, env=env)
        assert result.exit_code == 0, (command, result.output)
    audit = runner.invoke(app, ["audit", "tail", "-n", "10", "--json"], env=env)
    assert audit.exit_code == 0, audit.output
    events = [json.loads(line)["kind"] for line in audit.stdout.splitlines() if line.strip()]
    assert events.count("tenant.set") == 2
    assert {"key.created", "override.set", "freeze.set"} <= set(events)
    listed = runner.invoke(app, ["keys", "list", "--json"], env=env)
    assert json.loads(listed.stdout)[0]["plan"] == "free"


def limits_of(tenants: list[str], value: float) -> list[Change]:
    return [
        Change(Address.parse(f"tenant/{tenant}/requests_per_minute"), None, value)
        for tenant in tenants
    ] + [Change(Address.parse("global/requests_per_second"), None, value)]


def test_writes_land_per_slot_with_their_ledger_and_records(
    cluster: RedisClusterServers, sink: RedisSink
) -> None:
    result = sink.apply(limits_of(TENANTS, 7))
    assert result.verified
    assert len(result.applied) == len(TENANTS) + 1
    state = sink.read()
    assert state.version == result.version
    assert dict(state.actual) == dict(state.written) == {c.address: 7.0 for c in result.applied}
    owners = {V2.owner(c.address) for c in result.applied}
    assert len({master_of(cluster, owner).port for owner in owners}) == 3  # all masters
    with cluster.client() as client:
        ledgers = [key for key in V2.ledgers() if client.hlen(key)]
        assert len(ledgers) > 10  # one per slot written, none holding every limit
        assert max(client.hlen(key) for key in ledgers) < len(TENANTS)
    # Deletes, and a second version above the first.
    removed = [Change(c.address, 7.0, None) for c in limits_of(TENANTS[:5], 7)[:-1]]
    second = sink.apply(removed)
    assert second.version > result.version
    assert len(sink.read().actual) == len(TENANTS) + 1 - 5
    decisions = {
        c.address: Decision(c.address, 7.0, Source.BASELINE, None, "baseline", (), (), 7.0, ())
        for c in result.applied
    }
    assert sink.record_decisions(decisions, tick=3) == len(decisions)
    record = sink.read_decision(Address.parse("tenant/tenant9/requests_per_minute"))
    assert record is not None
    assert json.loads(record)["tick"] == 3
    fresh = RedisSink(sink.client, V2)  # a restarted controller forgets what is not desired
    kept = dict(list(decisions.items())[:3])
    assert fresh.record_decisions(kept, tick=4) == len(decisions)
    assert fresh.read_decision(Address.parse("tenant/tenant9/requests_per_minute")) is None


def test_fencing_holds_in_every_slot(cluster: RedisClusterServers, sink: RedisSink) -> None:
    with cluster.client() as client:
        client.set(V2.leader, "old#4")
    sink.fence = lambda: Fence(V2.leader, "old#4")
    sink.apply(limits_of(TENANTS[:3], 5))
    # A new leader (epoch 5) wrote to tenant1's slot; the lock is its now.
    newer = RedisSink(sink.client, V2)
    newer.fence = lambda: Fence(V2.leader, "new#5")
    with cluster.client() as client:
        client.set(V2.leader, "new#5")
    newer.apply(limits_of(["tenant1"], 9)[:1])
    with pytest.raises(FencedError, match="newer leader"):
        sink.apply(limits_of(["tenant1"], 1)[:1])
    with pytest.raises(FencedError, match="lost the leader lock"):
        sink.apply(limits_of(["tenant2"], 1)[:1])  # its slot saw no newer epoch: the bump
    assert sink.stored(Address.parse("tenant/tenant1/requests_per_minute")) == 9.0
    slots = {slot_of(V2.owner(c.address)) for c in limits_of(["tenant1", "tenant2"], 0)[:2]}
    assert len(slots) == 2


def test_a_single_redis_keeps_contract_1(redis_server: object, db: redis.Redis[str]) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    env = {**os.environ, "GOVERNOR_REDIS__URL": url}
    runner = CliRunner()
    assert runner.invoke(app, ["tenants", "set", "acme", "paid"], env=env).exit_code == 0
    assert db.exists("governor:tenants")
    assert not db.exists(V2.tenants)
