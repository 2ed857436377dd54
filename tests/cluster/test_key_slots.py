"""Server-free: contract 2 puts the keys of every script call and every transaction in one
Cluster slot (by redis-py's own `key_slot`), and contract 1's names stay as they were."""

from __future__ import annotations

import itertools

import pytest
from redis.crc import key_slot

from controller.contract.enforcement import EnforcementKeys, ip_id
from controller.contract.keys import KeySchema
from controller.contract.slots import SLOTS, slot_of, slot_tags
from controller.model import Address

V2 = KeySchema("governor", sharded=True)
TENANTS = ["acme", "globex", "a:b", "t" * 128, "x.y-z_1"]
USERS = [None, "alice", "u:1"]
IPS = [None, "10.0.0.7", ip_id("2001:db8::1")]
MODELS = [None, "gpt-4", "llama-3.1-8b"]


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


def one_slot(keys: tuple[str, ...] | list[str]) -> bool:
    return len({slot(key) for key in keys}) == 1


def addresses() -> list[Address]:
    found = []
    for limit, model in itertools.product(("requests_per_minute", "tokens_per_day"), MODELS):
        suffix = f"{limit}@{model}" if model else limit
        found += [Address.parse(f"global/{suffix}"), Address.parse(f"ip/{suffix}")]
        found += [Address.parse(f"plan/free/{suffix}"), Address.parse(f"plan/p:2/{suffix}")]
        for tenant in TENANTS:
            found.append(Address.parse(f"tenant/{tenant}/{suffix}"))
            found += [Address.parse(f"user/{tenant}/{u}/{suffix}") for u in USERS if u]
    return found


def test_our_slot_function_is_redis_own() -> None:
    keys = ["a", "{a}b", "a{}b", "{{x}}", "x{y}{z}", "{t:acme}:limits", "é{ü}", "{", "}{a}"]
    keys += [str(a) for a in addresses()]
    assert [slot_of(k) for k in keys] == [slot(k) for k in keys]
    tags = slot_tags()
    assert len(tags) == SLOTS
    assert [slot("{" + tag + "}") for tag in tags] == list(range(SLOTS))


def test_the_shared_keys_sit_in_one_slot() -> None:
    shared = [
        V2.contract, V2.version, V2.catalog, V2.catalog_version, V2.leader, V2.leader_epoch,
        V2.override_index, V2.freeze, V2.journal, V2.tenants, V2.api_keys, V2.gateways,
        V2.reload_confirmation,
        V2.owner(Address.parse("global/requests_per_minute")),
        V2.owner(Address.parse("ip/requests_per_minute")),
        V2.owner(Address.parse("plan/free/tokens_per_day@gpt-4")),
        *[V2.override(a) for a in addresses()],  # the index and each override: one MULTI
        EnforcementKeys(V2).global_level().state, EnforcementKeys(V2).global_level().leases,
    ]  # fmt: skip
    assert one_slot(shared)


@pytest.mark.parametrize(("tenant", "user", "ip"), list(itertools.product(TENANTS, USERS, IPS)))
def test_each_admission_call_keeps_to_one_slot(
    tenant: str, user: str | None, ip: str | None
) -> None:
    groups = EnforcementKeys(V2).admit_groups(tenant, user, ip)
    assert len(groups) == (3 if ip else 2)
    for keys in groups:
        assert one_slot(keys), keys
    assert V2.version in groups[0]
    # The tenant's call also holds its limits' hashes' slot: one tag per tenant.
    assert slot(groups[-1][0]) == slot(V2.owner(Address.parse(f"tenant/{tenant}/tokens_per_day")))


def test_each_write_keeps_to_its_owners_slot() -> None:
    owners = {V2.owner(address) for address in addresses()}
    for owner in owners:  # the limits, their ledger, decision records and fence: one MULTI
        assert one_slot([owner, V2.ledger_of(owner), V2.decisions_of(owner), V2.fence_of(owner)])
    for tenant in TENANTS:  # everything of one tenant shares its tag
        keys = EnforcementKeys(V2)
        mine = [V2.owner(a) for a in addresses() if a.tenant == tenant]
        mine += [keys.credits(tenant), keys.credit_history(tenant), keys.tenant_level(tenant).state]
        mine += [keys.user_level(tenant, "alice").leases]
        mine += [V2.response(tenant, "resp_0a1b"), V2.response(tenant, "r:1")]  # its answers
        assert one_slot(mine)
    ledgers = V2.ledgers()
    assert len(set(ledgers)) == SLOTS
    assert sorted(slot(key) for key in ledgers) == list(range(SLOTS))


def test_ip_state_has_its_own_tag() -> None:
    level = EnforcementKeys(V2).ip_level("10.0.0.7")
    assert level.state == "governor:{ip:10.0.0.7}:enforce"
    assert one_slot([level.state, level.leases])


def test_contract_1_names_are_unchanged() -> None:
    v1 = KeySchema("governor")
    keys = EnforcementKeys(v1)
    assert (v1.contract_version, V2.contract_version) == (1, 2)
    assert [v1.version, v1.written, v1.decisions, v1.leader, v1.leader_epoch, v1.catalog] == [
        "governor:version", "governor:written", "governor:decisions", "governor:leader",
        "governor:leader:epoch", "governor:plans",
    ]  # fmt: skip
    assert v1.owner(Address.parse("global/requests_per_minute")) == "governor:limits:global"
    assert v1.owner(Address.parse("plan/free/tokens_per_day")) == "governor:limits:plan:free"
    assert v1.override(Address.parse("global/requests_per_minute")) == (
        "governor:override:global/requests_per_minute"
    )
    assert keys.global_level().state == "governor:enforce:global"
    assert v1.response("a:b", "resp:1") == V2.response("a:b", "resp:1")
    assert v1.response("a:b", "resp:1") == "governor:{t:a%3Ab}:response:resp%3A1"
    with pytest.raises(ValueError, match="response id"):
        v1.response("acme", "resp}{g")  # never a key: it would open another hash tag
    assert keys.ip_level("10.0.0.7").leases == "governor:enforce:ip:10.0.0.7:leases"
    assert v1.ledger_of("governor:{t:acme}:limits") == "governor:written"
    assert v1.ledgers() == ("governor:written",)
    assert V2.version == "governor:{g}:version"
