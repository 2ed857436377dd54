"""The default links resolve: the controller's telemetry port serves the shipped runbooks and
docs, and the default journal runbook base and problem-type base point at it."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from controller.control.telemetry import Health, Metrics, TelemetryServer
from controller.gateway.responses import Answers
from controller.journal.events import runbook_link
from controller.settings import Settings
from tests.support.redis import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Default settings but a free telemetry port (the links follow it)."""
    monkeypatch.setenv("GOVERNOR_TELEMETRY__PORT", str(free_port()))
    return Settings()


@pytest.fixture
def telemetry(settings: Settings) -> Iterator[TelemetryServer]:
    server = TelemetryServer(
        "127.0.0.1", settings.telemetry.port, Metrics(CollectorRegistry()), Health(5.0)
    )
    server.start()
    yield server
    server.stop()


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read(), answer.headers["Content-Type"]
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read(), refused.headers["Content-Type"]


@pytest.mark.usefixtures("telemetry")
def test_the_default_runbook_link_of_a_journal_event_resolves(settings: Settings) -> None:
    link = runbook_link("runbooks/GovernorTenantCostAnomaly.md", settings.journal.runbook_base_url)
    assert (
        link == f"http://127.0.0.1:{settings.telemetry.port}/runbooks/GovernorTenantCostAnomaly.md"
    )
    status, body, kind = get(link)
    assert status == 200
    assert kind == "text/markdown; charset=utf-8"
    assert body == (REPO / "runbooks" / "GovernorTenantCostAnomaly.md").read_bytes()
    procedure = runbook_link(
        "runbooks/procedures/freeze-automation.md", settings.journal.runbook_base_url
    )
    assert get(procedure or "")[0] == 200


@pytest.mark.usefixtures("telemetry")
def test_the_default_problem_type_resolves_to_its_section(settings: Settings) -> None:
    uri = Answers(settings.gateway.problem_base_url, 0.0).type_uri("unauthenticated")
    page, _, anchor = uri.partition("#")
    status, body, _ = get(page)
    assert status == 200
    assert body == (REPO / "docs" / "gateway.md").read_bytes()
    assert anchor == "unauthenticated"


@pytest.mark.usefixtures("telemetry")
@pytest.mark.parametrize(
    "path",
    ["/runbooks/../pyproject.toml", "/runbooks/%2e%2e/README.md", "/docs/nothing.md",
     "/runbooks/", "/docs/../controller/settings.py", "/runbooks/GovernorGpuSaturation.txt"],
)  # fmt: skip
def test_nothing_else_is_served(settings: Settings, path: str) -> None:
    status, body, _ = get(f"http://127.0.0.1:{settings.telemetry.port}{path}")
    assert status == 404
    assert b"no shipped page" in body


def test_set_links_are_kept_and_port_0_leaves_the_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GOVERNOR_TELEMETRY__PORT", "9200")
    monkeypatch.setenv("GOVERNOR_JOURNAL__RUNBOOK_BASE_URL", "https://runbooks.example.com/")
    moved = Settings()
    assert moved.journal.runbook_base_url == "https://runbooks.example.com/"
    assert moved.gateway.problem_base_url == "http://127.0.0.1:9200/docs/gateway.md"
    monkeypatch.setenv("GOVERNOR_TELEMETRY__PORT", "0")
    assert Settings().gateway.problem_base_url == "http://127.0.0.1:9100/docs/gateway.md"
