"""Fixtures for the deployment tests: rendered chart scenarios, promtool, known metric names."""

from __future__ import annotations

import shutil

import pytest

from controller.control.telemetry import Metrics
from controller.gateway.metrics import GatewayMetrics
from tests.deploy.chart import Manifest, rendered_scenario, scenarios
from tests.deploy.series import series_names


@pytest.fixture(scope="session")
def controller_metrics() -> set[str]:
    """Every series name the controller exports (controller/control/telemetry.py)."""
    return series_names(Metrics().registry)


@pytest.fixture(scope="session")
def gateway_metrics() -> set[str]:
    """Every series name the reference gateway exports (controller/gateway/metrics.py)."""
    return series_names(GatewayMetrics(max_tenants=10, max_models=10).registry)


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: apt-get install prometheus (see .ci/run)"
    return path


@pytest.fixture(params=scenarios())
def scenario(request: pytest.FixtureRequest) -> str:
    """Each values scenario: the chart's defaults and every ci/*-values.yaml."""
    name: str = request.param
    return name


@pytest.fixture
def docs(scenario: str) -> tuple[Manifest, ...]:
    """The manifests the scenario renders."""
    return rendered_scenario(scenario)[1]
