"""Journal events, pure: their kinds, their shape in the stream, and the events of a tick's
changes and drift. Written by `journal.writer`, read back by `journal.reader`."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.changes import Change, Drift
from controller.contract.records import signals_to_list
from controller.model import Address, Decision

CONTROLLER = "controller"
# The stream field that marks an event appended by a replica whose fence was stale.
STALE_LEADER = "stale_leader"


class Kind:
    """Event names (the `event` of the log line, `kind` in the stream)."""

    LIMIT_CHANGED = "limit.changed"
    LIMIT_DRIFT = "limit.drift"
    VERIFY_FAILED = "limit.verify_failed"
    OVERRIDE_SET = "override.set"
    OVERRIDE_CLEARED = "override.cleared"
    FREEZE_SET = "freeze.set"
    FREEZE_CLEARED = "freeze.cleared"
    TENANT_SET = "tenant.set"
    KEY_CREATED = "key.created"  # an API key made (details: key id, tenant, plan, user)
    KEY_REVOKED = "key.revoked"
    GAP = "journal.gap"
    POLICY_TRANSITION = "policy.transition"  # a policy engaged or released (per label value)
    POLICY_RELOADED = "policy.reloaded"
    POLICY_REJECTED = "policy.rejected"  # a changed policy directory was invalid or refused
    POLICY_CONFIRMED = "policy.confirmed"  # a person confirmed a reload that removes limits
    UNREADABLE = "journal.unreadable"  # a stream entry Governor did not write (shown, not fatal)


@dataclass(frozen=True)
class JournalEvent:
    """One journal entry. `old`/`new` None: the limit did not exist / was removed."""

    kind: str
    actor: str
    reason: str
    address: str | None = None
    old: float | None = None
    new: float | None = None
    tick: int | None = None
    policy: str | None = None
    policy_version: str | None = None
    source: str | None = None
    signals: tuple[Mapping[str, Any], ...] = ()
    runbook: str | None = None
    dry_run: bool = False
    details: Mapping[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_dict(self) -> dict[str, Any]:
        # By hand, in field order: dataclasses.asdict deep-copies every value generically,
        # which at thousands of events per tick cost more than writing them to Redis.
        return {
            "kind": self.kind,
            "actor": self.actor,
            "reason": self.reason,
            "address": self.address,
            "old": self.old,
            "new": self.new,
            "tick": self.tick,
            "policy": self.policy,
            "policy_version": self.policy_version,
            "source": self.source,
            "signals": [dict(s) for s in self.signals],
            "runbook": self.runbook,
            "dry_run": self.dry_run,
            "details": dict(self.details),
            "at": self.at,
            "event_id": self.event_id,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JournalEvent:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["signals"] = tuple(known.get("signals") or ())
        return cls(**known)


@dataclass(frozen=True)
class JournalEntry:
    """An event as stored in the stream, with its stream id (`<ms>-<seq>`). `stale_leader`:
    the replica that appended it no longer held the leader fence (a deposed leader waking
    up), so it is not a decision that was in force."""

    id: str
    event: JournalEvent
    stale_leader: bool = False


def gap_event(count: int) -> JournalEvent:
    return JournalEvent(
        kind=Kind.GAP,
        actor=CONTROLLER,
        reason=f"{count} events were dropped while Redis was unreachable (buffer full); "
        "they are in the controller's stdout log",
        details={"dropped": count},
    )


def stream_fields(event: JournalEvent, data: Mapping[str, Any]) -> dict[str, str]:
    """The stream entry of `event`, whose `to_dict()` is `data` (computed once by the caller)."""
    return {
        "kind": event.kind,
        "address": event.address or "",
        "data": json.dumps(data, sort_keys=True, allow_nan=False),
    }


def stored_entry(entry_id: str, fields: Mapping[str, str]) -> JournalEntry:
    try:
        event = checked_event(json.loads(fields["data"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # One entry written by hand made `audit tail` and `explain` fail outright: show it
        # as what it is instead (the CLI escapes its text like any other).
        event = JournalEvent(
            Kind.UNREADABLE,
            actor="?",
            reason=f"not an event Governor writes ({type(exc).__name__}): {dict(fields)!r:.200}",
            at=int(entry_id.partition("-")[0]) / 1000 if entry_id[:1].isdigit() else 0.0,
        )
    return JournalEntry(entry_id, event, fields.get(STALE_LEADER) == "1")


def checked_event(data: Mapping[str, Any]) -> JournalEvent:
    """A stored event; TypeError when a field the readers format has the wrong type."""
    event = JournalEvent.from_dict(data)
    texts = (event.kind, event.actor, event.reason)
    numbers = (event.at, *(v for v in (event.old, event.new) if v is not None))
    if (
        not all(isinstance(t, str) for t in texts)
        or not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers)
        or not isinstance(event.details, Mapping)
    ):
        raise TypeError("a field of the wrong type")
    return event


def runbook_link(runbook: str | None, base_url: str) -> str | None:
    """An absolute runbook URL: relative paths are joined to the configured base."""
    if not runbook or "://" in runbook:
        return runbook
    return base_url.rstrip("/") + "/" + runbook.lstrip("/")


def change_events(
    changes: Sequence[Change],
    decisions: Mapping[Address, Decision],
    *,
    tick: int | None,
    policy_version: str | None,
    dry_run: bool,
    runbooks: Mapping[str, str] | None = None,
    runbook_base_url: str = "",
) -> Iterator[JournalEvent]:
    """One `limit.changed` event per change, with the decision (policy, signals) behind it;
    made one at a time (the first tick journals every limit: 100k events never coexist)."""
    for change in changes:
        decision = decisions.get(change.address)
        policy = decision.policy if decision else None
        runbook = (runbooks or {}).get(policy or "")
        yield JournalEvent(
            kind=Kind.LIMIT_CHANGED,
            actor=CONTROLLER,
            reason=decision.reason if decision else "no longer in the desired state",
            address=str(change.address),
            old=None if change.old is None or math.isnan(change.old) else change.old,
            new=change.new,
            tick=tick,
            policy=policy,
            policy_version=policy_version,
            source=str(decision.source) if decision else None,
            signals=tuple(signals_to_list(decision.signals)) if decision else (),
            runbook=runbook_link(runbook, runbook_base_url),
            dry_run=dry_run,
        )


def drift_events(drift: Sequence[Drift], *, tick: int | None) -> list[JournalEvent]:
    """One `limit.drift` event per limit someone else edited (old: ours, new: found)."""
    return [
        JournalEvent(
            kind=Kind.LIMIT_DRIFT,
            actor=CONTROLLER,
            reason="the stored value differs from what Governor last wrote (edited by hand?); "
            "it is reconciled to the desired value",
            address=str(d.address),
            old=d.written,
            new=None if d.actual is None or math.isnan(d.actual) else d.actual,
            tick=tick,
            details={"not_a_number": d.actual is not None and math.isnan(d.actual)},
        )
        for d in drift
    ]
