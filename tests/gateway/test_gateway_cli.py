"""`governor gateway` as a user runs it: a process serving the beginner flow, and its --help."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from typer.testing import CliRunner

from controller.cli import app
from tests.gateway.conftest import write_limits
from tests.gateway.fake_upstream import FakeUpstream
from tests.support.redis import RedisServer, free_port


def start_process(
    env: dict[str, str], port: int, *args: str, stderr: Any = subprocess.PIPE
) -> subprocess.Popen[str]:
    """`governor gateway --port PORT ARGS…` as a process, once its /healthz answers."""
    command = [sys.executable, "-m", "controller", "gateway", "--port", str(port), *args]
    process = subprocess.Popen(command, env=env, stderr=stderr, text=True)
    deadline = time.monotonic() + 30.0
    while True:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "governor gateway did not start"
        time.sleep(0.05)


def gateway_env(redis_server: RedisServer) -> dict[str, str]:
    return {
        **os.environ,
        "GOVERNOR_REDIS__URL": redis_server.url,
        "GOVERNOR_GATEWAY__API_KEY_SECRET": "cli-secret",
    }


@pytest.fixture
def gateway_process(
    db: redis.Redis[str],
    redis_server: RedisServer,
    upstream: tuple[FakeUpstream, str],
    policy_dir: Path,
) -> Iterator[tuple[str, dict[str, str]]]:
    write_limits(db, "governor", policy_dir)
    port = free_port()
    env = gateway_env(redis_server)
    process = start_process(env, port, "--upstream", upstream[1], "--policies", str(policy_dir))
    try:
        yield f"http://127.0.0.1:{port}", env
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


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        # An OpenAI base URL: requests went to /v1/v1/... and every one was answered 404.
        ("http://127.0.0.1:8000/v1", "give the server's root, http://127.0.0.1:8000"),
        (
            "https://u:upPW@models.internal/llm/v1/",
            "root, https://u:**********@models.internal/llm",
        ),
        # '://' mistyped: the refusal printed the password (no URL parser finds it).
        ("http//u:upPW@127.0.0.1:8000", "--upstream 'http//u:**********@127.0.0.1:8000'"),
    ],
)
def test_an_upstream_with_v1_or_mistyped_is_refused_masked(
    redis_server: RedisServer, upstream: str, message: str
) -> None:
    env = {"GOVERNOR_REDIS__URL": redis_server.url}
    result = CliRunner().invoke(app, ["gateway", "--upstream", upstream], env=env)

    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "upPW" not in result.output


def test_a_port_out_of_range_is_a_usage_error(redis_server: RedisServer) -> None:
    """`--port 99999` ended in the socket's OverflowError traceback, after a line saying
    the gateway was listening."""
    env = {"GOVERNOR_REDIS__URL": redis_server.url}
    args = ["gateway", "--upstream", "http://127.0.0.1:8000", "--port", "99999"]
    result = CliRunner().invoke(app, args, env=env)

    assert result.exit_code == 2, result.output
    assert "'--port'" in result.stderr
    assert "65535" in result.stderr
    assert "Traceback" not in result.output


def test_sigterm_drains_the_request_in_flight_and_exits_0(
    db: redis.Redis[str],
    redis_server: RedisServer,
    upstream: tuple[FakeUpstream, str],
    policy_dir: Path,
    tmp_path: Path,
) -> None:
    write_limits(db, "governor", policy_dir)
    fake, upstream_url = upstream
    env = gateway_env(redis_server)
    key = CliRunner().invoke(app, ["keys", "create", "--tenant", "acme", "--plan", "paid"],
                             env=env).stdout.strip()  # fmt: skip
    port, log = free_port(), tmp_path / "stderr.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as sink:
        process = start_process(env, port, "--upstream", upstream_url, "--policies",
                                str(policy_dir), stderr=sink)  # fmt: skip
    answer: dict[str, Any] = {}

    def stream() -> None:
        body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 5, "stream": True}  # fmt: skip
        headers = {"authorization": f"Bearer {key}", "x-fake-hold": "1"}
        with httpx.Client(timeout=30.0) as client:
            reply = client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            answer.update(status=reply.status_code, text=reply.text)

    fake.release.clear()
    seen = len(fake.seen)
    caller = threading.Thread(target=stream)
    try:
        caller.start()
        wait_until(lambda: len(fake.seen) > seen, "the stream never reached the model server")
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping on signal" in log.read_text(), "no stopping line")
        wait_until(lambda: refused(url), "new connections are still accepted while draining")
        assert process.poll() is None  # the stream in flight holds the exit back
    finally:
        fake.release.set()
        caller.join(timeout=30)
    assert process.wait(timeout=30) == 0
    assert answer["status"] == 200
    assert answer["text"].rstrip().endswith("data: [DONE]")  # finished, not cut
    lines = log.read_text().splitlines()
    started = [line for line in lines if "listening on" in line]
    assert len(started) == 1
    assert f"listening on http://127.0.0.1:{port}, upstream {upstream_url}" in started[0]
    assert "(--policies) (4 plans)" in started[0]
    assert "governor gateway stopped" in lines[-1]


def test_the_start_line_says_when_no_catalog_is_published(
    db: redis.Redis[str], redis_server: RedisServer, upstream: tuple[FakeUpstream, str]
) -> None:
    port = free_port()
    with_secrets = upstream[1].replace("http://", "http://user:hunter2@") + "/?token=t0ken"
    process = start_process(gateway_env(redis_server), port, "--upstream", with_secrets)
    process.terminate()
    assert process.wait(timeout=30) == 0
    assert process.stderr is not None
    text = process.stderr.read()
    process.stderr.close()
    assert "plan catalog none yet (no controller has published one)" in text
    assert f"upstream {upstream[1]}/, plan catalog" in text  # user info and query left out
    assert "hunter2" not in text
    assert "t0ken" not in text


def test_a_taken_port_is_said_and_exits_1_without_a_listening_line(
    redis_server: RedisServer, upstream: tuple[FakeUpstream, str]
) -> None:
    # The start line was logged before the port was bound: a taken port read "listening
    # on …" and then the process died (exit 3, uvicorn's own).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "controller", "gateway", "--port", str(port),
                   "--upstream", upstream[1]]  # fmt: skip
        done = subprocess.run(
            command, env=gateway_env(redis_server), capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1
    assert "listening on" not in done.stderr
    assert f"could not listen on 127.0.0.1:{port}" in done.stderr
    assert "address already in use" in done.stderr.lower()


def test_a_broken_policy_file_is_one_located_line_and_exit_2(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    (tmp_path / "plans.yaml").write_text(
        "apiVersion: governor/v1\nkind: Plan\nmetadata: {name: free}\nspec:\n  limits: 7\n"
    )
    env = {"GOVERNOR_REDIS__URL": redis_server.url}
    result = CliRunner().invoke(
        app, ["gateway", "--upstream", "http://127.0.0.1:9", "--policies", str(tmp_path)], env=env
    )

    assert result.exit_code == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert re.fullmatch(rf"error: {re.escape(str(tmp_path))}/plans\.yaml:5:\d+: .+", line), line


def wait_until(ready: Callable[[], bool], failure: str) -> None:
    deadline = time.monotonic() + 30.0
    while not ready():
        assert time.monotonic() < deadline, failure
        time.sleep(0.05)


def refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=1.0)
    except httpx.TransportError:
        return True
    return False
