"""Overrides, the freeze flag and the tenant registry on a real redis-server: TTL is the promise."""

from __future__ import annotations

import time

import pytest
import redis

from controller.contract.keys import KeySchema
from controller.control.overrides import CONFLICTING_PLANS, ControlStore
from controller.errors import SinkError
from controller.gateway.keys import KeyStore
from controller.model import Address

A = Address.parse
TPM = A("tenant/acme/tokens_per_minute")


def wait_until_gone(db: redis.Redis[str], key: str) -> None:
    """Poll (never sleep blindly) until Redis has expired `key`."""
    deadline = time.monotonic() + 10
    while db.exists(key):
        assert time.monotonic() < deadline, f"{key} did not expire"
        time.sleep(0.01)


def test_an_override_is_stored_with_a_ttl_and_listed(
    control: ControlStore, db: redis.Redis[str]
) -> None:
    override, previous = control.set_override(
        TPM, 5000, ttl_seconds=3600, actor="alice", reason="INC-42 runaway client"
    )
    assert previous is None
    key = "governor:override:tenant/acme/tokens_per_minute"
    assert 3_590_000 < db.pttl(key) <= 3_600_000
    listed = control.overrides()
    assert list(listed) == [TPM]
    assert listed[TPM].value == 5000
    assert listed[TPM].actor == "alice"
    assert abs(listed[TPM].expires_at - override.expires_at) < 5
    _, previous = control.set_override(TPM, 4000, ttl_seconds=60, actor="bob", reason="tighter")
    assert previous is not None
    assert previous.value == 5000


def test_an_override_expires_by_redis_ttl_even_without_the_controller(
    control: ControlStore, db: redis.Redis[str]
) -> None:
    control.set_override(TPM, 5000, ttl_seconds=60, actor="alice", reason="test")
    control.set_override(
        A("global/requests_per_second"), 100, ttl_seconds=3600, actor="a", reason="r"
    )
    key = "governor:override:tenant/acme/tokens_per_minute"
    db.pexpire(key, 50)  # fast-forward: the TTL Redis enforces is what makes it end
    wait_until_gone(db, key)
    assert list(control.overrides()) == [A("global/requests_per_second")]
    # The index forgets the expired override once Redis says it is gone.
    assert db.zrange("governor:overrides", 0, -1) == ["global/requests_per_second"]


def test_clearing_an_override_returns_it(control: ControlStore, db: redis.Redis[str]) -> None:
    control.set_override(TPM, 5000, ttl_seconds=60, actor="alice", reason="test")
    cleared = control.clear_override(TPM)
    assert cleared is not None
    assert cleared.value == 5000
    assert control.clear_override(TPM) is None
    assert control.overrides() == {}
    assert db.keys("governor:override*") == []


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_override_values_must_be_finite_and_not_negative(
    control: ControlStore, value: float
) -> None:
    with pytest.raises(ValueError, match="finite number >= 0"):
        control.set_override(TPM, value, ttl_seconds=60, actor="a", reason="r")


def test_freeze_holds_until_its_ttl(control: ControlStore, db: redis.Redis[str]) -> None:
    assert control.frozen() is None
    freeze = control.freeze(ttl_seconds=1800, actor="alice", reason="INC-42 investigating")
    state = control.read()
    assert state.frozen
    assert state.freeze == freeze
    assert 1_790_000 < db.pttl("governor:freeze") <= 1_800_000
    db.pexpire("governor:freeze", 50)
    wait_until_gone(db, "governor:freeze")
    assert not control.read().frozen


def test_unfreeze_lifts_the_freeze(control: ControlStore) -> None:
    control.freeze(ttl_seconds=60, actor="alice", reason="x")
    lifted = control.unfreeze()
    assert lifted is not None
    assert lifted.actor == "alice"
    assert control.unfreeze() is None


def test_the_tenant_registry(control: ControlStore) -> None:
    assert control.set_tenant("acme", "paid") is None
    assert control.set_tenant("evil", "free") is None
    assert control.set_tenant("acme", "free") == "paid"
    assert control.tenant_plan("acme") == "free"
    assert control.tenant_plan("nobody") is None
    assert control.read().tenants == {"acme": "free", "evil": "free"}
    with pytest.raises(ValueError, match=r"tenant 'a\}\{b'"):
        control.set_tenant("a}{b", "paid")
    with pytest.raises(ValueError, match="plan"):
        control.set_tenant("acme", "pl an")


def test_a_tenant_known_only_through_its_api_keys_has_their_plan(
    control: ControlStore, client: redis.Redis[str], keys: KeySchema
) -> None:
    """One source of truth: what the gateway enforces (the key's plan) is what the controller
    reads, for a tenant never registered with `tenants set`; the registry wins when set."""
    store = KeyStore(client, keys, secret=None)
    store.create("bigco", "enterprise")
    store.create("bigco", "enterprise", user="bob")
    store.create("acme", "paid")
    control.set_tenant("acme", "free")  # registered: the registry is the truth
    client.hset(keys.api_keys, "junk", "not a record")  # stands for nobody
    assert control.read().tenants == {"acme": "free", "bigco": "enterprise"}
    assert control.tenants() == {"acme": "free"}  # the registry itself is unchanged
    # A key created later is seen at the next read (the record count changed).
    store.create("newco", "paid")
    assert control.read().tenants["newco"] == "paid"
    # Keys on two plans and no registration: no plan, so nothing is scaled from a guess.
    store.create("split", "paid")
    store.create("split", "enterprise")
    assert control.read().tenants["split"] == CONFLICTING_PLANS
    control.set_tenant("split", "paid")
    assert control.read().tenants["split"] == "paid"


@pytest.mark.parametrize(
    "record",
    [
        "not json",
        '{"actor": "alice"}',
        '["a"]',
        '{"actor": 1, "reason": 2, "set_at": "x", "expires_at": 3}',
    ],
)
def test_a_freeze_flag_governor_never_wrote_is_a_sink_error_unfreeze_clears(
    control: ControlStore, db: redis.Redis[str], record: str
) -> None:
    """A hand-written flag failed every tick with a bare JSON error; a SinkError makes the
    tick keep the last control state it read, and says which key and how to fix it."""
    db.set("governor:freeze", record)

    with pytest.raises(SinkError, match=r"governor:freeze holds .* `governor unfreeze` clears it"):
        control.read()
    assert control.unfreeze() is None
    assert not control.read().frozen


@pytest.mark.parametrize(
    "record",
    ["garbage", '{"address": "tenant/acme/tokens_per_minute"}',
     '{"address": "tenant/acme/tokens_per_minute", "value": NaN, "expires_at": 1, '
     '"actor": "a", "reason": "r"}'],
)  # fmt: skip
def test_an_override_governor_never_wrote_is_a_sink_error_clearing_repairs_it(
    control: ControlStore, db: redis.Redis[str], record: str
) -> None:
    db.set("governor:override:tenant/acme/tokens_per_minute", record, ex=600)
    db.zadd("governor:overrides", {"tenant/acme/tokens_per_minute": time.time() + 600})

    with pytest.raises(SinkError, match=r"override clear ADDRESS` removes it"):
        control.read()
    assert control.clear_override(TPM) is None
    assert control.read().overrides == {}


def test_an_index_member_that_is_no_address_is_pruned(
    control: ControlStore, db: redis.Redis[str]
) -> None:
    control.set_override(TPM, 5, ttl_seconds=60, actor="alice", reason="x")
    db.zadd("governor:overrides", {"not an address": 1, "plan/": 2})

    assert list(control.read().overrides) == [TPM]
    assert db.zrange("governor:overrides", 0, -1) == [str(TPM)]


@pytest.mark.parametrize("record", ["yes, go ahead", '{"version": "abc"}', "[1]"])
def test_a_reload_confirmation_governor_never_wrote_is_a_sink_error_naming_the_key(
    control: ControlStore, db: redis.Redis[str], record: str
) -> None:
    # It raised json's or a KeyError, which the reload took for a bug of its own.
    db.set("governor:reload-confirmation", record)

    with pytest.raises(SinkError, match=r"^governor:reload-confirmation holds .* replaces it$"):
        control.reload_confirmation()
    control.confirm_reload("3f2a9c1b7e4d", ttl_seconds=60, actor="alice", reason="CHG-1")
    confirmation = control.reload_confirmation()
    assert confirmation is not None
    assert confirmation.version == "3f2a9c1b7e4d"


@pytest.mark.parametrize(
    ("key", "fix"),
    [
        ("governor:freeze", "`governor unfreeze` deletes it"),
        ("governor:overrides", "delete it (redis-cli DEL governor:overrides), then set the "),
        ("governor:tenants", "register the tenants again with `governor tenants set`"),
        ("governor:apikeys", "create the API keys again with `governor keys create`"),
        ("governor:override:tenant/acme/tokens_per_minute",
         "`governor override clear tenant/acme/tokens_per_minute` deletes it"),
    ],
)  # fmt: skip
def test_a_key_of_another_type_is_named_with_its_repair(
    control: ControlStore, db: redis.Redis[str], key: str, fix: str
) -> None:
    # WRONGTYPE said only "a key Governor owns was replaced by hand ...: delete it and
    # Governor rewrites it on the next tick": not which key, and Governor rewrites none of
    # these (the runbook promises the error names the key).
    control.set_override(TPM, 5, ttl_seconds=600, actor="alice", reason="x")
    db.delete(key)
    if key == "governor:overrides":
        db.set(key, "by hand")
    else:
        db.rpush(key, "by hand")
    held = "string" if key == "governor:overrides" else "list"

    with pytest.raises(SinkError) as raised:
        control.read()

    message = str(raised.value)
    assert "WRONGTYPE" in message
    assert f"({key} is a {held}, not the " in message
    assert fix in message
    assert "rewrites it on the next tick" not in message


def test_unfreeze_and_override_clear_repair_a_key_of_another_type(
    control: ControlStore, db: redis.Redis[str]
) -> None:
    # The repairs the messages name failed on the same WRONGTYPE they were to repair.
    db.hset("governor:freeze", "frozen", "yes")
    control.set_override(TPM, 5, ttl_seconds=600, actor="alice", reason="x")
    db.delete("governor:override:tenant/acme/tokens_per_minute")
    db.hset("governor:override:tenant/acme/tokens_per_minute", "value", "5")

    assert control.unfreeze() is None
    assert control.clear_override(TPM) is None

    assert db.exists("governor:freeze", "governor:override:tenant/acme/tokens_per_minute") == 0
    state = control.read()
    assert state.freeze is None
    assert state.overrides == {}


def test_an_override_is_not_half_written_beside_an_index_of_another_type(
    control: ControlStore, db: redis.Redis[str]
) -> None:
    # MULTI wrote the record and refused its ZADD: an override neither applied nor listed.
    db.set("governor:overrides", "by hand")

    with pytest.raises(SinkError, match=r"nothing written: governor:overrides is a string"):
        control.set_override(TPM, 5, ttl_seconds=600, actor="alice", reason="x")

    assert db.keys("governor:override:*") == []
