"""A signal that cannot be used is logged with its validity and a reason in words, never an
empty detail: the line an on-call engineer reads to find the broken query."""

from __future__ import annotations

from collections.abc import MutableMapping
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
