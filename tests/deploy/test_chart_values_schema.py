"""values.schema.json rejects bad values with a message naming the key; the values file is
checked by editors through its yaml-language-server line."""

from __future__ import annotations

import json
from typing import Any

import pytest
from helm_python.chart import Chart
from helm_python.errors import HelmRenderError, HelmValuesError

from tests.deploy.chart import CHART, render, scenario_values, scenarios

BAD_VALUES = [
    pytest.param({"replicas": 2}, "replicas", id="unknown top-level key"),
    pytest.param({"serviceMonitor": {"enabeld": True}}, "enabeld", id="misspelt nested key"),
    pytest.param(
        {"replicaCount": 2, "leaderElection": {"enabled": False}},
        "replicaCount",
        id="two writers without an election",
    ),
    pytest.param({"redis": {"url": ""}}, "url", id="no Redis at all"),
    pytest.param({"redis": {"url": "http://redis:6379"}}, "url", id="not a Redis URL"),
    pytest.param({"redis": {"url": "sentinel://s-0/mymaster"}}, "url", id="kombu-style Sentinel"),
    pytest.param({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy", id="unknown pull policy"),
    pytest.param({"image": {"digest": "latest"}}, "digest", id="digest without sha256"),
    pytest.param(
        {"prometheusRule": {"runbookBaseUrl": "https://example.com/runbooks"}},
        "runbookBaseUrl",
        id="runbook base without a trailing slash",
    ),
    pytest.param({"policies": {"files": {"../escape.yaml": "x"}}}, "escape", id="policy file name"),
    pytest.param({"controller": {"tickSeconds": 0}}, "tickSeconds", id="zero tick"),
    pytest.param({"leaderElection": {"mode": "zookeeper"}}, "mode", id="unknown election"),
    pytest.param({"extraArgs": ["--once"]}, "extraArgs", id="a daemon that exits"),
    pytest.param({"redis": {"keyPrefix": "gov:ernor"}}, "keyPrefix", id="prefix with a colon"),
    pytest.param({"gateway": {"port": 80}}, "port", id="gateway on a root-only port"),
    pytest.param({"gateway": {"upstream": "vllm:8000"}}, "upstream", id="upstream without scheme"),
    pytest.param(
        {"prometheus": {"url": "http://prom:9090/?token=t"}}, "url", id="Prometheus URL query"
    ),
    pytest.param(
        {"gateway": {"jwt": {"algorithms": ["HS256"]}}}, "algorithms", id="symmetric JWT algorithm"
    ),
    pytest.param({"gateway": {"replicas": 2}}, "replicas", id="misspelt gateway key"),
]


@pytest.mark.parametrize(("values", "key"), BAD_VALUES)
def test_a_bad_value_is_rejected_naming_its_key(values: dict[str, Any], key: str) -> None:
    with Chart.load(CHART) as chart:
        with pytest.raises(HelmValuesError) as rejected:
            chart.validate_schema(values)
        assert key in str(rejected.value)
    # An install runs the same check: nothing is rendered.
    with pytest.raises(HelmValuesError):
        render(values)


@pytest.mark.parametrize("scenario", scenarios())
def test_every_scenario_passes_the_schema(scenario: str) -> None:
    with Chart.load(CHART) as chart:
        # Raises HelmValuesError naming the key when the scenario breaks the schema.
        chart.validate_schema(scenario_values(scenario))
    assert render(scenario_values(scenario))  # and the chart renders with it


def test_a_chart_without_policies_refuses_to_render() -> None:
    with pytest.raises(HelmRenderError, match="no policies"):
        render({"policies": {"bundled": False}})


def test_values_yaml_names_its_schema_for_editors() -> None:
    first_line = (CHART / "values.yaml").read_text().splitlines()[0]
    assert first_line == "# yaml-language-server: $schema=values.schema.json"
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    with Chart.load(CHART) as chart:
        assert set(chart.values) == set(schema["properties"]) - {"global"}
