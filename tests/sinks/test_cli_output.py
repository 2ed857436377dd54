"""What the Redis-backed commands print: negative numbers judged as numbers, the journal's
JSON line only with `-v`, and tables that stay readable at 80 columns (real redis-server)."""

from __future__ import annotations

import json

import pytest
import redis
from typer.testing import CliRunner, Result

from controller.cli import app
from tests.support.redis import RedisServer

runner = CliRunner()
ADDRESS = "tenant/acme/tokens_per_minute"


@pytest.fixture
def url(redis_server: RedisServer, db: redis.Redis[str]) -> str:
    return redis_server.url


def run(url: str, *args: str, columns: int = 200) -> Result:
    return runner.invoke(app, list(args), env={"GOVERNOR_REDIS__URL": url, "COLUMNS": str(columns)})


def test_a_negative_override_is_refused_as_a_number(url: str, db: redis.Redis[str]) -> None:
    result = run(url, "override", "set", ADDRESS, "-5", "--ttl", "1h", "--reason", "x")
    assert result.exit_code == 2
    assert "override value -5.0 must be a finite number >= 0" in result.output
    assert "No such option" not in result.output
    assert db.keys("*override*") == []


@pytest.mark.parametrize(
    ("address", "value", "message"),
    [
        ("global/concurrent_weight", "2", "concurrent_weight is written only as plan/<plan>/"),
        ("tenant/acme/concurrent_headroom", "0.1", "is written only as global/concurrent_headroom"),
        ("global/concurrent_headroom", "0", "concurrent_headroom must be between 0.001 and 1"),
        ("tenant/acme/concurrent_weight", "2e6", "must be between 0.001 and 1000000"),
    ],
)
def test_a_sharing_term_out_of_place_or_range_is_refused(
    url: str, db: redis.Redis[str], address: str, value: str, message: str
) -> None:
    # A 0 would shed (as any limit's) instead of meaning "no share": refused, never written.
    result = run(url, "override", "set", address, value, "--ttl", "1h", "--reason", "x")
    assert result.exit_code == 2
    assert message in result.output
    assert db.keys("*override*") == []


def test_an_override_of_a_tenant_weight_is_written(url: str, db: redis.Redis[str]) -> None:
    result = run(url, "override", "set", "tenant/acme/concurrent_weight", "8", "--ttl", "1h",
                 "--reason", "contracted burst")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "override tenant/acme/concurrent_weight = 8" in result.output


def test_a_negative_top_up_is_refused_naming_the_amount_given(
    url: str, db: redis.Redis[str]
) -> None:
    result = run(url, "credits", "top-up", "acme", "-50", "--reason", "x")
    assert result.exit_code == 2
    assert "top-up amount -50.0 USD must be a number above 0" in result.output
    assert "No such option" not in result.output
    assert db.keys("*credits*") == []


def test_a_misspelt_option_is_still_refused(url: str) -> None:
    result = run(url, "override", "set", ADDRESS, "5", "--ttl", "1h", "--reason", "x", "--jsno")
    assert result.exit_code == 2
    assert "--jsno" in result.output


def test_a_write_command_logs_its_journal_line_only_with_verbose(url: str) -> None:
    quiet = run(url, "tenants", "set", "acme", "paid")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == ""
    assert quiet.stdout.strip() == "tenant acme: plan paid"
    loud = run(url, "-v", "tenants", "set", "acme", "free")
    assert loud.exit_code == 0, loud.output
    (line,) = loud.stderr.splitlines()
    assert json.loads(line)["event"] == "tenant.set"
    # Quiet or not, the journal in Redis holds both events.
    tail = run(url, "audit", "tail", "--json")
    events = [json.loads(x) for x in tail.stdout.splitlines()]
    assert [(e["kind"], e["details"]["plan"]) for e in events] == [
        ("tenant.set", "paid"),
        ("tenant.set", "free"),
    ]


def test_a_wide_table_is_stacked_at_80_columns_instead_of_wrapping_words(url: str) -> None:
    reason = "INC-42 runaway agent loop on the acme account, see the incident channel"
    set_it = run(url, "override", "set", ADDRESS, "5000", "--ttl", "1h", "--reason", reason)
    assert set_it.exit_code == 0, set_it.output
    narrow = run(url, "override", "list", columns=80)
    assert narrow.exit_code == 0, narrow.output
    lines = narrow.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    # Each value whole on its line beside its column's name, not a word per line.
    assert any(line.split() == ["address", ADDRESS] for line in lines)
    assert any(line.strip() == f"reason   {reason}" for line in lines), narrow.stdout
    wide = run(url, "override", "list", columns=200)
    assert "┃ address" in wide.stdout  # a table where it fits
    assert reason in wide.stdout


HOSTILE = "\x1b[2J\x1b]0;pwned\x07 [bold red]LOUD[/bold red]\nforged line"


def _flat(text: str) -> str:
    return text.replace("\n", "").replace("│", "").replace(" ", "")


@pytest.mark.parametrize(
    "command",
    [
        ("override", "list"),
        ("explain", ADDRESS),
        ("credits", "history", "acme"),
        ("keys", "list"),
    ],
)
def test_stored_reasons_actors_and_names_are_shown_escaped_never_run_by_the_terminal(
    url: str, command: tuple[str, ...]
) -> None:
    # Anyone with the CLI (or Redis) writes these: shown as audit tail shows the journal,
    # an escape sequence escaped and [markup] as text. They reached the terminal raw, and
    # rich took `[bold red]…` as a style and `[link=…]` as a link.
    for args in (
        ("override", "set", ADDRESS, "5", "--ttl", "1h", "--reason", HOSTILE,
         "--actor", "[blink]eve[/blink]\x1b[5m"),
        ("freeze", "--ttl", "1h", "--reason", HOSTILE),
        ("tenants", "set", "acme", "paid"),
        ("credits", "top-up", "acme", "5", "--reason", HOSTILE),
        ("keys", "create", "--tenant", "acme", "--plan", "paid", "--name", HOSTILE),
    ):  # fmt: skip
        written = run(url, *args)
        assert written.exit_code == 0, written.output

    result = run(url, *command, columns=400)

    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout
    assert "\x07" not in result.stdout
    flat = _flat(result.stdout)
    assert "\\x1b[2J\\x1b]0;pwned\\x07[boldred]LOUD[/boldred]\\nforgedline" in flat
    if command[0] in ("override", "explain"):
        assert "[blink]eve[/blink]\\x1b[5m" in flat
