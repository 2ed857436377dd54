"""README.md's tour as written: its `governor` lines, read from the README, run in its order
against a real Redis and Prometheus, each with the exit code and output the tour promises."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import pytest
import redis

from tests.daemon.harness import REPO
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.support.prometheus import PrometheusServer, wait_for
from tests.support.redis import RedisServer, free_port

_SEPARATORS = {";", "&", "&&", "||", "|", "(", ")"}
_REDIRECTS = {">", ">>", "<", ">&", "2>"}
_COMMAND_TIMEOUT_SECONDS = 120.0


def tour_block() -> str:
    """The first ```sh block after the README's `## A tour` heading."""
    text = (REPO / "README.md").read_text()
    tour = text[text.index("## A tour") :]
    start = tour.index("```sh\n") + len("```sh\n")
    return tour[start : tour.index("```", start)]


def _segments(line: str) -> Iterator[tuple[list[str], bool]]:
    """Each simple command of a shell line without its redirections, and whether `&` ends it."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    words: list[str] = []
    tokens = list(lexer)
    skip = False
    for index, token in enumerate(tokens):
        if token in _SEPARATORS:
            yield words, token == "&"
            words = []
        elif skip:
            skip = False
        elif token in _REDIRECTS:
            skip = True
            if words and words[-1].isdigit() and tokens[index - 1] == words[-1]:
                words.pop()  # the `2` of `2>file`
        else:
            words.append(token)
    yield words, False


def tour_commands() -> list[tuple[list[str], bool]]:
    """The tour's `governor` commands in order: (words, run in the background)."""
    logical = tour_block().replace("\\\n", " ")
    return [
        (words, background)
        for line in logical.splitlines()
        for words, background in _segments(line)
        if words[:1] == ["governor"]
    ]


@dataclass
class Tour:
    """One shell's worth of state: the environment the README exports, its working copy,
    the processes it left running in the background, the key it captured."""

    env: dict[str, str]
    workdir: Path
    upstream: str
    db: redis.Redis[str]
    telemetry: int = field(default_factory=free_port)
    gateway: int = field(default_factory=free_port)
    running: list[subprocess.Popen[str]] = field(default_factory=list)
    logs: list[IO[str]] = field(default_factory=list)
    key: str = ""

    def argv(self, words: list[str]) -> list[str]:
        """`governor …` as this Python runs it; a /tmp path goes to the test's own directory,
        the README's model server to the fake one."""
        rest = [self._local(word) for word in words[1:]]
        return [sys.executable, "-m", "controller", *rest]

    def _local(self, word: str) -> str:
        if word.startswith("/tmp/"):
            return str(self.workdir / "tmp" / word.removeprefix("/tmp/"))
        return word.replace("http://127.0.0.1:8000", self.upstream)

    def run(self, words: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(words),
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT_SECONDS,
            check=False,
        )

    def start(self, words: list[str]) -> None:
        log = (self.workdir / f"background-{len(self.running)}.log").open("w")
        self.logs.append(log)
        process = subprocess.Popen(
            self.argv(words), cwd=self.workdir, env=self.env, stdout=log, stderr=log, text=True
        )
        self.running.append(process)

    def get(self, port: int, path: str) -> int:
        """The status of GET `path` on a loopback port, 0 while nothing answers there."""
        try:
            return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code
        except httpx.TransportError:
            return 0

    def stop(self) -> None:
        for process in self.running:
            process.terminate()
            process.wait(timeout=30)
        for log in self.logs:
            log.close()


Check = Callable[[Tour, subprocess.CompletedProcess[str]], None]


@dataclass(frozen=True)
class Step:
    """What one tour line must do: its exit code and a piece of its output (stdout, else
    stderr), and any further check of what it did."""

    command: str
    exit_code: int = 0
    shows: str = ""
    check: Check | None = None
    elsewhere: str = ""  # not run here: the test that runs it instead


def _schema_is_the_shipped_one(tour: Tour, _: subprocess.CompletedProcess[str]) -> None:
    written = (tour.workdir / "docs" / "policy.schema.json").read_text()
    assert written == (REPO / "docs" / "policy.schema.json").read_text()


def _dry_run_writes_nothing(tour: Tour, result: subprocess.CompletedProcess[str]) -> None:
    tick = json.loads(result.stdout)
    assert tick["dry_run"] is True
    changes = {change["address"]: change for change in tick["changes"]}
    assert changes["plan/paid/tokens_per_minute"]["new"] == 20000.0
    assert {change["source"] for change in changes.values()} == {"baseline"}
    assert tour.db.keys("governor:limits:*") == []  # a dry run writes no limit
    assert tour.db.get("governor:version") is None
    assert tour.db.get("governor:plans:version") is None  # nor the plans gateways enforce


def _controller_ticked(tour: Tour, _: subprocess.CompletedProcess[str]) -> None:
    # The README waits on /readyz before it starts a gateway: the first tick has published.
    wait_for(lambda: tour.get(tour.telemetry, "/readyz") == 200, "the controller is ready", 60)


def _verbose(_: Tour, result: subprocess.CompletedProcess[str]) -> None:
    event = json.loads(result.stderr.splitlines()[-1])
    assert (event["event"], event["details"]["tenant"]) == ("tenant.set", "acme")


def _key_on_stdout(tour: Tour, result: subprocess.CompletedProcess[str]) -> None:
    tour.key = result.stdout.strip()
    assert tour.key.startswith("gov_")
    assert "\n" not in tour.key
    assert "Store the key now" in result.stderr
    assert tour.key not in result.stderr


def _gateway_serves_the_key(tour: Tour, _: subprocess.CompletedProcess[str]) -> None:
    wait_for(lambda: tour.get(tour.gateway, "/healthz") == 200, "the gateway answers", 60)
    answer = httpx.post(
        f"http://127.0.0.1:{tour.gateway}/v1/chat/completions",
        headers={"Authorization": f"Bearer {tour.key}"},
        content='{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}',
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["object"] == "chat.completion"
    assert answer.headers["x-ratelimit-limit-tokens"] == "20000"  # paid, not the 503 of no tick


def _lua_is_the_shipped_one(tour: Tour, _: subprocess.CompletedProcess[str]) -> None:
    for name in ("admit.lua", "settle.lua", "charge.lua"):
        written = (tour.workdir / "tmp" / "governor-lua" / name).read_text()
        assert written == (REPO / "deploy" / "nginx" / "scripts" / name).read_text()


def _next_tick_writes_it(tour: Tour, _: subprocess.CompletedProcess[str]) -> None:
    # The README's `sleep 6`: the override reaches the limits at the controller's next tick
    # (every 5 s); three ticks' time allows for a loaded machine.
    def written() -> bool:
        return tour.db.hget("governor:{t:acme}:limits", "tokens_per_minute") == "5000"

    wait_for(written, "the controller's next tick writes the override", 15)


def _override_is_stored(_: Tour, result: subprocess.CompletedProcess[str]) -> None:
    assert json.loads(result.stdout)["limits"] == {"tenant/acme/tokens_per_minute": 5000}


STEPS = [
    Step("governor policy lint policies/", shows="version "),
    Step("governor policy test policies/", shows=", 0 failing"),
    Step(
        "governor policy schema -o docs/policy.schema.json",
        shows="wrote docs/policy.schema.json",
        check=_schema_is_the_shipped_one,
    ),
    Step(
        "governor simulate burst-5x --policies policies/",
        elsewhere="a minute of both cores: tests/sim/test_scenarios.py runs burst-5x, "
        "tests/sim/test_cli_simulate.py the command",
    ),
    Step("governor signals --policies policies/", 1, "query returned no series"),
    Step("governor run --once --dry-run --json", check=_dry_run_writes_nothing),
    Step(
        "governor backtest --from 2026-11-26T00:00:00Z --to 2026-11-27T00:00:00Z "
        "--policies policies/",
        1,
        "every signal was empty from 2026-11-26T00:00:00Z",
    ),
    Step("governor run &", check=_controller_ticked),
    Step("governor -v tenants set acme paid", shows="tenant acme: plan paid", check=_verbose),
    Step("governor credits top-up acme 50 --reason 'invoice 1234'", shows="balance 50.0"),
    Step("governor keys create --tenant acme --plan paid", check=_key_on_stdout),
    Step("governor gateway --upstream http://127.0.0.1:8000 &", check=_gateway_serves_the_key),
    Step(
        "governor gateway export-lua /tmp/governor-lua",
        shows="admit.lua",
        check=_lua_is_the_shipped_one,
    ),
    Step(
        "governor override set tenant/acme/tokens_per_minute 5000 --ttl 1h --reason INC-42",
        shows="override tenant/acme/tokens_per_minute = 5000",
        check=_next_tick_writes_it,
    ),
    Step("governor limits get tenant/acme --json", check=_override_is_stored),
    Step("governor explain tenant/acme/tokens_per_minute", shows="winner: 5000 from override"),
    Step("governor usage acme --json", shows='"address": "tenant/acme/tokens_per_minute"'),
    Step("governor audit tail --since 1h --address tenant/acme", shows="override.set"),
    Step("governor signals --label tenant=acme", 1, "tenant=acme: - (absent)"),
    Step("governor freeze --ttl 30m --reason 'INC-42: investigating'", shows="frozen until"),
    Step("governor unfreeze", shows="automation unfrozen"),
    Step("governor policy lint policies/", shows="version "),
]


def _as_written(words: list[str], background: bool) -> str:
    return shlex.join(words) + (" &" if background else "")


def test_the_steps_are_the_readme_tour_in_its_order() -> None:
    assert [_as_written(*command) for command in tour_commands()] == [s.command for s in STEPS]


def test_the_tour_exports_what_the_test_sets() -> None:
    exported = {
        word.partition("=")[0]
        for line in tour_block().splitlines()
        if line.startswith("export ")
        for word in line.split()[1:]
    }
    assert exported == {"GOVERNOR_REDIS__URL", "GOVERNOR_PROMETHEUS__URL"}


@pytest.fixture
def tour(tmp_path: Path, redis_server: RedisServer, prometheus: PrometheusServer) -> Iterator[Tour]:
    """A working copy with the shipped policies, the environment the README exports (plus
    the ports it says to set on a shared machine), a fake model server for :8000."""
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    (tmp_path / "docs").mkdir()
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOVERNOR_")}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    env.update(GOVERNOR_REDIS__URL=redis_server.url, GOVERNOR_PROMETHEUS__URL=prometheus.url)
    server = ServerThread(FakeUpstream().app()).start()
    with redis_server.client() as db:
        tour = Tour(env, tmp_path, server.url, db)
        env.update(
            GOVERNOR_TELEMETRY__PORT=str(tour.telemetry),
            GOVERNOR_GATEWAY__PORT=str(tour.gateway),
        )
        yield tour
        tour.stop()
    server.stop()


def _take(tour: Tour, step: Step, words: list[str], background: bool) -> None:
    if background:
        tour.start(words)
        if step.check is not None:
            step.check(tour, subprocess.CompletedProcess(words, 0, "", ""))
        return
    result = tour.run(words)
    said = f"{step.command}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
    assert result.returncode == step.exit_code, said
    assert step.shows in (result.stdout or result.stderr), said
    if step.check is not None:
        step.check(tour, result)


def test_the_tour_runs_top_to_bottom(tour: Tour) -> None:
    ran = 0
    for step, (words, background) in zip(STEPS, tour_commands(), strict=True):
        assert _as_written(words, background) == step.command
        if not step.elsewhere:
            _take(tour, step, words, background)
            ran += 1
    assert ran == len(STEPS) - 1  # all but the simulator
