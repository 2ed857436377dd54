"""The shipped saturation signals read the worst pool, on a real Prometheus: two vLLM
deployments (their `model_name`), one saturated and one idle, answer the saturated one's
occupancy, not the fleet's average, which let an idle pool hide a full one; and a deployment
that lacks one of the three series never makes the fleet read idler than its average did."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.daemon.harness import REPO, scraping
from tests.support.prometheus import Exporter, PrometheusServer, wait_for

pytestmark = pytest.mark.integration

KV, RUNNING, WAITING = (
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
)


def _queries() -> dict[str, str]:
    """Each shipped policy's saturation query, as the files hold it."""
    adaptive = yaml.safe_load((REPO / "policies" / "global-inflight-by-gpu.yaml").read_text())
    throttle = yaml.safe_load((REPO / "policies" / "gpu-saturation.yaml").read_text())
    return {
        "global-inflight-by-gpu": adaptive["spec"]["signal"]["query"],
        "gpu-saturation": throttle["spec"]["signals"]["saturation"]["query"],
    }


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Exporter, PrometheusServer]]:
    exporter = Exporter().start()
    exporter.set("exporter_up", 1.0)
    prometheus = scraping(tmp_path / "prometheus", exporter)
    yield exporter, prometheus
    prometheus.stop()
    exporter.stop()


def _answers(
    fleet: tuple[Exporter, PrometheusServer], series: dict[str, dict[str, float]]
) -> dict[str, float]:
    """Expose `series` (deployment → name → value), wait until scraped, then each shipped
    query's one answer."""
    exporter, prometheus = fleet
    for model, values in series.items():
        for name, value in values.items():
            exporter.set(name, value, {"model_name": model})
    count = sum(len(values) for values in series.values())
    wait_for(
        lambda: len(prometheus.query('{__name__=~"vllm[:_].+"}', time.time())) == count,
        "every deployment's series scraped",
    )
    found = {}
    for name, query in _queries().items():
        (answer,) = prometheus.query(query, time.time())
        found[name] = float(answer["value"][1])
    return found


def test_the_saturation_signals_read_the_worst_pool_not_the_average(
    fleet: tuple[Exporter, PrometheusServer],
) -> None:
    # `big` is full with a queue of half its batch, `small` nearly idle. The fleet's average
    # would read (0.97 + 0.10) / 2 + 128 / 268 ≈ 1.01: "full, no queue".
    answers = _answers(fleet, {
        "big": {KV: 0.97, RUNNING: 256.0, WAITING: 128.0},
        "small": {KV: 0.10, RUNNING: 12.0, WAITING: 0.0},
    })  # fmt: skip
    assert answers == pytest.approx(dict.fromkeys(_queries(), 0.97 + 128.0 / 256.0))


def test_a_deployment_missing_a_series_never_reads_idler_than_the_fleet(
    fleet: tuple[Exporter, PrometheusServer],
) -> None:
    # `big` exports no KV-cache series (an older vLLM names it vllm:gpu_cache_usage_perc):
    # per model it drops out of the sum, and the worst deployment alone would read `small`'s
    # 0.10, so gpu-saturation never fired and the limit loosened on a queue as long as the
    # batch. The fleet's value (0.10 + 256 / 268, capped at 1) stays a floor.
    answers = _answers(fleet, {
        "big": {RUNNING: 256.0, WAITING: 256.0},
        "small": {KV: 0.10, RUNNING: 12.0, WAITING: 0.0},
    })  # fmt: skip
    assert answers == pytest.approx(dict.fromkeys(_queries(), 0.10 + 256.0 / 268.0))
