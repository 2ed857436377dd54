"""`governor simulate` through the CLI: a short scenario and a trace, scorecards as JSON and
a PNG on disk."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from controller.cli import app

runner = CliRunner()


def test_simulate_a_short_scenario(short_scenario: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["simulate", str(short_scenario), "--workers", "0", "--json", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["scenario"] == "short"
    assert set(payload["scorecards"]) == {
        "policies",
        "static",
        "plain-aimd",
        "gradient",
        "no-limit",
    }
    # The static search: whole req/s within 0.1–2× the short pool's ~14 req/s.
    found = payload["scorecards"]["static"]["knob_value"]
    assert found == round(found)
    assert 1 <= found <= 28
    for card in payload["scorecards"].values():
        assert 0 <= card["utilization_within"] <= 1
        assert card["budget_overrun"] == 0
    png = Path(payload["png"])
    assert png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "journal-policies.log").read_text().count("limit.changed") > 0


def test_simulate_human_output_and_a_trace(tmp_path: Path) -> None:
    trace = tmp_path / "mine.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [
        f"2024-01-01 00:{i // 60:02d}:{i % 60:02d}.5,{400 + i},{50 + i % 7}" for i in range(240)
    ]
    trace.write_text("\n".join(rows) + "\n")
    result = runner.invoke(
        app,
        [
            "simulate",
            "--trace",
            str(trace),
            "--speed",
            "2",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "scorecard: trace-mine-2x" in result.stdout
    assert "goodput / oracle" in result.stdout
    assert (tmp_path / "o" / "trace-mine-2x.png").is_file()


def test_simulate_without_a_scenario_says_what_to_give() -> None:
    result = runner.invoke(app, ["simulate"])
    assert result.exit_code == 2
    assert "give a SCENARIO" in result.output
