"""The simulator's signal source: each policy query evaluated over the simulated series and
decoded by the same functions that decode Prometheus' answers, so validity (empty, stale,
several series per label...) is judged exactly as in production."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from controller.model import Sample, SignalKey, Snapshot
from controller.signals.decode import ResultShapeError, decode_scalar, decode_vector
from controller.signals.prometheus import absent_as_zero, error_sample
from controller.sim.promql import Evaluator, SimQueryError, as_api_result
from controller.sim.series import SeriesStore


class SimSignalSource:
    """Implements the loop's SignalSource over a SeriesStore. `mapping`: policy query text →
    the PromQL over simulated metrics to answer it with (the scenario's `signals:`)."""

    def __init__(self, store: SeriesStore, mapping: Mapping[str, str] | None = None) -> None:
        self.evaluator = Evaluator(store)
        self.mapping = dict(mapping or {})
        self.last: Snapshot | None = None

    def fetch(self, keys: Iterable[SignalKey], now: float) -> Snapshot:
        samples: dict[SignalKey, Sample] = {}
        answers: dict[str, tuple[list[object], float] | str] = {}
        for key in dict.fromkeys(keys):
            query = self.mapping.get(key.query, key.query)
            if query not in answers:
                try:
                    value, fresh = self.evaluator.instant(query, now)
                    answers[query] = (as_api_result(value, now), fresh)
                except SimQueryError as exc:
                    answers[query] = str(exc)
            answer = answers[query]
            if isinstance(answer, str):
                samples[key] = error_sample(key, answer)
                continue
            result, fresh = answer
            try:
                decoded = (
                    decode_scalar(result, fresh)
                    if key.by is None
                    else decode_vector(result, key.by, fresh)
                )
                # As the Prometheus source reads it: no series of an `absent: zero` signal is 0.
                samples[key] = absent_as_zero(key, decoded, now)
            except ResultShapeError as exc:
                samples[key] = error_sample(key, f"query {key.query!r}: {exc}")
        self.last = Snapshot(taken_at=now, samples=samples)
        return self.last
