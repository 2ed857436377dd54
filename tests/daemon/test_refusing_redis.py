"""A Redis that answers reads but refuses every write (an ACL that lost its write rights, a
master turned into a replica): no replica can take or renew the leader lock, so no limit
is written, and /readyz must say so, with the refusal and its repair, instead of 200."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from tests.daemon.harness import FREE_RPM, Daemon, limit
from tests.support.prometheus import wait_for
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration


def _not_ready_for(daemon: Daemon, refusal: str) -> str:
    """The /readyz body once it is 503 naming the leader lock (a leader's lock outlives a
    failed renewal by its lease, then the follower's tries fail too)."""

    def refused() -> bool:
        status, body = daemon.http("/readyz")
        return status == 503 and "leader lock" in body and refusal in body

    wait_for(refused, f"/readyz 503 naming the leader lock and {refusal}", 20)
    return daemon.http("/readyz")[1]


def test_an_acl_without_write_rights_is_not_ready_and_says_which_permission(
    db: redis.Redis[str], daemon: Daemon, redis_server: RedisServer
) -> None:
    db.execute_command("ACL", "SETUSER", "default", "-@write")
    body = _not_ready_for(daemon, "ACL SETUSER")
    assert f"127.0.0.1:{redis_server.port}" in body
    assert daemon.metric("governor_ready") == 0
    assert (daemon.metric("governor_redis_errors_total", operation="leader") or 0) > 0
    lines = daemon.logged("leader.redis_unavailable")
    assert lines
    assert "ACL SETUSER" in lines[-1]["error"]

    db.execute_command("ACL", "SETUSER", "default", "+@all")
    wait_for(lambda: daemon.http("/readyz") == (200, "ok\n"), "ready once writes are allowed", 20)
    assert limit(db) == FREE_RPM


def test_a_master_turned_replica_is_not_ready_and_says_to_point_at_the_master(
    db: redis.Redis[str], daemon: Daemon, tmp_path: Path
) -> None:
    master = RedisServer(tmp_path / "master").start()
    try:
        db.replicaof("127.0.0.1", master.port)  # what it held is replaced by the master's
        body = _not_ready_for(daemon, "read-only replica")
        assert "GOVERNOR_REDIS__URL" in body
        db.replicaof("NO", "ONE")
        wait_for(lambda: daemon.http("/readyz") == (200, "ok\n"), "ready as a master again", 20)
        wait_for(lambda: limit(db) == FREE_RPM, "the limits are written back")
    finally:
        master.stop()


def test_a_full_redis_names_itself_in_every_refused_write_and_loses_nothing(
    db: redis.Redis[str], daemon: Daemon, redis_server: RedisServer, policy_dir: Path
) -> None:
    db.config_set("maxmemory-policy", "noeviction")
    db.config_set("maxmemory", "1")  # every write that may grow memory is refused: OOM
    # A plan change: a new catalog and a new limit to write, and journal events to append.
    plans = policy_dir / "plans.yaml"
    plans.write_text(plans.read_text().replace(f"{FREE_RPM:g}", f"{FREE_RPM + 1:g}"))

    def refused() -> bool:
        status, body = daemon.http("/readyz")
        return status == 503 and "plan catalog" in body and "limit" in body

    wait_for(refused, "/readyz 503 naming the catalog and the limits", 20)
    body = daemon.http("/readyz")[1]
    catalog = next(line for line in body.splitlines() if "plan catalog" in line)
    assert f"Redis at 127.0.0.1:{redis_server.port}" in catalog
    assert "this Redis is full" in catalog  # the repair, as the limits' line says it
    journal = daemon.wait_for_log("journal.redis_unavailable")
    assert "this Redis is full" in journal["error"]

    db.config_set("maxmemory", "0")
    wait_for(lambda: limit(db) == FREE_RPM + 1, "the new limit is written once Redis has room")
    wait_for(lambda: daemon.http("/readyz") == (200, "ok\n"), "ready again", 20)
    catalog_plans = db.hgetall("governor:plans")
    assert set(catalog_plans) == {"free"}
    kinds = {fields["kind"] for _, fields in db.xrange("governor:journal")}
    assert {"policy.reloaded", "limit.changed"} <= kinds  # held while refused, then flushed


def test_a_rotated_password_is_not_ready_and_says_where_the_password_goes(
    db: redis.Redis[str], daemon: Daemon, redis_server: RedisServer
) -> None:
    # Redis rotated its password and dropped its clients: every reconnect is refused.
    db.execute_command("ACL", "SETUSER", "default", "resetpass", ">n3w-s3cret")
    db.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    body = _not_ready_for(daemon, "GOVERNOR_REDIS__PASSWORD")
    assert f"127.0.0.1:{redis_server.port}" in body
    assert "restart after a rotation" in body
    assert "n3w-s3cret" not in daemon.stdout.read_text()

    db.execute_command("ACL", "SETUSER", "default", "nopass")
    wait_for(lambda: daemon.http("/readyz") == (200, "ok\n"), "ready once the login works", 20)


def test_a_redis_that_evicts_keys_when_full_is_not_ready_and_says_the_policy_to_set(
    db: redis.Redis[str], daemon: Daemon, redis_server: RedisServer
) -> None:
    # allkeys-lru: once full, Redis drops the coldest keys without an error, and the limit
    # hashes (read only when a gateway's cache misses) are the coldest there are.
    db.config_set("maxmemory", str(1 << 30))
    db.config_set("maxmemory-policy", "allkeys-lru")
    wait_for(lambda: "maxmemory-policy allkeys-lru" in daemon.http("/readyz")[1], "named", 20)
    status, body = daemon.http("/readyz")
    assert status == 503
    assert f"127.0.0.1:{redis_server.port}" in body
    assert "set maxmemory-policy noeviction" in body

    db.config_set("maxmemory-policy", "noeviction")  # a full Redis refuses instead: OOM
    wait_for(lambda: daemon.http("/readyz") == (200, "ok\n"), "ready with noeviction", 20)
    db.config_set("maxmemory", "0")
