"""`governor tenants set` moves a tenant's API keys to its new plan: the gateway enforces the
new plan (its models, its limits) within its key cache time, and the journal says which keys
moved. Other tenants' keys, and hand-written records, are left alone."""

from __future__ import annotations

import json

import redis
from typer.testing import CliRunner

from controller.cli import app
from controller.contract.keys import KeySchema
from controller.journal.reader import read_events
from tests.gateway.conftest import MakeGateway


def test_a_tenant_moved_to_paid_gets_paid_models_through_its_old_key(
    make_gateway: MakeGateway, db: redis.Redis[str]
) -> None:
    gateway = make_gateway(key_cache_seconds=0.0)
    acme, other = gateway.key("acme", "free"), gateway.key("globex", "free")
    db.hset(KeySchema().api_keys, "0123456789abcdef", "not a record")
    assert gateway.chat(acme, model="gpt-4").status_code == 403  # free: gpt-3.5-turbo only

    env = {"GOVERNOR_REDIS__URL": gateway.redis_url}
    moved = CliRunner().invoke(app, ["tenants", "set", "acme", "paid", "--reason", "upgrade"],
                               env=env)  # fmt: skip
    assert moved.exit_code == 0, moved.output
    assert "1 API key(s) moved to paid" in moved.stdout

    assert gateway.chat(acme, model="gpt-4").status_code == 200  # the same key, now paid
    assert gateway.chat(other, model="gpt-4").status_code == 403  # globex stays free
    (event,) = [e.event for e in read_events(db, KeySchema()) if e.event.kind == "tenant.set"]
    assert event.details["keys_moved"] == [acme.split("_")[1]]
    assert db.hget(KeySchema().api_keys, "0123456789abcdef") == "not a record"
    records = [json.loads(v) for k, v in db.hgetall(KeySchema().api_keys).items()
               if k != "0123456789abcdef"]  # fmt: skip
    assert sorted(r["plan"] for r in records) == ["free", "paid"]


def test_a_move_that_cannot_reach_the_keys_leaves_the_registry_as_it_was(
    make_gateway: MakeGateway, db: redis.Redis[str]
) -> None:
    """The registry and the tenant's keys change in one transaction: when the keys cannot be
    moved (their hash is damaged), the tenant stays registered on its old plan, not on a
    plan its keys do not carry."""
    gateway = make_gateway(key_cache_seconds=0.0)
    env = {"GOVERNOR_REDIS__URL": gateway.redis_url}
    assert CliRunner().invoke(app, ["tenants", "set", "acme", "free"], env=env).exit_code == 0
    keys = KeySchema()
    db.delete(keys.api_keys)
    db.set(keys.api_keys, "damaged")  # a string where the keys' hash belongs
    failed = CliRunner().invoke(app, ["tenants", "set", "acme", "paid"], env=env)
    assert failed.exit_code != 0
    # The repair named is not a delete: nothing writes the keys again.
    assert "deleting it revokes them all" in failed.output, failed.output
    assert "rewrites it" not in failed.output, failed.output
    assert db.hget(keys.tenants, "acme") == "free"  # nothing half-applied
    assert [e for e in read_events(db, keys) if e.event.details.get("plan") == "paid"] == []
    db.delete(keys.api_keys)
    moved = CliRunner().invoke(app, ["tenants", "set", "acme", "paid"], env=env)
    assert moved.exit_code == 0, moved.output
    assert "(was free)" in moved.stdout
    assert db.hget(keys.tenants, "acme") == "paid"
