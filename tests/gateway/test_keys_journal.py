"""`governor keys create|revoke` journal who made or revoked which key, never the key."""

from __future__ import annotations

import json

import redis
from typer.testing import CliRunner, Result

from controller.cli import app
from controller.contract.keys import KeySchema
from controller.journal.reader import read_events
from tests.support.redis import RedisServer

runner = CliRunner()


def governor(server: RedisServer, *args: str) -> Result:
    env = {"GOVERNOR_REDIS__URL": server.url, "GOVERNOR_GATEWAY__API_KEY_SECRET": "s3cret"}
    return runner.invoke(app, list(args), env=env)


def test_create_and_revoke_are_journalled_without_the_key(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    who = ("--user", "alice", "--actor", "oncall-dave", "--reason", "INC-7", "--json")
    created = governor(redis_server, "keys", "create", "--tenant", "acme", "--plan", "paid", *who)
    assert created.exit_code == 0, created.output
    made = json.loads(created.stdout)
    digest = json.loads(db.hget(KeySchema().api_keys, made["key_id"]) or "{}")["digest"]

    revoked = governor(redis_server, "keys", "revoke", made["key_id"], "--reason", "leaked")
    assert revoked.exit_code == 0, revoked.output

    events = [e.event for e in read_events(db, KeySchema())]
    assert [(e.kind, e.reason) for e in events] == [("key.created", "INC-7"),
                                                    ("key.revoked", "leaked")]  # fmt: skip
    assert events[0].actor == "oncall-dave"
    for event in events:
        assert event.details["key_id"] == made["key_id"]
        assert (event.details["tenant"], event.details["plan"]) == ("acme", "paid")
        assert event.details["user"] == "alice"
    stream = json.dumps(db.xrange(KeySchema().journal))
    assert made["key"] not in stream
    assert digest.split(":")[1] not in stream

    tail = governor(redis_server, "audit", "tail").stdout
    assert "key.created" in tail
    assert "key.revoked" in tail


def test_revoking_an_unknown_key_fails_and_journals_nothing(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    result = governor(redis_server, "keys", "revoke", "0123456789abcdef")
    assert result.exit_code == 1
    assert "keys list" in result.stderr
    assert read_events(db, KeySchema()) == []
