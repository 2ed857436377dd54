"""`governor signals` against a real Prometheus: what on-call sees, as a table and as JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli import app
from tests.signals import history
from tests.support.prometheus import PrometheusServer
from tests.support.redis import free_port

pytestmark = pytest.mark.integration

POLICIES = f"""\
apiVersion: governor/v1
kind: ThrottlePolicy
metadata: {{name: gpu-hot}}
spec:
  signals:
    gpu_util: {{query: 'avg(gpu_util)', stale_after: 1d}}
  when: gpu_util > 0.9
  actions: [{{target: global/requests_per_second, set: 100}}]
---
apiVersion: governor/v1
kind: ThrottlePolicy
metadata: {{name: spenders}}
spec:
  per: tenant
  signals:
    spend: {{query: '{history.SPEND}', stale_after: 1d}}
    backlog: {{query: 'sum by (tenant) (queue_missing_metric)', stale_after: 1d}}
  when: spend > 1.0 && backlog > 1.0
  actions: [{{target: tenant/$tenant/tokens_per_minute, set: 1000}}]
"""


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    (tmp_path / "policies.yaml").write_text(POLICIES)
    return tmp_path


def run(url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, ["signals", *args], env={"GOVERNOR_PROMETHEUS__URL": url, "COLUMNS": "200"}
    )
    return result.exit_code, result.stdout


def test_json_shows_each_signal_with_value_age_and_validity(
    history_prometheus: PrometheusServer, policy_dir: Path, now: float
) -> None:
    code, out = run(history_prometheus.url, "--policies", str(policy_dir), "--json")
    assert code == 1  # the backlog signal reads nothing
    found = {(r["policy"], r["signal"]): r for r in json.loads(out)["signals"]}
    gpu = found["ThrottlePolicy/gpu-hot", "gpu_util"]
    assert (gpu["validity"], gpu["value"], gpu["series"]) == ("ok", pytest.approx(0.65), None)
    assert gpu["age_seconds"] >= 60
    spend = found["ThrottlePolicy/spenders", "spend"]
    tenants = len({series.labels["tenant"] for series in history.spend(now)})
    assert (spend["validity"], spend["series"], spend["usable"]) == ("ok", tenants, tenants)
    # The command evaluates at its own `now`, after the history's last sample by however long
    # the session has run (the history is made once): past 1.1 sample intervals, rate()
    # extrapolates to the window's end by half an interval only (Prometheus), so every
    # tenant's rate reads low by the same share (24% once on a loaded machine). Their ratio
    # does not move: the peak tenants' rate is 5× the others'.
    assert spend["max"] / spend["min"] == pytest.approx(
        history.PEAK_RATE / history.BASE_RATE, rel=0.05
    )
    assert 0.5 * history.BASE_RATE < spend["min"] < history.BASE_RATE * 1.15
    backlog = found["ThrottlePolicy/spenders", "backlog"]
    assert (backlog["validity"], backlog["detail"]) == ("empty", "query returned no series")


def test_one_policy_as_a_table_exits_0_when_all_its_signals_are_usable(
    history_prometheus: PrometheusServer, policy_dir: Path
) -> None:
    code, out = run(history_prometheus.url, "--policies", str(policy_dir), "--policy", "gpu-hot")
    assert code == 0
    assert "ThrottlePolicy/gpu-hot" in out
    assert "0.65" in out
    assert "spenders" not in out


def test_an_unknown_policy_exits_2_naming_the_known_ones(
    history_prometheus: PrometheusServer, policy_dir: Path
) -> None:
    result = CliRunner().invoke(
        app,
        ["signals", "--policies", str(policy_dir), "--policy", "nope"],
        env={"GOVERNOR_PROMETHEUS__URL": history_prometheus.url},
    )
    assert result.exit_code == 2
    assert "ThrottlePolicy/gpu-hot, ThrottlePolicy/spenders" in result.stderr


def test_prometheus_down_shows_errors_and_exits_1(policy_dir: Path) -> None:
    url = f"http://user:secret@127.0.0.1:{free_port()}"
    code, out = run(url, "--policies", str(policy_dir), "--json")
    assert code == 1
    body = json.loads(out)
    assert {r["validity"] for r in body["signals"]} == {"error"}
    assert all("Connection refused" in r["detail"] for r in body["signals"])
    assert "secret" not in out


def test_a_vector_shows_its_largest_label_values_in_json_and_table(
    history_prometheus: PrometheusServer, policy_dir: Path
) -> None:
    args = ("--policies", str(policy_dir), "--policy", "spenders")
    code, out = run(history_prometheus.url, *args, "--json", "--top", "2")
    assert code == 1
    spend = {r["signal"]: r for r in json.loads(out)["signals"]}["spend"]
    values = spend["values"]
    assert len(values) == 2
    assert values[0]["value"] == pytest.approx(spend["max"])  # the largest first
    assert values[0]["value"] >= values[1]["value"]
    assert all(v["usable"] for v in values)
    _, table = run(history_prometheus.url, *args, "--top", "2")
    assert f"tenant={values[0]['label']}: " in table


def test_label_shows_one_tenants_spend_and_says_when_it_is_absent(
    history_prometheus: PrometheusServer, policy_dir: Path
) -> None:
    chosen = ("--policies", str(policy_dir), "--policy", "spenders")
    _, every = run(history_prometheus.url, *chosen, "--top", "100", "--json")
    spend = {r["signal"]: r for r in json.loads(every)["signals"]}["spend"]
    steady = {v["label"]: v["value"] for v in spend["values"]}["steady"]
    assert steady > 0
    args = (*chosen, "--label", "tenant=steady")
    code, out = run(history_prometheus.url, *args, "--label", "tenant=nobody", "--json")
    assert code == 1
    spend = {r["signal"]: r for r in json.loads(out)["signals"]}["spend"]
    assert spend["values"] == [
        {"label": "steady", "value": pytest.approx(steady, rel=0.01), "usable": True},
        {"label": "nobody", "value": None, "usable": False},
    ]
    _, table = run(history_prometheus.url, *args)
    shown = re.search(r"tenant=steady: (\S+)\s", table)
    assert shown is not None, table
    assert float(shown[1]) == pytest.approx(steady, rel=0.01)
    assert "tenant=jumper" not in table


@pytest.mark.parametrize("given", ["tenant", "=acme", "tenant="])
def test_a_malformed_label_exits_2(history_prometheus: PrometheusServer, given: str) -> None:
    result = CliRunner().invoke(
        app, ["signals", "--label", given], env={"GOVERNOR_PROMETHEUS__URL": history_prometheus.url}
    )
    assert result.exit_code == 2
    assert "NAME=VALUE" in result.output


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GOVERNOR_PROMETHEUS__BEARER_TOKEN", "tok-S3CRET\n"),  # a Secret made from a file
        ("GOVERNOR_PROMETHEUS__HEADERS", '{"Authorization": "Basic UzNDUkVU\\r\\n"}'),
        ("GOVERNOR_PROMETHEUS__HEADERS", '{"X-Scope-OrgID": " S3CRET"}'),
    ],
)
def test_a_token_no_http_header_can_carry_exits_2_without_showing_it(
    history_prometheus: PrometheusServer, policy_dir: Path, variable: str, value: str
) -> None:
    # requests refused the header on every query and quoted it whole in its error: the token
    # was in each signal's detail, `governor signals`, the daemon's log lines and /readyz.
    result = CliRunner().invoke(
        app,
        ["signals", "--policies", str(policy_dir), "--json"],
        env={"GOVERNOR_PROMETHEUS__URL": history_prometheus.url, variable: value},
    )

    assert result.exit_code == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {variable}: ")
    assert "(not shown)" in line
    assert "remove it" in line
    assert "S3CRET" not in result.output
    assert "UzNDUkVU" not in result.output


def test_a_header_the_client_refuses_is_never_quoted_in_a_signal(
    history_prometheus: PrometheusServer, now: float
) -> None:
    # Settings refuse such a token; the source itself never quotes one either.
    from pydantic import SecretStr

    from controller.model import SignalKey
    from controller.settings import PrometheusSettings
    from controller.signals import PrometheusSource

    unchecked = PrometheusSettings(url=history_prometheus.url).model_copy(
        update={"bearer_token": SecretStr("tok-S3CRET\n")}  # model_copy does not validate
    )
    with PrometheusSource(unchecked) as source:
        sample = source.fetch([SignalKey("avg(gpu_util)")], now).samples[SignalKey("avg(gpu_util)")]

    assert "S3CRET" not in sample.detail
    assert "GOVERNOR_PROMETHEUS__BEARER_TOKEN" in sample.detail
