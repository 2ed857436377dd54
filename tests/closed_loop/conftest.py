"""The whole loop with real parts only: a model server stand-in, the real gateway process, a
real Prometheus scraping it every second, and `governor run` reading Prometheus back and
writing limits to the same Redis. Short intervals (scrape 1 s, rate over 5 s, `for: 2s`, tick
0.5 s) keep the test quick; docs/operations.md gives the same parts at production defaults."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from controller.contract.keys import KeySchema
from controller.control.overrides import ControlStore
from controller.gateway.keys import KeyStore
from tests.daemon.harness import REPO, Daemon, daemon_env
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.support.prometheus import PrometheusServer, prometheus_config, wait_for
from tests.support.redis import RedisServer, free_port

SECRET = "closed-loop-secret"
SCRAPE_SECONDS = 1.0
RATE_WINDOW = "5s"
FOR_SECONDS = 2.0
THRESHOLD_USD_PER_SECOND = 0.05
POLICY = "ThrottlePolicy/cost-jump"
# The cut: a quarter of the plan's rate would not refuse the test's few requests; this
# leaves the jumping tenant 6 requests a minute on its 6000 (enterprise) plan.
CUT_SCALE = 0.001


def write_policies(directory: Path) -> Path:
    """Two plans, the Limits document, and a cost-jump policy shaped like the shipped
    tenant-cost-anomaly (spend per tenant, `refused` in the release), with short windows."""
    directory.mkdir(parents=True)
    plan = (
        "apiVersion: governor/v1\nkind: Plan\nmetadata: {{name: {name}}}\n"
        "spec:\n  models: [gpt-3.5-turbo, gpt-4]\n"
        "  limits: {{requests_per_minute: {rpm}, tokens_per_minute: 10000000}}\n"
    )
    (directory / "plans.yaml").write_text(
        plan.format(name="paid", rpm=600) + "---\n" + plan.format(name="enterprise", rpm=6000)
    )
    (directory / "limits.yaml").write_text(
        "apiVersion: governor/v1\nkind: Limits\nmetadata: {name: global}\n"
        "spec:\n  default_plan: paid\n  global: {requests_per_second: 1000}\n"
        "  behavior:\n    tighten: {stabilization: 0s}\n    loosen: {stabilization: 0s}\n"
    )
    (directory / "cost-jump.yaml").write_text(
        "apiVersion: governor/v1\nkind: ThrottlePolicy\nmetadata: {name: cost-jump}\n"
        "spec:\n  per: tenant\n  signals:\n"
        "    spend:\n"
        f"      query: 'sum by (tenant) (rate(gateway_cost_usd_total[{RATE_WINDOW}]))'\n"
        "      stale_after: 10s\n      absent: zero\n"
        "    refused:\n"
        "      query: 'sum by (tenant) "
        f'(rate(gateway_requests_total{{outcome="rate_limited"}}[{RATE_WINDOW}]))\'\n'
        "      stale_after: 10s\n      absent: zero\n"
        f"  when: spend > {THRESHOLD_USD_PER_SECOND:g}\n"
        f"  for: {FOR_SECONDS:g}s\n"
        "  until: spend < 0.01 && refused < 0.01\n"
        "  actions:\n"
        f"    - {{target: tenant/$tenant/requests_per_minute, scale: {CUT_SCALE:g}, min: 1}}\n"
    )
    return directory


@dataclass
class Loop:
    """The running parts and what a test needs of them."""

    gateway_url: str
    prometheus: PrometheusServer
    daemon: Daemon
    db: redis.Redis[str]
    keys: dict[str, str]  # tenant → API key


def _start_gateway(
    env: dict[str, str], port: int, upstream: str, policies: Path
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "controller", "gateway", "--port", str(port),
               "--upstream", upstream, "--policies", str(policies)]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/healthz"

    def healthy() -> bool:
        assert process.poll() is None, "governor gateway exited"
        try:
            return httpx.get(url).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, "governor gateway answers /healthz", timeout=30.0)
    return process


@pytest.fixture
def loop(tmp_path: Path, redis_server: RedisServer, db: redis.Redis[str]) -> Iterator[Loop]:
    policies = write_policies(tmp_path / "policies")
    upstream = ServerThread(FakeUpstream().app()).start()
    port = free_port()  # the gateway's, which Prometheus scrapes
    config = prometheus_config([f"127.0.0.1:{port}"], interval=f"{SCRAPE_SECONDS:g}s")
    prometheus = PrometheusServer(tmp_path / "prometheus", config=config).start()
    # Ages are asked every tick (the default reuses an answer for 10 s).
    env = daemon_env(redis_server.url, prometheus.url, policies,
                     GOVERNOR_PROMETHEUS__SAMPLE_AGE_REFRESH_SECONDS="0")  # fmt: skip
    daemon = Daemon(tmp_path / "daemon", env)
    gateway: subprocess.Popen[bytes] | None = None
    try:
        daemon.start()
        wait_for(lambda: db.exists("governor:limits:plan:enterprise") == 1, "plan limits written")
        gateway_env = {k: v for k, v in os.environ.items() if not k.startswith("GOVERNOR_")}
        gateway_env.update(
            GOVERNOR_REDIS__URL=redis_server.url, GOVERNOR_GATEWAY__API_KEY_SECRET=SECRET
        )
        gateway = _start_gateway(gateway_env, port, upstream.url, policies)
        wait_for(
            lambda: bool(prometheus.query('up{job="exporter"} == 1', time.time())),
            "Prometheus scrapes the gateway",
        )
        store = KeyStore(db, KeySchema(), SECRET)
        # bigco is known only through its key (never `tenants set`): the silent-gap case.
        keys = {t: store.create(t, p)[0] for t, p in
                (("bigco", "enterprise"), ("acme", "paid"), ("globex", "paid"))}  # fmt: skip
        ControlStore(db, KeySchema()).set_tenant("acme", "paid")
        yield Loop(f"http://127.0.0.1:{port}", prometheus, daemon, db, keys)
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(timeout=30)
        daemon.stop()
        prometheus.stop()
        upstream.stop()
