"""Addresses: equal ones hash alike however made, and survive a pickle into another process."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys

import pytest

from controller.model import (
    MODEL_NAME_MAX,
    Address,
    AddressError,
    LimitKind,
    Scope,
    interned,
    model_key,
)


def test_equal_addresses_hash_alike_however_they_are_made() -> None:
    parsed = Address.parse("tenant/acme/tokens_per_minute@gpt-4")
    built = Address(Scope.TENANT, LimitKind.TOKENS_PER_MINUTE, tenant="acme", model="gpt-4")
    replaced = dataclasses.replace(built, model=None)
    assert parsed == built
    assert hash(parsed) == hash(built)
    assert replaced == parsed.without_model()
    assert hash(replaced) == hash(parsed.without_model())
    assert {parsed: 1}[built] == 1
    assert "_hash" not in repr(parsed)


def test_an_address_from_another_process_hashes_as_here() -> None:
    # String hashes differ between processes: a pickled address must not carry its hash.
    code = (
        "import pickle, sys; from controller.model import Address; "
        "sys.stdout.buffer.write(pickle.dumps(Address.parse('tenant/acme/requests_per_minute')))"
    )
    data = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    theirs = pickle.loads(data)
    assert theirs == Address.parse("tenant/acme/requests_per_minute")
    assert {Address.parse("tenant/acme/requests_per_minute"): 1}[theirs] == 1


def test_interned_gives_one_instance_per_text() -> None:
    assert interned("plan/free/tokens_per_day") is interned("plan/free/tokens_per_day")


def test_a_model_is_kept_in_lower_case_and_may_be_named_org_slash_name() -> None:
    upper = Address.parse("plan/free/tokens_per_minute@GPT-4o")
    assert upper == Address.parse("plan/free/tokens_per_minute@gpt-4o")
    assert str(upper) == "plan/free/tokens_per_minute@gpt-4o"
    hf = Address.parse("tenant/acme/requests_per_minute@meta-llama/Llama-3.1-8B-Instruct")
    assert (hf.tenant, hf.model) == ("acme", "meta-llama/llama-3.1-8b-instruct")
    assert Address.parse(str(hf)) == hf
    # Only ASCII letters are lowered, as Lua's string.lower lowers them in the nginx module.
    assert model_key("Ünï-GPT") == "Ünï-gpt"


@pytest.mark.parametrize(
    "model", ["a//b", "a/", "/a", "-a", "a b", "a@b", "a" * (MODEL_NAME_MAX + 1), ""]
)
def test_a_model_name_that_is_none_is_refused_with_its_shape(model: str) -> None:
    with pytest.raises(AddressError) as refused:
        Address.parse(f"tenant/acme/requests_per_minute@{model}")
    assert "e.g. gpt-4o or meta-llama/Llama-3.1-8B-Instruct" in str(refused.value)
