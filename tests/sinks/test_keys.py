"""The key schema: hostile tenant and user ids are rejected or cannot reach other tenants."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.contract.keys import KeySchema, format_value, limit_field, parse_value
from controller.errors import ConfigurationError
from controller.model import Address, AddressError, LimitKind, Scope

KEYS = KeySchema("governor")
TPM = LimitKind.TOKENS_PER_MINUTE
HOSTILE = ["a}{b", "acme/../evil", "*", "x\ny", "a" * 10_000, "ünïcødé", "", "{t:evil}", "a b"]


@pytest.mark.parametrize("tenant", HOSTILE)
def test_hostile_tenant_ids_are_rejected_with_a_clear_error(tenant: str) -> None:
    address = Address(Scope.TENANT, TPM, tenant=tenant)
    with pytest.raises(AddressError, match="tenant is not a safe id"):
        KEYS.owner(address)
    with pytest.raises(AddressError):
        KEYS.override(address)


@pytest.mark.parametrize("user", HOSTILE)
def test_hostile_user_ids_are_rejected(user: str) -> None:
    with pytest.raises(AddressError, match="user is not a safe id"):
        KEYS.owner(Address(Scope.USER, TPM, tenant="acme", user=user))


def test_error_for_a_huge_id_is_short() -> None:
    with pytest.raises(AddressError) as info:
        KEYS.owner(Address(Scope.TENANT, TPM, tenant="a" * 10_000))
    assert len(str(info.value)) < 400
    assert "10000 characters" in str(info.value)


def test_ids_that_do_not_belong_to_the_scope_are_rejected() -> None:
    with pytest.raises(AddressError, match="has no tenant"):
        KEYS.owner(Address(Scope.GLOBAL, TPM, tenant="acme"))


def test_model_names_are_checked_by_the_parser() -> None:
    with pytest.raises(AddressError):
        KEYS.owner(Address(Scope.TENANT, TPM, tenant="acme", model="gpt}{4"))


def test_key_layout_matches_the_contract() -> None:
    assert KEYS.owner(Address.parse("global/requests_per_second")) == "governor:limits:global"
    assert KEYS.owner(Address.parse("ip/requests_per_minute")) == "governor:limits:ip"
    assert KEYS.owner(Address.parse("plan/free/tokens_per_day")) == "governor:limits:plan:free"
    assert KEYS.owner_and_field(Address.parse("tenant/acme/tokens_per_minute@gpt-4")) == (
        "governor:{t:acme}:limits",
        "tokens_per_minute@gpt-4",
    )
    assert KEYS.owner(Address.parse("user/acme/u:1/requests_per_minute")) == (
        "governor:{t:acme}:user:u%3A1:limits"
    )
    assert KEYS.tenant_tag("a:b") == "{t:a%3Ab}"


ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:+=~-]{0,12}", fullmatch=True)


@given(t1=ids, u1=ids, t2=ids, u2=ids)
def test_keys_are_injective_and_carry_only_their_own_tenant_tag(
    t1: str, u1: str, t2: str, u2: str
) -> None:
    first = Address(Scope.USER, TPM, tenant=t1, user=u1)
    second = Address(Scope.USER, TPM, tenant=t2, user=u2)
    if (t1, u1) != (t2, u2):
        assert KEYS.owner(first) != KEYS.owner(second)
    tenant_key = KEYS.owner(Address(Scope.TENANT, TPM, tenant=t2))
    assert KEYS.owner(first) != tenant_key
    # Exactly one hash tag per key, and it is the tenant's own (Cluster slot = tenant).
    assert re.findall(r"\{[^}]*\}", KEYS.owner(first)) == [KEYS.tenant_tag(t1)]


@pytest.mark.parametrize("prefix", ["", "gov{x}", "a:b", "a*", "é", "x" * 65])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ConfigurationError, match="GOVERNOR_REDIS__KEY_PREFIX"):
        KeySchema(prefix)


def test_values_round_trip_and_integers_have_no_decimal_point() -> None:
    assert format_value(600.0) == "600"
    assert format_value(600) == "600"  # a plain int (no is_integer() before Python 3.12)
    assert format_value(12.5) == "12.5"
    assert parse_value(format_value(0.1)) == 0.1
    assert parse_value("abc") != parse_value("abc")  # NaN: a hand-written non-number
    with pytest.raises(ValueError, match="not a finite number"):
        format_value(float("inf"))
    assert limit_field(Address.parse("global/tokens_per_minute@m:1")) == "tokens_per_minute@m:1"
