"""What only the leader does in a tick: read the primary sink back, publish the plan catalog
(when Redis lacks the running version's), and write the limits to every sink."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from controller.control.reconciler import Reconciler, TickReport
from controller.control.reporting import TickReporter
from controller.errors import GovernorError
from controller.policy.policyset import PolicySet
from controller.policy.resolver import Resolution
from controller.sinks import SinkState
from controller.sinks.factory import split_supported


class LeaderWrites:
    """The leader's sinks and plan catalog, and what it last published."""

    def __init__(
        self,
        reconciler: Reconciler,
        extra_reconcilers: Sequence[Reconciler] = (),
        publish: Callable[[PolicySet], None] | None = None,
        *,
        reporter: TickReporter,
        dry_run: bool = False,
        evicting: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.reconciler = reconciler  # the primary sink (Redis): read back, seeds the resolver
        self.extra_reconcilers = tuple(extra_reconcilers)  # Kong, Kubernetes...: beside it
        # Publishes what gateways need from the policies (the plan catalog) when Redis does
        # not hold the running version's: asked every tick, as Redis may lose it.
        self.publish = publish
        # Why Governor's Redis may drop what is written by itself (`clients.redis.evicting`).
        self.evicting = evicting
        self.reporter = reporter
        self.dry_run = dry_run
        # Reads the primary sink back while the signal queries are in flight (see read_back).
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="governor-read")
        # The version this process last read from or wrote to the primary: one read back at
        # 0 with an empty ledger after it was above 0 means Redis lost everything.
        self._last_version = 0

    def read_back(self) -> Future[SinkState]:
        """What the primary sink holds, read in a thread: it does not depend on the signals,
        so it is read while the queries are in flight (the fetch mostly waits on Prometheus;
        at 100k tenants the read-back is a seventh of a tick). A failed read fails the write."""
        return self._reader.submit(contextvars.copy_context().run, self.reconciler.sink.read)

    def catalog(self, policies: PolicySet, reasons: list[str]) -> None:
        """Publish the plan catalog of `policies` unless Redis holds it already; a Redis that
        evicts keys when full is a reason against readiness (every tick: a policy is a
        setting anyone may change)."""
        problem = self.evicting()
        if problem is not None:
            reasons.append(problem)
        # A dry run writes nothing: its plans would replace what every gateway enforces.
        if self.publish is None or self.dry_run:
            return
        try:
            self.publish(policies)
        except GovernorError as exc:
            self.reporter.redis_failed("catalog")
            reasons.append(f"cannot publish the plan catalog: {exc}")

    def _emptied(self, read: SinkState, tick: int) -> None:
        """Say so when Redis came back without anything this process wrote there (restarted
        without persistence, flushed, replaced): the tick writes the limits and the catalog
        again, but what only Redis held is gone, and nothing else would say it."""
        if read.version == 0 and not read.written and self._last_version > 0:
            self.reporter.redis_emptied(self._last_version, tick)
        self._last_version = read.version

    def limits(
        self,
        policies: PolicySet,
        resolution: Resolution,
        tick: int,
        state: Future[SinkState],
        reasons: list[str],
    ) -> TickReport | None:
        """Write the desired limits to every sink; the primary's report (None: it failed)."""
        runbooks = {d.ref: d.metadata.runbook for d in policies.documents if d.metadata.runbook}
        for extra in self.extra_reconcilers:
            # Every further sink (Kong, Kubernetes...) gets the limits it can hold and its
            # own drift report; a failing one never stops the primary sink.
            kept, skipped = split_supported(extra.sink, resolution.desired)
            self.reporter.unsupported(extra.name, skipped)
            try:
                extra.tick(
                    kept,
                    tick=tick,
                    policy_version=policies.version,
                    dry_run=self.dry_run,
                    runbooks=runbooks,
                )
            except GovernorError as exc:
                self.reporter.sink_failed(exc, extra.name)
                reasons.append(f"cannot write limits to {extra.name}: {exc}")
        try:
            read = state.result()
            self._emptied(read, tick)
            report = self.reconciler.tick(
                resolution.desired,
                tick=tick,
                policy_version=policies.version,
                dry_run=self.dry_run,
                runbooks=runbooks,
                state=read,
            )
        except GovernorError as exc:
            self.reporter.sink_failed(exc)
            reasons.append(f"cannot write limits: {exc}")
            return None
        if report.result is not None:  # what this tick wrote counts as seen
            self._last_version = max(self._last_version, report.result.version)
        return report
