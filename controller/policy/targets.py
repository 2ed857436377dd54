"""A policy target's address per label value, filled once per process (label values repeat)."""

from __future__ import annotations

from controller.model import Address, AddressTemplate

# (target, label) → label value → address. Plain dicts: an lru_cache's per-entry links would
# double their memory.
_FILLED: dict[tuple[AddressTemplate, str | None], dict[str, Address]] = {}
_FILLED_MAX = 1 << 20  # per target; beyond any deployment (tenants churn: start over)


def filled(target: AddressTemplate, label: str | None) -> dict[str, Address]:
    """The addresses of `target` filled so far, by label value (shared by every tick)."""
    return _FILLED.setdefault((target, label), {})


def fill(
    found: dict[str, Address], target: AddressTemplate, label: str | None, key: str
) -> Address:
    """The address `target` names for one label value, remembered in `found` (from
    `filled`); raise AddressError when the value cannot form one."""
    address = target.fill({label: key} if label is not None else {})
    if len(found) >= _FILLED_MAX:
        found.clear()
    found[key] = address
    return address
