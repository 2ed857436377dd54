"""The Grafana dashboard: valid JSON whose every query is valid PromQL (checked by promtool)
reading series that Governor and its gateway export, laid out without overlapping panels."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.series import METRIC, PENDING_METRICS

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "governor.json"
# Grafana's variables, replaced by what they stand for so promtool can parse the queries.
VARIABLES = {"$__rate_interval": "1m", "$__range": "6h", "$namespace": "governor"}
# Series of other exporters that the shipped policies read as signals.
SIGNAL_SERIES = {
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "up",
}


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target and annotation."""
    board = _dashboard()
    queries = [
        (panel["title"], target["expr"])
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]
    queries += [(a["name"], a["expr"]) for a in board["annotations"]["list"] if "expr" in a]
    return queries


def _concrete(expr: str) -> str:
    for variable, value in VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def test_every_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    queries = _queries()
    rules = [
        {"record": f"dashboard:query_{i}", "expr": _concrete(expr)}
        for i, (_, expr) in enumerate(queries)
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout


def test_queries_read_exported_series(
    controller_metrics: set[str], gateway_metrics: set[str]
) -> None:
    known = controller_metrics | gateway_metrics | PENDING_METRICS.keys()
    used: set[str] = set()
    for title, expr in _queries():
        names = set(METRIC.findall(expr))
        assert names <= known, f"{title}: {names - known}"
        bare = set(re.findall(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\s*[{\[]", expr)) - {"by", "without"}
        assert bare - known - SIGNAL_SERIES == set(), f"{title}: unknown series {bare}"
        used |= names
    # What the dashboard is for: signals vs limits, policies, fallback, flaps, budgets.
    for needed in (
        "governor_limit_changes_total",
        "governor_adaptive_overshoot_ratio",
        "governor_policy_active",
        "governor_fallback_seconds_total",
        "governor_limits_flapping",
        "gateway_cost_usd_total",
        "gateway_budget_remaining_ratio",
    ):
        assert needed in used, f"no panel shows {needed}"


def test_panels_have_sources_unique_ids_and_do_not_overlap() -> None:
    board = _dashboard()
    assert board["uid"] == "governor"
    names = {v["name"] for v in board["templating"]["list"]}
    assert names == {"datasource", "namespace"}
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            refs = [t["refId"] for t in panel["targets"]]
            assert refs, panel["title"]
            assert len(refs) == len(set(refs)), panel["title"]
            assert panel.get("description"), f"{panel['title']}: say what it shows"


def test_the_panels_runbooks_point_to_exist() -> None:
    titles = [p["title"] for p in _dashboard()["panels"]]
    runbooks = DASHBOARD.parents[2] / "runbooks"
    quoted = 0
    for path in runbooks.rglob("*.md"):
        # A paragraph naming panels: "the dashboard's "X" and "Y" panels", "panel "X"".
        for paragraph in path.read_text().split("\n\n"):
            if "panel" not in paragraph:
                continue
            for name in re.findall(r'"([^"]+)"', paragraph.replace("\n", " ")):
                if name != "Governor":
                    assert any(t.startswith(name) for t in titles), f"{path.name}: {name}"
                    quoted += 1
    assert quoted >= 4
