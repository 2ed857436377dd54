"""Addresses: equal ones hash alike however made, and survive a pickle into another process."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys

from controller.model import Address, LimitKind, Scope, interned


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
