"""Level-triggered reconciliation, the pure part: desired vs actual → changes; drift. No I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from controller.model import Address


@dataclass(frozen=True, slots=True)
class Change:
    """One limit to write (`new` set) or delete (`new` None); `old` is what was read."""

    address: Address
    old: float | None
    new: float | None


@dataclass(frozen=True, slots=True)
class Drift:
    """A limit whose stored value is not what Governor last wrote: someone edited it."""

    address: Address
    written: float | None  # what Governor last wrote (None: it never wrote this address)
    actual: float | None  # what is there now (None: deleted; NaN: not a number)


def diff(desired: Mapping[Address, float], actual: Mapping[Address, float]) -> list[Change]:
    """Changes that make `actual` equal `desired`, sorted by address; [] when they match.

    Pure: no side effects. An address in `actual` but not in `desired` is deleted.
    """
    get = actual.get
    # Plain `!=` on floats: None (absent) differs from any value, and NaN (a hand-written
    # non-number) from everything, itself included, so it is always rewritten.
    changes = [
        Change(address, get(address), value)
        for address, value in desired.items()
        if get(address) != value
    ]
    changes.extend(Change(a, v, None) for a, v in actual.items() if a not in desired)
    changes.sort(key=lambda c: str(c.address))
    return changes


def find_drift(actual: Mapping[Address, float], written: Mapping[Address, float]) -> list[Drift]:
    """Addresses whose stored value differs from Governor's ledger, sorted. Pure."""
    get = actual.get
    # As in `diff`: a NaN on either side is always drift.
    found = [Drift(a, value, get(a)) for a, value in written.items() if get(a) != value]
    found.extend(Drift(a, None, value) for a, value in actual.items() if a not in written)
    return sorted(found, key=lambda d: str(d.address))
