"""Two controller replicas started exactly as the chart's Deployment says (its command, args
and environment; only addresses swapped for local ones) run against a real redis-server and
Prometheus: their probes answer, one leads, and on SIGTERM the other takes over."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.chart import container, manifests, pod_environment, render
from tests.support.prometheus import PrometheusServer, wait_for
from tests.support.redis import RedisServer, free_port

pytestmark = pytest.mark.integration

STARTUP_SECONDS = 60.0


@dataclass
class Replica:
    """One controller process and the port of its telemetry (the pod's http-metrics)."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as answer:
            return answer.code, answer.read().decode()
        except (urllib.error.URLError, ConnectionError):
            return 0, ""

    def leading(self) -> bool:
        status, text = self.get("/metrics")
        return status == 200 and re.search(r"^governor_leader 1\.0$", text, re.M) is not None

    def answers(self, path: str) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
        return self.get(path)[0] == 200

    def stop(self) -> int:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        return self.process.wait(timeout=STARTUP_SECONDS)


def local(port: int, policies: Path) -> dict[str, str]:
    """What differs from a pod here: the telemetry port and where the policies are."""
    return {"GOVERNOR_TELEMETRY__PORT": str(port), "GOVERNOR_CONTROLLER__POLICY_DIR": str(policies)}


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[Replica]]:
    docs = manifests(
        render({"leaderElection": {"mode": "redis"}, "controller": {"tickSeconds": 1}})
    )
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    policies = tmp_path / "policies"
    policies.mkdir()
    for name, text in config_map["data"].items():
        (policies / name).write_text(text)
    redis_server = RedisServer(tmp_path / "redis").start()
    prometheus = PrometheusServer(tmp_path / "prometheus").start()
    urls = {"GOVERNOR_REDIS__URL": redis_server.url, "GOVERNOR_PROMETHEUS__URL": prometheus.url}
    main = container(docs)
    started: list[Replica] = []
    try:
        for pod in ("governor-a", "governor-b"):
            port = free_port()
            log = tmp_path / f"{pod}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [*main["command"], *main["args"]],
                    env=pod_environment(docs, pod, {**urls, **local(port, policies)}),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            started.append(Replica(pod, port, process, log))
        yield started
    finally:
        for replica in started:
            replica.stop()
        prometheus.stop()
        redis_server.stop()


def test_two_replicas_run_elect_one_leader_and_hand_over(replicas: list[Replica]) -> None:
    for replica in replicas:
        for probe in ("/healthz", "/readyz"):  # what the Deployment's probes ask
            wait_for(
                lambda r=replica, p=probe: r.answers(p),  # type: ignore[misc]
                f"{replica.name} answers {probe}",
                STARTUP_SECONDS,
            )
    wait_for(lambda: sum(r.leading() for r in replicas) == 1, "exactly one replica leads", 30)
    leader = next(r for r in replicas if r.leading())
    standby = next(r for r in replicas if r is not leader)
    assert leader.stop() == 0  # SIGTERM: finish the tick, flush, release the lock
    wait_for(standby.leading, "the standby replica takes over", 30)
    assert standby.get("/readyz")[0] == 200
