"""Fixtures shared by every test directory: one real redis-server per session; and, before
any test runs, one line naming the programs the selected tests start that are missing."""

from __future__ import annotations

import gc
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import structlog

from tests.support.prometheus import PROMETHEUS, PROMTOOL
from tests.support.redis import RedisServer

TESTS = Path(__file__).parent
_REDIS = frozenset({"cluster", "daemon", "deploy", "gateway", "kong", "nginx", "sim", "sinks"})
_PROMETHEUS = frozenset({"daemon", "deploy", "signals", "sim"})
_NGINX = frozenset({"nginx"})
# Each program the tests start: its Debian package (.ci/system-packages installs them all)
# and the test folders that start it. Without this check a missing one surfaced as dozens of
# FileNotFoundError deep in fixtures.
PROGRAMS: dict[str, tuple[str, frozenset[str]]] = {
    "redis-server": ("redis-server", _REDIS),
    "redis-cli": ("redis-tools", frozenset({"cluster"})),  # forms the test Redis Cluster
    PROMETHEUS: ("prometheus", _PROMETHEUS),
    PROMTOOL: ("prometheus", _PROMETHEUS),
    "nginx": ("nginx-extras", _NGINX),
    "lua5.1": ("lua5.1", _NGINX),
    "luac5.1": ("lua5.1", _NGINX),
    "node": ("nodejs", frozenset({"clients"})),  # the OpenAI Node SDK (tests/clients)
    "npm": ("npm", frozenset({"clients"})),
}


def missing_programs(folders: set[str]) -> dict[str, str]:
    """Program → package, for each program tests in `folders` start that is not installed."""
    return {
        program: package
        for program, (package, users) in PROGRAMS.items()
        if users & folders and shutil.which(program) is None
    }


def pytest_collection_finish(session: pytest.Session) -> None:
    folders = {
        item.path.relative_to(TESTS).parts[0]
        for item in session.items
        if item.path.is_relative_to(TESTS)
    }
    missing = missing_programs(folders)
    if missing:
        named = ", ".join(f"{program} ({package})" for program, package in missing.items())
        packages = " ".join(sorted(set(missing.values())))
        pytest.exit(
            f"missing programs: {named}; install them with: apt-get install -y "
            f"--no-install-recommends {packages} (the whole list: .ci/system-packages)",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the tests' own on a free port (never the machine's 6379)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def db(redis_server: RedisServer) -> Iterator[redis.Redis[str]]:
    """A plain client on an empty server (for assertions, hand edits and writing limits)."""
    with redis_server.client() as client:
        client.flushall()
        yield client


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Each test starts from structlog's defaults: a CLI command run in-process configures
    logging at `warning` (quiet by default), which would hide info events from a later
    test's `capture_logs()`."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _no_terminal_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's tables fit $COLUMNS when it is set (else 160 columns for a pipe): a terminal
    size inherited from whoever runs the tests (a narrow window, pytest-xdist's workers) must
    not change what a test reads."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)


# Folders whose tests drive third-party clients (LiteLLM, LangChain, the OpenAI SDK) that leave
# event loops and connections of their own unclosed.
_LEAKY_THIRD_PARTY = "clients"
_previous_folder: list[str] = [""]


@pytest.fixture(scope="session", autouse=True)
def _collect_third_party_leftovers_at_the_end() -> Iterator[None]:
    """The same at the end of a session (a worker of pytest-xdist, or `pytest tests/clients`
    alone) whose last test was in tests/clients: else pytest reports the clients' leftovers
    as errors once every test has passed."""
    yield
    if _previous_folder[0] == _LEAKY_THIRD_PARTY:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


@pytest.fixture(autouse=True)
def _collect_third_party_leftovers(request: pytest.FixtureRequest) -> None:
    """The first test after tests/clients collects what those clients left, with their
    ResourceWarning silenced: left to a later, random collection, it was raised (as an
    error, like every warning here) inside an unrelated test. Our own code's leaks still
    fail the test that collects them."""
    folder = request.path.parent.name
    if _previous_folder[0] == _LEAKY_THIRD_PARTY and folder != _LEAKY_THIRD_PARTY:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
    _previous_folder[0] = folder
