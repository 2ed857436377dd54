"""Tenant cost anomalies end to end: the policy recommended in docs/signals.md, read from a
real Prometheus on days of backfilled spend, evaluated by the real engine tick by tick."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from controller.model import SignalKey, VectorSample
from controller.policy.baselines import Baselines
from controller.policy.engine import EngineState, Evaluation, evaluate
from controller.policy.expressions import compile_expression
from controller.policy.inputs import label_universe, vector_input
from controller.policy.loader import load_directory
from controller.policy.policyset import PolicySet
from controller.signals import PrometheusSource
from tests.signals import history

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "signals.md"
POLICY = "ThrottlePolicy/tenant-cost-anomaly"
PLANS = """\
apiVersion: governor/v1
kind: Plan
metadata: {name: paid}
spec: {limits: {tokens_per_minute: 20000}}
---
apiVersion: governor/v1
kind: Limits
metadata: {name: global}
spec: {default_plan: paid}
"""


def recommended_policy() -> str:
    """The YAML block of docs/signals.md that defines the anomaly policy."""
    blocks: list[str] = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.DOTALL)
    return next(b for b in blocks if "name: tenant-cost-anomaly" in b)


def with_usual(policy: str, query: str) -> str:
    """The policy with another `usual` query (the block folds its query over lines)."""
    document = yaml.safe_load(policy)
    assert document["spec"]["signals"]["usual"]["query"] == history.USUAL
    document["spec"]["signals"]["usual"]["query"] = query
    return str(yaml.safe_dump(document))


def policies(tmp_path: Path, policy: str) -> PolicySet:
    (tmp_path / "plans.yaml").write_text(PLANS)
    (tmp_path / "anomaly.yaml").write_text(policy)
    return load_directory(tmp_path)


def run_ticks(source: PrometheusSource, policy_set: PolicySet, now: float) -> Evaluation:
    """Seven one-minute ticks ending at `now` (the policy asks for 5 minutes of evidence)."""
    baselines = Baselines(policy_set, {})
    state, result = EngineState(), None
    for at in np.arange(now - 420.0, now + 1.0, 60.0):
        snapshot = source.fetch(policy_set.signal_keys(), float(at))
        result = evaluate(policy_set, snapshot, state, float(at), baselines)
        state = result.state
    assert result is not None
    return result


def test_only_the_tenant_whose_spend_jumped_is_throttled(
    source: PrometheusSource, now: float, tmp_path: Path
) -> None:
    result = run_ticks(source, policies(tmp_path, recommended_policy()), now)
    assert result.active.get(POLICY) == ("jumper",)
    limits = {str(p.address): p.value for p in result.proposals if p.policy == POLICY}
    assert limits == {"tenant/jumper/tokens_per_minute": 5000.0}


def test_the_plain_offset_baseline_flags_a_morning_peak_that_came_early(
    source: PrometheusSource, now: float, tmp_path: Path
) -> None:
    naive = with_usual(recommended_policy(), history.USUAL_NAIVE)
    result = run_ticks(source, policies(tmp_path, naive), now)
    assert set(result.active.get(POLICY, ())) == {"jumper", "morning", "weekly"}


def test_a_baseline_of_yesterday_alone_flags_a_weekday_after_a_quiet_day(
    source: PrometheusSource, now: float, tmp_path: Path
) -> None:
    yesterday_only = with_usual(recommended_policy(), history.USUAL_YESTERDAY)
    result = run_ticks(source, policies(tmp_path, yesterday_only), now)
    assert set(result.active.get(POLICY, ())) == {"jumper", "weekly"}


def test_new_and_gappy_tenants_have_no_usual_so_the_condition_cannot_hold(
    source: PrometheusSource, now: float, tmp_path: Path
) -> None:
    keys = [SignalKey(history.SPEND, "tenant"), SignalKey(history.USUAL, "tenant")]
    snapshot = source.fetch(keys, now)
    spend, usual = (snapshot.samples[k] for k in keys)
    assert isinstance(spend, VectorSample)
    assert isinstance(usual, VectorSample)
    assert set(spend.keys) == {"jumper", "steady", "newbie", "gappy", "morning", "weekly"}
    assert set(usual.keys) == {"jumper", "steady", "morning", "weekly"}
    usual_of = dict(zip(usual.keys, usual.values.tolist(), strict=True))
    assert usual_of["weekly"] == pytest.approx(history.PEAK_RATE)  # last week's, not yesterday's
    spend_of = dict(zip(spend.keys, spend.values.tolist(), strict=True))
    assert spend_of["newbie"] == pytest.approx(history.PEAK_RATE)
    assert spend_of["gappy"] == pytest.approx(history.PEAK_RATE)

    universe = label_universe([spend, usual], [])
    (policy,) = policies(tmp_path, recommended_policy()).throttles
    signals = policy.spec.signals
    assert signals["usual"].query == history.USUAL
    inputs = {
        name: vector_input(name, signals[name], snapshot.samples[key], universe, now)
        for name, key in zip(("spend", "usual"), keys, strict=True)
    }
    condition = compile_expression(history.CONDITION, {"spend", "usual"})
    holds = condition.evaluate({n: i.values for n, i in inputs.items()}, len(universe))
    valid = inputs["spend"].valid & inputs["usual"].valid
    flagged = {key for key, hit, ok in zip(universe, holds, valid, strict=True) if hit and ok}
    assert flagged == {"jumper"}
    missing = {key for key, ok in zip(universe, inputs["usual"].valid, strict=True) if not ok}
    assert missing == {"newbie", "gappy"}
