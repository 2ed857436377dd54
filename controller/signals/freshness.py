"""How old the data behind a query result is: the newest raw sample of each selector it reads.

Prometheus stamps an instant-query answer with the evaluation time and, within its 5-minute
lookback, keeps answering with the last sample of a series that stopped being written; a
`rate(x[5m])` keeps a value for 5 minutes after `x` went away. So the age of a result is
asked separately, as `max(timestamp(selector))` per selector the query reads.

That costs a pass over the selector's series, so an answer may be reused for
`refresh_seconds`. A reused time is a lower bound of the true newest-sample time (it only
grows), so ages are over-estimated by at most `refresh_seconds`, never under-estimated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from controller.signals.promql import freshness_query

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
            if answer.error is not None:
                self._known.pop(selector, None)
                self._failed[selector] = answer.error
                continue
            self._known[selector] = _Known(now, _newest(answer.result))

    def of(self, reads: Sequence[str], now: float) -> tuple[float, str] | str:
        """The time of the data behind a query reading `reads`: the oldest of their newest
        samples (every input must be fresh), with a note; or why it cannot be told. A query
        reading no series (`vector(1)`, `time()`) is as fresh as its evaluation."""
        oldest, notes = now, []
        for selector in reads:
            if selector in self._failed:
                return f"cannot tell the age of {selector}: {self._failed[selector]}"
            known = self._known.get(selector)
            newest = UNKNOWN_SAMPLE_TIME if known is None else known.newest
            if newest == UNKNOWN_SAMPLE_TIME:
                notes.append(f"no sample of {selector} within Prometheus' lookback window")
            oldest = min(oldest, newest)
        return oldest, "; ".join(notes)


def _newest(result: Sequence[Any]) -> float:
    if not result:
        return UNKNOWN_SAMPLE_TIME
    value = float(result[0]["value"][1])
    return UNKNOWN_SAMPLE_TIME if math.isnan(value) else value
