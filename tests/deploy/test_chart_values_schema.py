"""values.schema.json rejects bad values with a message naming the key; the values file is
checked by editors through its yaml-language-server line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from helm_python.chart import Chart
from helm_python.errors import HelmRenderError, HelmValuesError
from pydantic import BaseModel, SecretStr

from controller.settings import Settings
from tests.deploy.chart import CHART, env, manifests, render, scenario_values, scenarios

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
    *(
        pytest.param(
            {"gateway": {"enabled": True, "upstream": "http://m:8000", "replicaCount": count}},
            "replicaCount",
            id=f"an enabled gateway with {count} replicas",
        )
        for count in (0, -1, 1.5, "2")
    ),
    *(
        pytest.param(
            {"replicaCount": count}, "replicaCount", id=f"a controller of {count} replicas"
        )
        for count in (0, -1, 1.5)
    ),
    pytest.param(
        {"gateway": {"existingSecret": "Gateway_Keys"}}, "existingSecret", id="gateway Secret name"
    ),
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


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://:pw@node-0:6379,node-1:6379,node-2:6379/0",
        "rediss+cluster://node-0:6379/0",
    ],
)
def test_a_cluster_url_is_accepted_and_kept_in_the_secret(url: str) -> None:
    """docs/redis-contract.md: redis+cluster:// is a Redis URL like the others."""
    values = {"redis": {"url": url}, "gateway": {"enabled": True, "upstream": "http://m:8000"}}
    with Chart.load(CHART) as chart:
        chart.validate_schema(values)
    docs = manifests(render(values))
    for part in ("controller", "gateway"):
        assert "valueFrom" in env(docs, part)["GOVERNOR_REDIS__URL"]
    assert url not in str(docs)


def _secret_variables() -> list[str]:
    """Every GOVERNOR_* variable whose setting is a secret (a SecretStr field)."""
    out = []
    for group, info in Settings.model_fields.items():
        model = info.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        for name, field in model.model_fields.items():
            if SecretStr in (field.annotation, *getattr(field.annotation, "__args__", ())):
                out.append(f"GOVERNOR_{group.upper()}__{name.upper()}")
    return out


RENDER_REFUSALS = [
    pytest.param(
        {"kong": {"enabled": True}}, ["kong.adminUrl", "http://"], id="Kong sink without its URL"
    ),
    pytest.param(
        {"podDisruptionBudget": {"enabled": True, "minAvailable": "", "maxUnavailable": ""}},
        ["podDisruptionBudget.minAvailable", "maxUnavailable"],
        id="a budget with neither bound",
    ),
    pytest.param(
        {
            "gateway": {
                "enabled": True,
                "upstream": "http://m:8000",
                "podDisruptionBudget": {"enabled": True, "minAvailable": ""},
            }
        },
        ["gateway.podDisruptionBudget.minAvailable"],
        id="a gateway budget with neither bound",
    ),
    *(
        pytest.param({"env": {name: "s3cret"}}, [f"env.{name}", "set it through"], id=f"env {name}")
        for name in _secret_variables()
    ),
    pytest.param(
        {"extraEnv": [{"name": "GOVERNOR_KONG__REDIS_PASSWORD", "value": "s3cret"}]},
        ["GOVERNOR_KONG__REDIS_PASSWORD", "valueFrom.secretKeyRef"],
        id="a secret as a plain extraEnv value",
    ),
    pytest.param(
        {"prometheus": {"url": "https://governor:s3cret@prometheus:9090"}},
        ["prometheus.url", "prometheus.password"],
        id="a login in the Prometheus URL",
    ),
    pytest.param(
        {"kong": {"enabled": True, "adminUrl": "http://s3cret@kong:8001"}},
        ["kong.adminUrl", "kong.adminToken"],
        id="a token in the Kong Admin URL",
    ),
    pytest.param(
        {"gateway": {"enabled": True, "upstream": "https://u:s3cret@vllm:8000"}},
        ["gateway.upstream", "gateway.upstreamApiKey"],
        id="a login in the upstream URL",
    ),
]


@pytest.mark.parametrize(("values", "named"), RENDER_REFUSALS)
def test_a_mistake_stops_the_render_naming_the_value_and_the_fix(
    values: dict[str, Any], named: list[str]
) -> None:
    with pytest.raises(HelmRenderError) as refused:
        render(values)
    for text in named:
        assert text in str(refused.value)
    assert "s3cret" not in str(refused.value)


def test_every_secret_setting_is_known_to_the_chart() -> None:
    """The list above follows Settings: a new secret setting is refused in env too."""
    assert len(_secret_variables()) >= 9
    # A secret from a Secret is fine, in extraEnv as through the chart's own values.
    ref = {"secretKeyRef": {"name": "kong-redis", "key": "password"}}
    docs = manifests(
        render({"extraEnv": [{"name": "GOVERNOR_KONG__REDIS_PASSWORD", "valueFrom": ref}]})
    )
    assert env(docs)["GOVERNOR_KONG__REDIS_PASSWORD"]["valueFrom"] == ref


def test_a_disabled_gateway_may_say_no_replicas() -> None:
    values = {"gateway": {"enabled": False, "replicaCount": 0}}
    with Chart.load(CHART) as chart:
        chart.validate_schema(values)
    names = [d["metadata"]["name"] for d in manifests(render(values)) if d["kind"] == "Deployment"]
    assert names == ["governor"]  # the switch for no gateway is enabled: false


@pytest.fixture(scope="module")
def chart_without_schema(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart as `helm template --skip-schema-validation` sees it: no values.schema.json
    (files/policies, a link, copied as files)."""
    copy = tmp_path_factory.mktemp("chart") / "governor"
    shutil.copytree(CHART, copy, symlinks=False)
    (copy / "values.schema.json").unlink()
    return copy


GATEWAY = {"enabled": True, "upstream": "http://m:8000"}
NO_PODS = [
    *(
        pytest.param(
            {"gateway": {**GATEWAY, "replicaCount": count}},
            [
                f"gateway.replicaCount is {json.dumps(count)}",
                "gateway.enabled=false to deploy no gateway",
            ],
            id=f"gateway {count}",
        )
        for count in (0, -2, 1.5, "3")
    ),
    pytest.param(
        {
            "gateway": {
                **GATEWAY,
                "replicaCount": 0,
                "autoscaling": {"enabled": True},
                "resources": {"requests": {"cpu": "500m"}},
            }
        },
        ["gateway.replicaCount is 0"],
        id="gateway 0 under an autoscaler",
    ),
    *(
        pytest.param(
            {"replicaCount": count},
            [f"replicaCount is {count}", "the controller has no off switch"],
            id=f"controller {count}",
        )
        for count in (0, -1, 0.5)
    ),
]


@pytest.mark.parametrize(("values", "named"), NO_PODS)
def test_a_replica_count_that_runs_no_pod_stops_the_render_without_the_schema_too(
    chart_without_schema: Path, values: dict[str, Any], named: list[str]
) -> None:
    # Kubernetes takes `replicas: 0` and runs nothing: the gateway's Service then answers
    # every client with a connection refused, and nothing says why.
    with Chart.load(chart_without_schema) as chart, pytest.raises(HelmRenderError) as refused:
        chart.render(values, name="governor", namespace="governor", is_install=True)
    for text in named:
        assert text in str(refused.value)
    assert "whole number of at least 1" in str(refused.value)


def test_a_disabled_gateways_replicas_are_not_checked_without_the_schema_either(
    chart_without_schema: Path,
) -> None:
    with Chart.load(chart_without_schema) as chart:
        rendered = chart.render({"gateway": {"replicaCount": 0}}, name="governor")
    assert "governor-gateway" not in str(manifests(rendered))
