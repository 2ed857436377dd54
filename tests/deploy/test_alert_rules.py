"""The alerts (one source: files/alerts.yaml) pass `promtool check rules` as rendered by the
chart, `promtool test rules` fires and does not fire each of them, and they read only series
the controller and the gateway really export."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.chart import CHART, alert_rules, manifests, render, rendered_scenario
from tests.deploy.series import METRIC, PENDING_METRICS

TESTS = Path(__file__).with_name("alerts_test.yaml")
SOURCE = CHART / "files" / "alerts.yaml"
# The runbooks the controller's Service serves (release governor, namespace governor).
DEFAULT_BASE = "http://governor.governor.svc:9100/runbooks/"


def _rules(values: dict[str, Any]) -> list[dict[str, Any]]:
    return alert_rules(manifests(render(values)))


def _promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, check=False, timeout=120
    )


def _write_rules(rules: list[dict[str, Any]], path: Path, keep: tuple[str, ...] = ()) -> Path:
    """A Prometheus rule file of `rules`; with `keep`, only those annotations."""
    if keep:
        rules = [
            {**r, "annotations": {k: v for k, v in r["annotations"].items() if k in keep}}
            for r in rules
        ]
    path.write_text(yaml.safe_dump({"groups": [{"name": "governor", "rules": rules}]}))
    return path


@pytest.fixture(scope="module")
def default_rules() -> list[dict[str, Any]]:
    return _rules({"prometheusRule": {"enabled": True}})


def test_promtool_accepts_the_source_and_the_rendered_rules(
    promtool: str, default_rules: list[dict[str, Any]], tmp_path: Path
) -> None:
    checked = _promtool(promtool, "check", "rules", SOURCE)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for name, rules in {
        "default": default_rules,
        "production": alert_rules(rendered_scenario("production-values.yaml")[1]),
    }.items():
        path = _write_rules(rules, tmp_path / f"{name}.yaml")
        checked = _promtool(promtool, "check", "rules", path)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert f"SUCCESS: {len(rules)} rules found" in checked.stdout


def test_promtool_unit_tests_pass(
    promtool: str, default_rules: list[dict[str, Any]], tmp_path: Path
) -> None:
    _write_rules(default_rules, tmp_path / "rules.yaml", keep=("summary", "runbook_url"))
    shutil.copy(TESTS, tmp_path / TESTS.name)
    result = _promtool(promtool, "test", "rules", tmp_path / TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_catch_a_broken_alert(
    promtool: str, default_rules: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Raising one threshold makes its firing case fail: the tests are not vacuous."""
    broken = [
        {**r, "expr": r["expr"].replace("> 0.5", "> 0.99")}
        if r["alert"] == "GovernorFallbackActive"
        else r
        for r in default_rules
    ]
    _write_rules(broken, tmp_path / "rules.yaml", keep=("summary", "runbook_url"))
    shutil.copy(TESTS, tmp_path / TESTS.name)
    result = _promtool(promtool, "test", "rules", tmp_path / TESTS.name)
    assert result.returncode != 0
    assert "GovernorFallbackActive" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_not_firing(default_rules: list[dict[str, Any]]) -> None:
    cases = yaml.safe_load(TESTS.read_text())["tests"]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {r["alert"] for r in default_rules}
    assert names - fires == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested staying silent"
    assert (fires | silent) - names == set(), "tests of alerts that do not exist"


def test_every_alert_links_its_runbook(default_rules: list[dict[str, Any]]) -> None:
    assert len(default_rules) >= 12
    for rule in default_rules:
        assert rule["annotations"]["runbook_url"] == f"{DEFAULT_BASE}{rule['alert']}.md"
    production = alert_rules(rendered_scenario("production-values.yaml")[1])
    base = "https://runbooks.example.com/governor/runbooks/"
    assert {r["annotations"]["runbook_url"] for r in production} == {
        f"{base}{r['alert']}.md" for r in production
    }


def test_selectors_follow_the_job_and_namespace_settings(
    default_rules: list[dict[str, Any]],
) -> None:
    source = yaml.safe_load(SOURCE.read_text())
    for rule in (r for g in source["groups"] for r in g["rules"]):
        for selector in re.findall(r"governor_[a-z_]+\{[^}]*\}|\bup\{[^}]*\}", rule["expr"]):
            assert 'job="governor"' in selector, f"{rule['alert']}: {selector}"
    for rule in default_rules:
        for selector in re.findall(r"governor_[a-z_]+\{[^}]*\}", rule["expr"]):
            assert 'job="governor", namespace="governor"' in selector
    custom = _rules(
        {"prometheusRule": {"enabled": True, "job": "gov-ctl", "scopeToNamespace": False}}
    )
    exprs = " ".join(r["expr"] for r in custom)
    assert 'job="gov-ctl"' in exprs
    assert 'job="governor"' not in exprs
    assert "namespace=" not in exprs


def test_alerts_can_be_disabled_and_labelled() -> None:
    rules = _rules(
        {
            "prometheusRule": {
                "enabled": True,
                "disabled": {"GovernorDriftDetected": True},
                "additionalRuleLabels": {"team": "ml-platform", "severity": "ignored"},
            }
        }
    )
    names = {r["alert"] for r in rules}
    assert "GovernorDriftDetected" not in names
    assert "GovernorNoLeader" in names
    for rule in rules:
        assert rule["labels"]["team"] == "ml-platform"
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}


def test_alerts_read_only_exported_series(
    controller_metrics: set[str], gateway_metrics: set[str]
) -> None:
    used = set(METRIC.findall(SOURCE.read_text()))
    known = controller_metrics | gateway_metrics
    assert used - known - PENDING_METRICS.keys() == set()
    assert PENDING_METRICS.keys() & known == set(), "now exported: drop it from PENDING_METRICS"
