"""One reconcile per tick: read actual, diff against the desired decisions, apply, journal."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import structlog

from controller.changes import Change, Drift, diff
from controller.journal.events import JournalEvent, Kind, change_events, drift_events
from controller.journal.writer import Journal
from controller.model import Address, Decision
from controller.sinks import ApplyResult, PartialApplyError, Sink, SinkState


@runtime_checkable
class DecisionRecorder(Protocol):
    """A sink that can also keep each address's last decision for `governor explain`."""

    def record_decisions(self, decisions: Mapping[Address, Decision], tick: int | None) -> int:
        """Store the decisions that changed; return how many records were written."""
        ...


@dataclass(frozen=True)
class TickReport:
    """What one reconcile found and did."""

    changes: tuple[Change, ...]  # journalled as changed: not those the sink held back waiting
    drift: tuple[Drift, ...]
    result: ApplyResult | None  # None: dry run, nothing written
    dry_run: bool


class Reconciler:
    """Level-triggered: every tick compares the full desired state with what the sink holds."""

    def __init__(
        self, sink: Sink, journal: Journal, *, runbook_base_url: str = "", name: str = ""
    ) -> None:
        self.sink = sink
        self.journal = journal
        self.runbook_base_url = runbook_base_url
        self.name = name  # which sink, in every event, when the daemon drives several
        self._reported_drift: set[Drift] = set()
        self._reported_foreign: set[str] = set()
        self._log = structlog.get_logger("governor.reconciler")

    def tick(
        self,
        decisions: Mapping[Address, Decision],
        *,
        tick: int,
        policy_version: str | None,
        dry_run: bool = False,
        runbooks: Mapping[str, str] | None = None,
        state: SinkState | None = None,
    ) -> TickReport:
        """Make the sink hold exactly `decisions` (the full desired state); journal each change.

        Drift (a value someone else wrote) is journalled once per distinct edit, then
        overwritten like any other difference. In a dry run nothing is written to the sink.
        `state`: the sink as read earlier in the tick (default: read it now).
        """
        if state is None:
            state = self.sink.read()
        drift = tuple(state.drift)
        for event in drift_events([d for d in drift if d not in self._reported_drift], tick=tick):
            self._emit(event)
        self._reported_drift = set(drift)
        # Once per entry while it stays (a hand-made field, or one an older version spelled
        # otherwise, as `limit@GPT-4` before models were kept in lower case): not every tick.
        for entry in state.foreign:
            if entry not in self._reported_foreign:
                self._log.warning("limit.foreign_entry", entry=entry, tick=tick)
        self._reported_foreign = set(state.foreign)
        # The plain dict, not the Mapping wrapper: 100k lookups per tick.
        changes = diff({a: d.value for a, d in decisions.items()}, state.actual)
        journalled = functools.partial(
            self._journal_changes,
            decisions=decisions,
            tick=tick,
            policy_version=policy_version,
            dry_run=dry_run,
            runbooks=runbooks,
        )
        try:
            result = None if dry_run else self.sink.apply(changes)
        except PartialApplyError as exc:
            # What landed is in force and the next diff will not show it: journal it now.
            journalled(exc.applied)
            raise
        if result is not None and result.waiting:
            # Held back by the sink (a Kong consumer missing, logged there with why): not in
            # force, so not journalled as changed; the tick that writes them journals them.
            waits = {change.address for change in result.waiting}
            changes = [change for change in changes if change.address not in waits]
        journalled(changes)
        if result is not None and result.mismatched:
            self._report_mismatch(result, tick)
        if isinstance(self.sink, DecisionRecorder):
            self.sink.record_decisions(decisions, tick)
        return TickReport(tuple(changes), drift, result, dry_run)

    def _journal_changes(
        self,
        changes: Sequence[Change],
        *,
        decisions: Mapping[Address, Decision],
        tick: int,
        policy_version: str | None,
        dry_run: bool,
        runbooks: Mapping[str, str] | None,
    ) -> None:
        for event in change_events(
            changes,
            decisions,
            tick=tick,
            policy_version=policy_version,
            dry_run=dry_run,
            runbooks=runbooks,
            runbook_base_url=self.runbook_base_url,
        ):
            self._emit(event)

    def _emit(self, event: JournalEvent) -> None:
        if self.name:
            event = dataclasses.replace(event, details={**event.details, "sink": self.name})
        self.journal.emit(event)

    def _report_mismatch(self, result: ApplyResult, tick: int) -> None:
        for change in result.mismatched:
            self._emit(
                JournalEvent(
                    kind=Kind.VERIFY_FAILED,
                    actor="controller",
                    reason="read back after writing, the value differs (a concurrent writer?); "
                    "the next tick retries",
                    address=str(change.address),
                    old=change.old,
                    new=change.new,
                    tick=tick,
                )
            )
