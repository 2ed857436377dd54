"""The controller's and the gateway's /metrics follow Prometheus' conventions: `promtool check
metrics` finds nothing, no `_created` series, closed label sets exported at 0 from the start."""

from __future__ import annotations

import subprocess
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.control.telemetry import Metrics
from controller.gateway.metrics import (
    HELD_OPERATIONS,
    RECORD_KINDS,
    RECORD_WAIT_OUTCOMES,
    STORE_OPERATIONS,
    GatewayMetrics,
)
from tests.deploy.series import series_names

REPO = Path(__file__).resolve().parents[2]


def check_metrics(promtool: str, exposition: bytes) -> str:
    """promtool's findings on an exposition: empty when it has none."""
    result = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=60
    )
    findings = (result.stdout + result.stderr).decode().strip()
    assert result.returncode == 0 or findings, "promtool failed without saying why"
    return findings


def _samples(exposition: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition.decode())
        for s in family.samples
    }


def _used_controller() -> bytes:
    metrics = Metrics()
    metrics.signals_invalid.labels("ThrottlePolicy/p").set(1)
    metrics.fallback_seconds.labels("ThrottlePolicy/p").inc(5)
    metrics.unwritten.labels("ThrottlePolicy/p").inc()
    metrics.journal_dropped.inc(3)
    metrics.tick_seconds.observe(0.1)
    return metrics.exposition()


def _used_gateway() -> bytes:
    metrics = GatewayMetrics(max_tenants=10, max_models=10)
    metrics.request("acme", "paid", "m", "allow")
    metrics.usage("acme", "paid", "m", 10, 20, 0.5)
    metrics.budget("acme", "tenant/acme/tokens_per_day", 100, 40)
    metrics.estimated.labels("paid").inc()
    metrics.admission_seconds.observe(0.001)
    return generate_latest(metrics.registry)


def test_promtool_finds_nothing_in_either_exposition(promtool: str) -> None:
    for exposition in (_used_controller(), _used_gateway()):
        assert check_metrics(promtool, exposition) == ""


def test_promtool_would_say_so(promtool: str) -> None:
    """The check is not vacuous: a counter without `_total` is reported."""
    bad = b"# HELP x_count things\n# TYPE x_count counter\nx_count 1\n"
    assert "x_count" in check_metrics(promtool, bad)


def test_no_created_series() -> None:
    for exposition in (_used_controller(), _used_gateway()):
        assert b"_created" not in exposition


def test_closed_label_sets_start_at_zero() -> None:
    gateway = _samples(generate_latest(GatewayMetrics(max_tenants=10, max_models=10).registry))
    for operation in STORE_OPERATIONS:
        assert gateway["gateway_limit_store_errors_total", (("operation", operation),)] == 0.0
    for operation in HELD_OPERATIONS:
        assert gateway["gateway_store_calls_lost_total", (("operation", operation),)] == 0.0
    for kind in RECORD_KINDS:
        assert gateway["gateway_response_records_lost_total", (("kind", kind),)] == 0.0
    for outcome in RECORD_WAIT_OUTCOMES:
        assert gateway["gateway_record_waits_total", (("outcome", outcome),)] == 0.0
    controller = _samples(Metrics().exposition())
    assert controller["governor_ticks_total", (("outcome", "ok"),)] == 0.0
    assert controller["governor_ticks_total", (("outcome", "degraded"),)] == 0.0
    assert controller["governor_journal_dropped_events_total", ()] == 0.0
    assert controller["governor_redis_errors_total", (("operation", "sink"),)] == 0.0
    changes = (("direction", "tighten"), ("scope", "tenant"))
    assert controller["governor_limit_changes_total", changes] == 0.0


def test_journal_drops_are_a_counter() -> None:
    families = {f.name: f.type for f in text_string_to_metric_families(_used_controller().decode())}
    assert families["governor_journal_dropped_events"] == "counter"


def _documented(path: str, heading: str) -> str:
    text = (REPO / path).read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end >= 0 else len(text)]


def test_every_gateway_family_is_in_the_metrics_table_of_docs_gateway() -> None:
    table = _documented("docs/gateway.md", "## Metrics")
    names = series_names(GatewayMetrics(max_tenants=10, max_models=10).registry)
    exported = {n.removesuffix("_bucket") for n in names if not n.endswith(("_sum", "_count"))}
    assert {n for n in exported if f"`{n}`" not in table and f"`{n}{{" not in table} == set()


def test_every_controller_family_is_in_the_metrics_table_of_docs_operations() -> None:
    table = _documented("docs/operations.md", "## Telemetry")
    names = series_names(Metrics().registry)
    exported = {n.removesuffix("_bucket") for n in names if not n.endswith(("_sum", "_count"))}
    assert {n for n in exported if f"`{n}`" not in table and f"`{n}{{" not in table} == set()
