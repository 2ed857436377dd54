"""`governor simulate` through the CLI: a short scenario and a trace, scorecards as JSON and
a PNG on disk."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from controller.cli import app
from controller.cli.simulate import _print_scorecards
from controller.sim.compare import Comparison
from controller.sim.scenario import load_scenario, scenario_names
from controller.sim.scorecard import Scorecard

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
    # The static search on the in-flight knob: whole requests within 0.1–2× of what the
    # short pool holds at once (its 4 GPUs × 8 batch slots = 32, fewer than its KV cache).
    found = payload["scorecards"]["static"]["knob_value"]
    assert found == round(found)
    assert 3 <= found <= 64
    for card in payload["scorecards"].values():
        assert 0 <= card["utilization_within"] <= 1
        assert card["budget_overrun"] == 0
    png = Path(payload["png"])
    assert png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "journal-policies.log").read_text().count("limit.changed") > 0


def _trace(tmp_path: Path) -> Path:
    """Four minutes of an unseen trace, in the Azure schema."""
    trace = tmp_path / "mine.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [
        f"2024-01-01 00:{i // 60:02d}:{i % 60:02d}.5,{400 + i},{50 + i % 7}" for i in range(240)
    ]
    trace.write_text("\n".join(rows) + "\n")
    return trace


def test_an_unseen_trace_is_scored_by_the_scoreboard_too(tmp_path: Path) -> None:
    trace = _trace(tmp_path)
    markdown = tmp_path / "board.md"
    command = ["simulate", "--trace", str(trace), "--speed", "2", "--seed", "5"]
    result = runner.invoke(
        app, [*command, "--seeds", "2", "--workers", "0", "--markdown", str(markdown)]
    )
    assert result.exit_code == 0, result.output
    text = markdown.read_text()
    assert "### trace-mine-2x" in text  # the trace, at the speed given
    assert "scored trace-mine-2x seed 6 (2/2;" in result.output or (
        "scored trace-mine-2x seed 5 (2/2;" in result.output
    )  # from the seed given


def test_the_scoreboard_refuses_options_it_cannot_honour(short_scenario: Path) -> None:
    for extra, named in (
        (["--live"], "--live"),
        (["--json"], "--json"),
        (["--out", "x"], "--out"),
    ):
        result = runner.invoke(app, ["simulate", str(short_scenario), "--seeds", "2", *extra])
        assert result.exit_code == 2
        assert f"{named}: not used by the scoreboard" in result.output
    result = runner.invoke(app, ["simulate", "--all", "--seed", "3"])
    assert result.exit_code == 2
    assert "describe one scenario; not with --all" in result.output
    result = runner.invoke(app, ["simulate", str(short_scenario), "--speed", "2"])
    assert result.exit_code == 2
    assert "--speed, --start and --duration apply to --trace without a SCENARIO" in result.output


def test_simulate_human_output_and_a_trace(tmp_path: Path) -> None:
    trace = _trace(tmp_path)
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


def test_the_help_lists_every_shipped_scenario_and_baseline() -> None:
    result = runner.invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for name in scenario_names():
        assert name in text, name
    assert "Gradient2" in text
    assert "static limits and plain AIMD" not in text


def test_traffic_on_a_plan_the_policies_do_not_define_is_refused(
    short_scenario: Path, tmp_path: Path
) -> None:
    # An SRE's own set names its own plans; the shipped scenarios put tenants on free, paid
    # and enterprise, which a gateway would refuse (403) and the simulator served unlimited.
    policies = tmp_path / "mine"
    policies.mkdir()
    (policies / "p.yaml").write_text(
        "apiVersion: governor/v1\nkind: Plan\nmetadata: {name: hobby}\n"
        "spec: {limits: {requests_per_minute: 10}}\n---\n"
        "apiVersion: governor/v1\nkind: Limits\nmetadata: {name: l}\n"
        "spec: {default_plan: hobby}\n"
    )
    runs = (
        [str(short_scenario)],
        [str(short_scenario), "--seeds", "2"],
        ["--trace", str(_trace(tmp_path))],
    )
    for words in runs:
        result = runner.invoke(app, ["simulate", *words, "--policies", str(policies)])
        assert result.exit_code == 2, result.output
        assert f"puts traffic on plans {policies} does not define: " in result.output
        assert "(plans: hobby). A gateway refuses an unknown plan" in result.output
    assert "'enterprise' (the trace's tenants)" in result.output


def test_the_scorecard_prints_a_static_value_in_full_not_as_an_exponent(
    short_scenario: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A static tokens-per-minute value was printed `1.84999e+06` (`{:g}`)."""
    card = Scorecard(
        variant="policies", window=(0.0, 60.0), attainment=0.5, p99_ttft=1.0,
        baseline_p99_ttft=1.0, p99_increase=0.0, utilization_mean=0.8, utilization_within=1.0,
        goodput_ratio=0.9, flaps_per_hour=1.0, settling_ticks=2, recovery_ticks=0,
        budget_overrun=0.0, jain=0.99, worst_share=0.9, throttle_ticks=None,
        runaway_attainment=None, quiet_attainment=None, timed_out=1234, errors=0,
        knob_value=12.5,  # no variant but static has one; here to show a small value
    )  # fmt: skip
    static = dataclasses.replace(card, variant="static", knob_value=1_849_990.0000001,
                                 knob_edge=True)  # fmt: skip
    world = load_scenario(str(short_scenario))
    comparison = Comparison(world, tmp_path, cards={"policies": card, "static": static})
    written = io.StringIO()
    notes = Console(file=written, width=200)

    _print_scorecards(notes, comparison, world, tmp_path / "plot.png", tmp_path)

    row = next(x for x in capsys.readouterr().out.splitlines() if "static value found" in x)
    assert row.replace("│", " ").split()[-2:] == ["12.5", "1,849,990"]
    assert "static: 1,849,990 is on the edge of the range searched" in written.getvalue()


def test_a_scenario_scored_against_another_slo_than_the_policies_aim_at_is_told(
    short_scenario: Path,
) -> None:
    # A scenario written with a 1.5 s TTFT SLO beside policies whose queue aims at 2 s
    # scored the policies 1.6 points under the best static limit, which was searched for
    # the 1.5 s SLO itself; the same scenario at 2 s scored them level with it.
    from controller.cli.simulate import slo_notes
    from tests.sim.conftest import POLICIES

    world = load_scenario(str(short_scenario))
    assert slo_notes([world.model_copy(update={"slo": world.slo.model_copy(
        update={"ttft_seconds": 2.0})})], POLICIES) == []  # fmt: skip
    strict = world.model_copy(update={"slo": world.slo.model_copy(update={"ttft_seconds": 1.5})})
    (note,) = slo_notes([strict], POLICIES)
    assert "scenario 'short' scores a TTFT SLO of 1.5s" in note
    assert "AdaptiveLimit 'global-inflight-by-gpu' aims its queue at 2s" in note
    assert "give both the same value" in note
