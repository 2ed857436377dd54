"""The traces a replay reads: the Azure LLM inference format, BurstGPT, Mooncake's JSON lines
and the same columns under other names; windows of a long trace; every refusal names the file,
the line and the fix."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.sim.compare import load_trace, trace_scenario
from controller.sim.scenario import Scenario, ScenarioError
from controller.sim.trace import read_trace, replay_window
from tests.sim.conftest import POLICIES


def _write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_the_azure_format_with_seven_digit_fractions_and_zones(tmp_path: Path) -> None:
    trace = read_trace(
        _write(
            tmp_path / "azure.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n"
            "2023-11-16 18:15:46.6805900,374,44\n"
            "2023-11-16T18:15:47Z,100,10\n"
            "2023-11-16T20:15:48.5+02:00,200,20\n",  # 18:15:48.5 UTC
        )
    )
    assert trace.offsets.tolist() == pytest.approx([0.0, 1.0 - 0.68059, 1.81941])
    assert trace.prompt.tolist() == [374.0, 100.0, 200.0]
    assert trace.output.tolist() == [44.0, 10.0, 20.0]


def test_burstgpt_rows_in_seconds_with_their_failures_kept(tmp_path: Path) -> None:
    """BurstGPT's columns (extra ones ignored), times in seconds, rows out of order, a failure
    with 0 response tokens kept: the request still arrived."""
    trace = read_trace(
        _write(
            tmp_path / "BurstGPT_1.csv",
            "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
            "45,ChatGPT,1087,230,1317,Conversation log\n"
            "5,ChatGPT,472,18,490,Conversation log\n"
            "118,GPT-4,417,0,417,API log\n",
        )
    )
    assert trace.offsets.tolist() == [0.0, 40.0, 113.0]
    assert trace.prompt.tolist() == [472.0, 1087.0, 417.0]
    assert trace.output.tolist() == [18.0, 230.0, 0.0]


def test_mooncake_json_lines_in_milliseconds_gzipped(tmp_path: Path) -> None:
    lines = [
        {"timestamp": 0, "input_length": 6955, "output_length": 52, "hash_ids": [0, 1]},
        {"timestamp": 2500, "input_length": 6472, "output_length": 26, "hash_ids": [2]},
    ]
    path = _write(tmp_path / "mooncake.jsonl.gz", "".join(json.dumps(x) + "\n" for x in lines))
    trace = read_trace(path)
    assert trace.offsets.tolist() == [0.0, 2.5]
    assert trace.prompt.tolist() == [6955.0, 6472.0]
    # The unit named overrides the format's: the same file read in seconds.
    assert read_trace(path, "s").offsets.tolist() == [0.0, 2500.0]


def test_other_names_for_the_same_columns_and_a_byte_order_mark(tmp_path: Path) -> None:
    trace = read_trace(
        _write(
            tmp_path / "mine.csv",
            "\ufeffarrival_time,prompt_tokens,completion_tokens\n0.5,10,3\n1.25,20,4\n",
        )
    )
    assert trace.offsets.tolist() == [0.0, 0.75]
    assert trace.output.tolist() == [3.0, 4.0]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "cols.csv",
            "when,prompt_tokens,tokens_out\n1,2,3\n",
            r"cols\.csv:1: no column for the arrival time \(one of timestamp.*the output "
            r"tokens.*BurstGPT",
        ),
        (
            "row.csv",
            "Timestamp,Request tokens,Response tokens\n1,2,3\n2,-4,5\n",
            r"row\.csv:3: not a token count \(a number ≥ 0\): '-4'",
        ),
        (
            "short.csv",
            "Timestamp,Request tokens,Response tokens\n1,2,3\n2,4\n",
            r"short\.csv:3: 2 fields where the header has 3",
        ),
        (
            "time.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n",
            r"time\.csv:2: .*'yesterday'",
        ),
        ("nan.csv", "timestamp,input_tokens,output_tokens\nnan,1,2\n", r"nan\.csv:2: not a finite"),
        (
            "lines.jsonl",
            '{"timestamp": 1, "input_length": 2, "output_length": 3}\n[1, 2, 3]\n',
            r"lines\.jsonl:2: not a JSON object",
        ),
        (
            "broken.jsonl",
            '{"timestamp": 1, "input_length": 2, "output_length": 3}\n{"timestamp": \n',
            r"broken\.jsonl:2: not JSON",
        ),
        ("empty.csv", "", r"empty\.csv:1: no header"),
        ("header.csv", "Timestamp,Request tokens,Response tokens\n", r"holds no requests"),
    ],
)
def test_a_trace_that_cannot_be_read_is_refused_naming_the_line(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    with pytest.raises(ScenarioError, match=message):
        read_trace(_write(tmp_path / name, text))


def _long_trace(tmp_path: Path, days: float = 2.0, every: float = 600.0) -> Path:
    times = np.arange(0.0, days * 86400.0, every)
    rows = "".join(f"{t:.0f},ChatGPT,500,100,600,Conversation log\n" for t in times)
    header = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
    return _write(tmp_path / "long.csv", header + rows)


def test_a_window_of_a_long_trace_and_the_scenario_that_replays_it(tmp_path: Path) -> None:
    path = _long_trace(tmp_path)
    whole = read_trace(path)
    window = replay_window(whole, path, 2.0, 86400.0, 3600.0)  # from 1 day, 1 h at 2×
    assert len(window.offsets) == 12  # 2 h of the trace, a request every 10 minutes
    assert window.offsets[0] == 0.0
    world = trace_scenario(window, path, 2.0, 7, 86400.0, None, 3600.0)
    assert world.name == "trace-long-2x"
    assert world.trace is not None
    assert (world.trace.start, world.trace.speed, world.duration) == (86400.0, 2.0, 3600.0)
    # The scenario alone finds the same window again (as a scoreboard's worker does).
    again = load_trace(world)
    assert again is not None
    assert again.offsets.tolist() == window.offsets.tolist()
    with pytest.raises(ScenarioError, match=r"spans 1d23h50m at 1×, more than a day.*--duration"):
        replay_window(whole, path, 1.0, 0.0, None)
    with pytest.raises(ScenarioError, match=r"no request from 3d for 1h of the trace"):
        replay_window(whole, path, 1.0, 3 * 86400.0, 3600.0)


def test_a_scenario_file_names_the_window_and_the_unit(tmp_path: Path) -> None:
    path = _long_trace(tmp_path, days=1.0, every=60.0)
    scenario = Scenario.model_validate(
        {
            "name": "window",
            "duration": "30m",
            "pools": [{"name": "p", "gpus": 1, "capacity_tokens_per_second": 2000}],
            "trace": {"file": str(path), "start": "2h", "time_unit": "s"},
        }
    )
    trace = load_trace(scenario)
    assert trace is not None
    assert len(trace.offsets) == 30
    with pytest.raises(ValueError, match="time_unit"):
        Scenario.model_validate({**scenario.model_dump(), "trace": {"file": "x", "time_unit": "h"}})


def test_the_cli_refuses_an_unbounded_long_replay_and_bad_options(tmp_path: Path) -> None:
    path = _long_trace(tmp_path)
    runner = CliRunner()
    cases = {
        ("--trace", str(path)): "more than a day of simulated time",
        ("--trace", str(path), "--duration", "0s"): "--duration 0s: give a window longer",
        ("--trace", str(path), "--start", "-5m"): "--start: '-5m' is not a duration",
        ("--trace", str(path), "--time-unit", "h"): "--time-unit 'h': give s or ms",
        ("burst-5x", "--start", "1h"): "--speed, --start and --duration apply to --trace",
        ("--all", "--duration", "1h"): "describe one scenario; not with --all",
    }
    for args, message in cases.items():
        result = runner.invoke(app, ["simulate", *args, "--policies", str(POLICIES)])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)


def test_a_window_of_a_mooncake_trace_is_simulated_and_scored(tmp_path: Path) -> None:
    """An unseen trace in another format, a window of it, end to end: every variant is scored
    over the requests of that window alone (a 0-token failure is served, not a miss)."""
    lines = [
        {"timestamp": 1000 * t, "input_length": 300 + t % 500, "output_length": t % 90}
        for t in range(1800)
    ]
    path = _write(tmp_path / "mooncake.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    args = ["simulate", "--trace", str(path), "--start", "10m", "--duration", "4m", "--json"]
    args += ["--workers", "0", "--policies", str(POLICIES), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["scenario"] == "trace-mooncake-1x"
    for name, card in payload["scorecards"].items():
        assert card["window"] == [0.0, 240.0], name
        # One request a second on a pool sized for it: every variant serves the window.
        assert card["attainment"] > 0.95, (name, card["attainment"])
