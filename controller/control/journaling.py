"""The tick's own journal events (a policy set reloaded or rejected, a policy's transitions),
journalled by the replica that writes and only logged by a follower."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import structlog

from controller.contract.records import signals_to_list
from controller.control.reload import ERROR, ReloadOutcome
from controller.journal.events import CONTROLLER, JournalEvent, Kind, runbook_link
from controller.journal.writer import Journal
from controller.logging import mask_text
from controller.policy.engine import EngineState, Transition
from controller.policy.policyset import PolicySet

_REJECTED = {ERROR: "the policy reload failed (see the errors)"}
# The transitions made while signals are untrustworthy: their details say why each is
# (`stale-recovered` is made once they are usable again, `stale-ended` when an
# AdaptiveLimit's schedule closes, its signal no longer read: nothing to say there).
_ON_BAD_SIGNALS = frozenset({"stale-hold", "stale-released", "stale-engaged", "stale-fallback"})


class TickEvents:
    """Builds the tick's events and sends them to the journal while this replica writes."""

    def __init__(
        self, journal: Journal, *, runbook_base_url: str = "", dry_run: bool = False
    ) -> None:
        self.journal = journal
        self.runbook_base_url = runbook_base_url
        self.dry_run = dry_run
        self.journalling = False  # set each tick: whether this replica writes the stream
        self._log = structlog.get_logger("governor.loop")

    def emit(self, event: JournalEvent) -> None:
        """Journal the event if this replica writes; a follower logs it (no duplicate in the
        shared stream, and the new leader's engine, warm from evaluating, does not repeat it)."""
        if self.journalling:
            self.journal.emit(event)
        else:
            self._log.info(event.kind, journalled=False, reason=event.reason, policy=event.policy)

    def reloaded(self, outcome: ReloadOutcome, tick: int) -> None:
        """A new policy set took over from the one before (not the first load)."""
        assert outcome.policies is not None
        if outcome.previous_version is None:
            return
        self.emit(
            JournalEvent(
                kind=Kind.POLICY_RELOADED,
                actor=CONTROLLER,
                tick=tick,
                reason=f"policy set {outcome.previous_version} → {outcome.policies.version}",
                policy_version=outcome.policies.version,
                details={
                    "documents": [d.ref for d in outcome.policies.documents],
                    **_confirmed_by(outcome),
                },
            )
        )

    def rejected(self, outcome: ReloadOutcome, tick: int, directory: Path) -> None:
        """A change that was not taken; the set in force keeps acting."""
        keeps = f"version {outcome.previous_version} keeps running"
        removal = outcome.removal
        details: dict[str, object] = {
            "errors": [str(e) for e in outcome.errors[:20]],
            "reason": outcome.reason,
        }
        if removal is not None:
            details.update(
                version=removal.version,
                removed=list(removal.removed[:100]),
                limits_in_force=removal.total,
                confirm=f"governor policy confirm-reload {removal.version} --reason '...'",
            )
        why = (
            removal.explain(directory)
            if removal is not None
            else _REJECTED.get(outcome.reason or "", "the changed policy files are invalid")
        )
        self.emit(
            JournalEvent(
                kind=Kind.POLICY_REJECTED,
                actor=CONTROLLER,
                tick=tick,
                reason=f"{why}; {keeps}",
                policy_version=outcome.previous_version,
                details=details,
            )
        )

    def transitions(
        self,
        policies: PolicySet,
        transitions: Iterable[Transition],
        previous: EngineState,
        tick: int,
        invalid: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        """The policies' transitions that are news against the engine state before; a
        stale-* one says why each untrustworthy signal is (`invalid`: policy → name → why)."""
        runbooks = {d.ref: d.metadata.runbook for d in policies.documents}
        for t in _news(transitions, previous):
            details: dict[str, object] = {"event": t.event, "key": t.key}
            if t.event in _ON_BAD_SIGNALS and invalid is not None:
                # The readings carry NaN and a validity only; the query's error is the why.
                why = invalid.get(t.policy, {})
                details["invalid"] = {name: mask_text(text) for name, text in why.items()}
            reason = f"{t.policy} {t.event}" + (f" for {t.key}" if t.key else "")
            self.emit(
                JournalEvent(
                    kind=Kind.POLICY_TRANSITION,
                    actor=CONTROLLER,
                    reason=reason + (f": {mask_text(t.detail)}" if t.detail else ""),
                    tick=tick,
                    policy=t.policy,
                    policy_version=policies.version,
                    signals=tuple(signals_to_list(t.signals)),
                    runbook=runbook_link(runbooks.get(t.policy), self.runbook_base_url),
                    dry_run=self.dry_run,
                    details=details,
                )
            )


def _news(transitions: Iterable[Transition], previous: EngineState) -> list[Transition]:
    """The transitions worth a journal event: the engine reports `stale-hold` on every tick
    of a hold; only its first tick (the condition was trustworthy before) is news."""
    out = []
    for t in transitions:
        before = previous.conditions.get(t.policy, {}).get(t.key)
        if t.event == "stale-hold" and before is not None and before.invalid_since is not None:
            continue
        out.append(t)
    return out


def _confirmed_by(outcome: ReloadOutcome) -> dict[str, object]:
    """Who let a reload that removes many limits in, for its journal event."""
    confirmation = outcome.confirmation
    if confirmation is None:
        return {}
    return {"confirmed_by": confirmation.actor, "confirmation_reason": confirmation.reason}
