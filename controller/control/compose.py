"""The one composition root: how the journal and the controller are built from their parts,
for the daemon (`governor run`) and the simulator alike."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import redis

from controller.contract.keys import KeySchema
from controller.control.journaling import TickEvents
from controller.control.leader import Elector
from controller.control.overrides import ControlStore
from controller.control.process import tune_malloc
from controller.control.reconciler import Reconciler
from controller.control.reload import PolicyWatcher
from controller.control.reporting import TickReporter
from controller.control.telemetry import Health, Metrics
from controller.control.tick import Collaborators, Controller, SignalSource
from controller.control.writing import LeaderWrites
from controller.journal.writer import Journal
from controller.policy.policyset import PolicySet
from controller.settings import JournalSettings
from controller.sinks import Sink


def build_journal(client: redis.Redis[str], keys: KeySchema, settings: JournalSettings) -> Journal:
    """The journal on `client`, a connection without retries (`connect(..., retries=0)`):
    an emit must never stall a tick or a command behind Redis' back-off."""
    return Journal(client, keys, settings)


def build_controller(
    *,
    watcher: PolicyWatcher,
    source: SignalSource,
    control: ControlStore,
    elector: Elector,
    journal: Journal,
    sink: Sink,
    others: Sequence[tuple[str, Sink]] = (),
    publish: Callable[[PolicySet], None] | None = None,
    evicting: Callable[[], str | None] = lambda: None,
    metrics: Metrics,
    health: Health,
    dry_run: bool = False,
    runbook_base_url: str = "",
    clock: Callable[[], float] = time.time,
) -> Controller:
    """The controller over the primary `sink` (Governor's Redis: read back, `explain`) and
    the named `others` (Kong, Kubernetes...), every write fenced by the elector's token."""
    # A deposed leader's writes fail and its late events are marked, by the same fence.
    journal.fence = elector.fence
    for each in (sink, *(other for _, other in others)):
        each.fence = elector.fence
    reporter = TickReporter(metrics, health)
    writes = LeaderWrites(
        Reconciler(sink, journal, runbook_base_url=runbook_base_url),
        [
            Reconciler(other, journal, runbook_base_url=runbook_base_url, name=name)
            for name, other in others
        ],
        publish,
        reporter=reporter,
        dry_run=dry_run,
        evicting=evicting,
    )
    events = TickEvents(journal, runbook_base_url=runbook_base_url, dry_run=dry_run)
    tune_malloc()  # before the first tick: the heap's layout is settled by then
    return Controller(
        Collaborators(watcher, source, control, elector, writes), reporter, events, clock=clock
    )
