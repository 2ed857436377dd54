"""How old the data behind a query result is: the newest raw sample of each selector it reads.

Prometheus stamps an instant-query answer with the evaluation time and, within its 5-minute
lookback, keeps answering with the last sample of a series that stopped being written; a
`rate(x[5m])` keeps a value for 5 minutes after `x` went away. So the age of a result is
asked separately, as `max(timestamp(selector))` per selector the query reads.

A selector with no sample in that window is absent. For most signals that makes the data
unknown (stale); a signal with `absent: zero` counts events that may not have happened yet,
so its absent selectors are left out of its age (`of(..., absent_ok=True)`).

A signal with `history: D` reads D into the past. Until Prometheus holds a sample of each of
its selectors from D ago (`History`), an empty answer means "not enough history yet".

That costs a pass over the selector's series, so an answer may be reused for
`refresh_seconds`. A reused time is a lower bound of the true newest-sample time (it only
grows), so ages are over-estimated by at most `refresh_seconds`, never under-estimated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from controller.signals.promql import freshness_query, history_query

# A selector with no sample in Prometheus' lookback window (5 m by default): its age is
# unknown and large, so every stale_after check fails.
UNKNOWN_SAMPLE_TIME = 0.0


class Answered(Protocol):
    """What a freshness answer must offer: Prometheus' result list or an error."""

    @property
    def result(self) -> Sequence[Any]: ...

    @property
    def error(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class _Known:
    asked_at: float
    newest: float


@dataclass
class SampleTimes:
    """Newest-sample times per selector, asked at most every `refresh_seconds`."""

    refresh_seconds: float = 0.0
    _known: dict[str, _Known] = field(default_factory=dict)
    _failed: dict[str, str] = field(default_factory=dict)

    def due(self, selectors: Sequence[str], now: float) -> list[str]:
        """The freshness queries to run at `now` for these selectors."""
        out = []
        for selector in dict.fromkeys(selectors):
            known = self._known.get(selector)
            if known is None or not 0 <= now - known.asked_at < self.refresh_seconds:
                out.append(freshness_query(selector))
        return out

    def update(self, selectors: Sequence[str], answers: Mapping[str, Answered], now: float) -> None:
        """Record the answers of the freshness queries that were run."""
        self._failed.clear()
        for selector in selectors:
            answer = answers.get(freshness_query(selector))
            if answer is None:
                continue
            newest = answer.error if answer.error is not None else _read_newest(answer, now)
            if isinstance(newest, str):
                self._known.pop(selector, None)
                self._failed[selector] = newest
                continue
            self._known[selector] = _Known(now, newest)

    def of(
        self, reads: Sequence[str], now: float, absent_ok: bool = False
    ) -> tuple[float, str] | str:
        """The time of the data behind a query reading `reads`: the oldest of their newest
        samples (every input must be fresh), with a note; or why it cannot be told. A query
        reading no series (`vector(1)`, `time()`) is as fresh as its evaluation. With
        `absent_ok`, a selector without any sample is left out (absent, not old)."""
        oldest, notes = now, []
        for selector in reads:
            if selector in self._failed:
                return f"cannot tell the age of {selector}: {self._failed[selector]}"
            known = self._known.get(selector)
            newest = UNKNOWN_SAMPLE_TIME if known is None else known.newest
            if newest == UNKNOWN_SAMPLE_TIME and absent_ok:
                notes.append(f"no series of {selector} yet (absent: zero)")
                continue
            if newest == UNKNOWN_SAMPLE_TIME:
                notes.append(f"no sample of {selector} within Prometheus' lookback window")
            oldest = min(oldest, newest)
        return oldest, "; ".join(notes)


@dataclass
class History:
    """Whether Prometheus holds each selector's samples from far enough back. Asked every
    tick until it does, then again only after its signal answers empty (history, once there,
    stays while Prometheus keeps its data; a Prometheus replaced or restarted without its
    volume has lost it, and its empty answers are waiting for history again, not a fault)."""

    _held: set[tuple[str, float]] = field(default_factory=set)

    def due(self, needs: Mapping[str, float], now: float) -> dict[str, tuple[str, float]]:
        """The probe queries to run at `now`: query → (selector, seconds back)."""
        return {
            history_query(selector, now - back): (selector, back)
            for selector, back in needs.items()
            if (selector, back) not in self._held
        }

    def update(
        self, probes: Mapping[str, tuple[str, float]], answers: Mapping[str, Answered]
    ) -> None:
        """Record which probes found a sample (a failed probe proves nothing: asked again)."""
        for query, held in probes.items():
            answer = answers.get(query)
            if answer is None or answer.error is not None:
                continue
            newest = _read_newest(answer, math.inf)
            if not isinstance(newest, str) and newest != UNKNOWN_SAMPLE_TIME:
                self._held.add(held)

    def forget(self, reads: Sequence[str], back: float) -> None:
        """Ask again, from the next fetch, whether these selectors hold samples `back` ago."""
        self._held.difference_update((selector, back) for selector in reads)

    def lacking(self, reads: Sequence[str], back: float) -> list[str]:
        """The selectors of `reads` without a sample from `back` seconds ago (yet)."""
        return [selector for selector in reads if (selector, back) not in self._held]


# How far past the evaluation time a newest-sample time may be (the answer carries
# milliseconds; the evaluation time is sent with three decimals).
_CLOCK_SLACK_SECONDS = 1.0


def _read_newest(answer: Answered, now: float) -> float | str:
    """The newest sample time an age or history answer holds; or, for an answer no
    Prometheus gives (not a vector of one number, a time that is not finite or after the
    evaluation at `now`), why it tells nothing. Never raises: a proxy or a broken server
    answering the age query must make the signals reading it errors, not fail the fetch."""
    try:
        value = _newest(answer.result)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        return f"not a Prometheus answer to the age query ({exc!r})"
    if math.isinf(value) or value > now + _CLOCK_SLACK_SECONDS:
        return (
            f"the newest sample time {value!r} is after the evaluation time {now:.3f}: "
            "not a Prometheus answer to the age query"
        )
    return value


def _newest(result: Sequence[Any]) -> float:
    if not result:
        return UNKNOWN_SAMPLE_TIME
    value = float(result[0]["value"][1])
    return UNKNOWN_SAMPLE_TIME if math.isnan(value) else value
