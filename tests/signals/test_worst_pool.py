"""The shipped saturation signals read the worst pool, on a real Prometheus: two vLLM
deployments (their `model_name`), one saturated and one idle, answer the saturated one's
occupancy, not the fleet's average, which let an idle pool hide a full one."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from tests.daemon.harness import REPO, scraping
from tests.support.prometheus import Exporter, wait_for

pytestmark = pytest.mark.integration

# (KV cache in use, running, waiting) per deployment: `big` is full with a queue of half its
# batch, `small` nearly idle.
POOLS = {"big": (0.97, 256.0, 128.0), "small": (0.10, 12.0, 0.0)}
WORST = 0.97 + 128.0 / 256.0


def _queries() -> dict[str, str]:
    """Each shipped policy's saturation query, as the files hold it."""
    adaptive = yaml.safe_load((REPO / "policies" / "global-inflight-by-gpu.yaml").read_text())
    throttle = yaml.safe_load((REPO / "policies" / "gpu-saturation.yaml").read_text())
    return {
        "global-inflight-by-gpu": adaptive["spec"]["signal"]["query"],
        "gpu-saturation": throttle["spec"]["signals"]["saturation"]["query"],
    }


def test_the_saturation_signals_read_the_worst_pool_not_the_average(tmp_path: Path) -> None:
    exporter = Exporter().start()
    exporter.set("exporter_up", 1.0)
    for model, (kv, running, waiting) in POOLS.items():
        labels = {"model_name": model}
        exporter.set("vllm:kv_cache_usage_perc", kv, labels)
        exporter.set("vllm:num_requests_running", running, labels)
        exporter.set("vllm:num_requests_waiting", waiting, labels)
    prometheus = scraping(tmp_path / "prometheus", exporter)
    try:
        queued = '{__name__=~"vllm[:_]num_requests_waiting"}'
        wait_for(
            lambda: len(prometheus.query(queued, time.time())) == 2, "both deployments scraped"
        )
        for name, query in _queries().items():
            (answer,) = prometheus.query(query, time.time())
            value = float(answer["value"][1])
            # The fleet's average would read (0.97 + 0.10) / 2 + 128 / 268 ≈ 1.01: "full, no
            # queue", while one deployment queues half a batch.
            assert value == pytest.approx(WORST), (name, answer)
    finally:
        prometheus.stop()
        exporter.stop()
