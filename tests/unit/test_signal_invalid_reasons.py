"""A signal that cannot be used is logged with its validity and a reason in words, never an
empty detail: the line an on-call engineer reads to find the broken query."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

from structlog.testing import capture_logs

from controller.control.reporting import TickReporter
from controller.control.telemetry import Health, Metrics
from controller.model import ScalarSample, Snapshot, Validity
from tests.unit.policy_builders import adaptive, policy_set

NOW = 1_800_000_000.0


def _logged(sample: ScalarSample | None) -> MutableMapping[str, Any]:
    policies = policy_set(adaptive())
    [use] = list(policies.signal_uses())
    samples = {} if sample is None else {use.key: sample}
    reporter = TickReporter(Metrics(), Health(tick_seconds=15.0))
    with capture_logs() as logs:
        bad = reporter.signals(policies, Snapshot(NOW, samples), NOW)
    assert bad == {"AdaptiveLimit/rps-by-gpu"}
    [line] = [entry for entry in logs if entry["event"] == "signal.invalid"]
    return line


def test_an_empty_answer_says_the_query_matched_nothing_and_what_to_check() -> None:
    line = _logged(ScalarSample(float("nan"), NOW, Validity.EMPTY, ""))
    assert line["validity"] == "empty"
    assert "returned no series" in str(line["detail"])
    assert "metric names and labels" in str(line["detail"])


def test_a_stale_sample_says_how_old_it_is_against_its_stale_after() -> None:
    line = _logged(ScalarSample(0.5, NOW - 125.0, Validity.OK, ""))
    assert line["validity"] == "stale"
    assert "is 2m5s old, older than stale_after 1m" in str(line["detail"])


def test_a_failed_query_keeps_what_prometheus_said() -> None:
    said = "HTTP 400: parse error at char 5"
    line = _logged(ScalarSample(float("nan"), NOW, Validity.ERROR, said))
    assert (line["validity"], line["detail"]) == ("error", said)


def test_a_signal_never_fetched_says_so() -> None:
    line = _logged(None)
    assert line["validity"] == "missing"
    assert "not fetched" in str(line["detail"])


def _ticks(
    reporter: TickReporter, samples: Sequence[ScalarSample | None], start: float = NOW
) -> list[MutableMapping[str, Any]]:
    """The signal lines logged over one tick per sample, 5 s apart."""
    policies = policy_set(adaptive())
    [use] = list(policies.signal_uses())
    with capture_logs() as logs:
        for i, sample in enumerate(samples):
            samples_now = {} if sample is None else {use.key: sample}
            now = start + 5.0 * i
            reporter.signals(policies, Snapshot(now, samples_now), now)
            # The state of every tick is still there for the journal, the gauge, readiness.
            assert ("AdaptiveLimit/rps-by-gpu" in reporter.invalid) == (
                sample is None or sample.validity is not Validity.OK
            )
    return [e for e in logs if e["event"] in ("signal.invalid", "signal.recovered")]


FAILED = ScalarSample(float("nan"), NOW, Validity.ERROR, "cannot reach Prometheus")
EMPTY = ScalarSample(float("nan"), NOW, Validity.EMPTY, "")


def test_a_bad_signal_is_logged_when_it_turns_bad_then_reminded_at_a_bounded_rate() -> None:
    """A Prometheus down for an hour logged one warning per signal per tick (7,200 lines for
    10 signals at 5 s): now one when the signal turns bad, a reminder every 40 ticks."""
    reporter = TickReporter(Metrics(), Health(tick_seconds=5.0))
    lines = _ticks(reporter, [FAILED] * 100)
    assert [line["event"] for line in lines] == ["signal.invalid"] * 3  # ticks 1, 41, 81
    first, reminder, _ = lines
    assert (first["validity"], first["detail"]) == ("error", "cannot reach Prometheus")
    assert first["bad_for"] == "0s"
    assert not first["reminder"]
    assert (reminder["validity"], reminder["bad_for"], reminder["reminder"]) == (
        "error",
        "3m20s",
        True,
    )


def test_a_change_of_why_a_signal_is_bad_is_logged_at_once() -> None:
    reporter = TickReporter(Metrics(), Health(tick_seconds=5.0))
    lines = _ticks(reporter, [FAILED] * 3 + [EMPTY] * 3 + [FAILED])
    assert [(line["validity"], line["bad_for"]) for line in lines] == [
        ("error", "0s"),
        ("empty", "15s"),  # bad since the first tick, for another reason now
        ("error", "30s"),
    ]


def test_a_signal_usable_again_says_so_once_with_how_long_it_was_bad() -> None:
    reporter = TickReporter(Metrics(), Health(tick_seconds=5.0))
    usable = ScalarSample(0.5, NOW + 60.0)
    lines = _ticks(reporter, [FAILED] * 7 + [usable] * 5 + [FAILED])
    assert [line["event"] for line in lines] == [
        "signal.invalid",
        "signal.recovered",
        "signal.invalid",  # bad again: a new episode, said again
    ]
    recovered = lines[1]
    assert (recovered["policy"], recovered["signal"]) == ("AdaptiveLimit/rps-by-gpu", "gpu_util")
    assert (recovered["was"], recovered["bad_for"]) == ("error", "35s")
    assert lines[2]["bad_for"] == "0s"
