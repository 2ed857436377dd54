"""JSON records Governor keeps in Redis: decisions (read by `explain`) and overrides."""

from __future__ import annotations

import json
import math
from typing import Any

from controller.model import Address, Decision, Override, Proposal, SignalReading, Source


def _signal(reading: SignalReading) -> dict[str, Any]:
    # An untrustworthy reading is NaN in the model; JSON has no NaN: null, and `validity`
    # says why (a record that cannot be serialized would wedge the journal and the tick).
    return {
        "name": reading.name,
        "value": _finite(reading.value),
        "timestamp": _finite(reading.timestamp),
        "validity": str(reading.validity),
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def signals_to_list(readings: tuple[SignalReading, ...]) -> list[dict[str, Any]]:
    """Signal readings as plain JSON objects (name, value, timestamp, validity)."""
    return [_signal(r) for r in readings]


def _proposal(proposal: Proposal) -> dict[str, Any]:
    return {
        "value": proposal.value,
        "policy": proposal.policy,
        "reason": proposal.reason,
        "signals": signals_to_list(proposal.signals),
    }


def decision_key(decision: Decision) -> tuple[object, ...]:
    """What makes a decision a different one: its value, where it came from and every
    proposal's value and policy. The signal readings, and so the reason of a policy that
    quotes them, are left out: a record is rewritten when the decision changes, not every
    time a signal moves (its `tick` and `decided_at` say when it was made)."""
    return (
        decision.value,
        decision.source,
        decision.policy,
        decision.baseline,
        decision.adjustments,
        # Other sources' reasons (an override's, pacing's) are part of the decision.
        decision.reason if decision.source is not Source.POLICY else None,
        tuple([(p.value, p.policy) for p in decision.proposals]),
    )


def decision_to_json(decision: Decision, *, tick: int | None, at: float) -> str:
    """The last-decision record of one address (contract: `<prefix>:decisions`)."""
    return json.dumps(
        {
            "address": str(decision.address),
            "value": decision.value,
            "source": str(decision.source),
            "policy": decision.policy,
            "reason": decision.reason,
            "baseline": decision.baseline,
            "adjustments": list(decision.adjustments),
            "signals": signals_to_list(decision.signals),
            "proposals": [_proposal(p) for p in decision.proposals],
            "tick": tick,
            "decided_at": at,
        },
        sort_keys=True,
        allow_nan=False,
    )


def override_to_json(override: Override, *, set_at: float) -> str:
    """An override record (contract: `<prefix>:override:<address>`)."""
    return json.dumps(
        {
            "address": str(override.address),
            "value": override.value,
            "expires_at": override.expires_at,
            "actor": override.actor,
            "reason": override.reason,
            "set_at": set_at,
        },
        sort_keys=True,
        allow_nan=False,
    )


def override_from_json(text: str, *, expires_at: float | None = None) -> Override:
    """An override record; `expires_at` (from the key's TTL) wins over the stored one."""
    data = json.loads(text)
    value = float(data["value"])
    if not (math.isfinite(value) and value >= 0):  # NaN would pin a limit no gateway reads
        raise ValueError(f"override value {value!r} is not a finite number >= 0")
    return Override(
        address=Address.parse(data["address"]),
        value=value,
        expires_at=float(data["expires_at"] if expires_at is None else expires_at),
        actor=str(data["actor"]),
        reason=str(data["reason"]),
    )
