"""`governor gateway` as a user runs it: a process serving the beginner flow, and its --help."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from typer.testing import CliRunner

from controller.cli import app
from tests.gateway.conftest import write_limits
from tests.gateway.fake_upstream import FakeUpstream
from tests.support.redis import RedisServer, free_port


@pytest.fixture
def gateway_process(
    db: redis.Redis[str],
    redis_server: RedisServer,
    upstream: tuple[FakeUpstream, str],
    policy_dir: Path,
) -> Iterator[tuple[str, dict[str, str]]]:
    write_limits(db, "governor", policy_dir)
    port = free_port()
    env = {
        **os.environ,
        "GOVERNOR_REDIS__URL": redis_server.url,
        "GOVERNOR_GATEWAY__API_KEY_SECRET": "cli-secret",
    }
    command = [sys.executable, "-m", "controller", "gateway", "--upstream", upstream[1],
               "--port", str(port), "--policies", str(policy_dir)]  # fmt: skip
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30.0
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "governor gateway did not start"
            time.sleep(0.05)
        yield url, env
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stderr:
            process.stderr.close()


def test_the_gateway_command_serves_the_beginner_flow(
    gateway_process: tuple[str, dict[str, str]],
) -> None:
    url, env = gateway_process
    created = CliRunner().invoke(
        app, ["keys", "create", "--tenant", "acme", "--plan", "free"], env=env
    )
    assert created.exit_code == 0, created.stderr
    key = created.stdout.strip()
    assert "only its hash" in created.stderr

    body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(headers={"authorization": f"Bearer {key}"}) as client:
        codes = [
            client.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 5}).status_code
            for _ in range(11)
        ]
        metrics = client.get(f"{url}/metrics").text

    assert codes == [200] * 10 + [429]
    assert 'outcome="rate_limited",plan="free",tenant="acme"} 1.0' in metrics


def test_gateway_help_names_its_options() -> None:
    result = CliRunner().invoke(app, ["gateway", "--help"])

    assert result.exit_code == 0
    for option in ("--upstream", "--host", "--port", "--policies"):
        assert option in result.stdout


def test_a_bad_upstream_url_is_a_usage_error(redis_server: RedisServer) -> None:
    env = {"GOVERNOR_REDIS__URL": redis_server.url}
    result = CliRunner().invoke(app, ["gateway", "--upstream", "localhost:8000"], env=env)

    assert result.exit_code == 2
    assert "must be an http(s) URL" in result.stderr
