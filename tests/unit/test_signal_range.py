"""A signal's declared `range`: a finite value outside it (a percent read as a ratio, an
exporter's negative gauge) is `out_of_range`, untrustworthy as a stale one, never a reading
that moves a limit; the declaration itself is checked where it is written."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.model import ScalarSample, Snapshot, Validity, VectorSample
from controller.policy.documents import SignalSpec
from controller.policy.inputs import scalar_input, vector_input
from controller.policy.loader import check_directory
from controller.policy.testing import CaseResult, PolicyTestCase, run_case
from tests.unit.policy_builders import GPU_QUERY, adaptive, policy_set
from tests.unit.test_loader_hostile import SHIPPED, refused

RATIO = {"query": "avg(gpu_util)", "range": {"min": 0, "max": 1}}
IMMEDIATE = {"tighten": {"stabilization": "0s"}, "loosen": {"stabilization": "0s"}}


def spec(**extra: Any) -> SignalSpec:
    return SignalSpec.model_validate({**RATIO, **extra})


def scalar(value: float, signal: SignalSpec) -> Validity:
    snapshot = Snapshot(100.0, {signal.key(): ScalarSample(value, 99.0, Validity.OK, "")})
    return scalar_input("util", signal, snapshot, None, 100.0).validity


@pytest.mark.parametrize(
    ("value", "validity"),
    [(0.0, Validity.OK), (1.0, Validity.OK), (0.5, Validity.OK), (-0.01, Validity.OUT_OF_RANGE),
     (95.0, Validity.OUT_OF_RANGE), (float("nan"), Validity.NOT_FINITE)],
)  # fmt: skip
def test_a_scalar_outside_its_range_is_no_reading(value: float, validity: Validity) -> None:
    assert scalar(value, spec()) is validity


def test_without_a_range_any_finite_value_is_read() -> None:
    assert scalar(-5.0, SignalSpec.model_validate({"query": "avg(gpu_util)"})) is Validity.OK


def test_a_vector_masks_only_the_values_outside() -> None:
    signal = spec()
    sample = VectorSample("tenant", ("a", "b", "c"), np.array([0.4, -1.0, 3.0]), np.full(3, 99.0),
                          Validity.OK, "")  # fmt: skip
    seen = vector_input("util", signal, sample, ("a", "b", "c"), 100.0)
    assert seen.valid.tolist() == [True, False, False]
    assert [seen.reading(i).validity for i in range(3)] == [
        Validity.OK, Validity.OUT_OF_RANGE, Validity.OUT_OF_RANGE
    ]  # fmt: skip


def test_an_aimd_limit_does_not_climb_on_a_negative_utilisation() -> None:
    """Below the setpoint by 1.8, a utilisation of -1 read as a reading loosened the limit by
    `increase` on every sample, up to its rail; declared 0–1, it holds (on_stale)."""
    expect = [{"at": "2m", "limits": {"global/requests_per_second": 2000}}]
    series = {"gpu_util": "-1x5"}
    signal = {"query": GPU_QUERY, "stale_after": "60s", "name": "gpu_util",
              "range": {"min": 0, "max": 1}}  # fmt: skip
    ranged = adaptive(behavior=IMMEDIATE, signal=signal)
    unranged = adaptive(behavior=IMMEDIATE)

    def run(policy: Any) -> CaseResult:
        result = run_case(policy_set(policy), PolicyTestCase.model_validate(
            {"name": "negative", "signals": series, "expect": expect}), 30.0)  # fmt: skip
        assert isinstance(result, CaseResult)
        return result

    assert run(ranged).failures == []
    assert run(unranged).failures != []  # it climbed: the fault this guards against


@pytest.mark.parametrize(
    ("declared", "said"),
    [("{min: 1, max: 0}", "range min (1.0) is above its max (0.0)"),
     ("{}", "a range needs `min`, `max` or both"),
     ("{min: .nan}", "finite"), ("{max: true}", "")],
)  # fmt: skip
def test_a_range_that_cannot_hold_is_a_located_error(
    tmp_path: Path, declared: str, said: str
) -> None:
    target = tmp_path / "policies"
    shutil.copytree(SHIPPED, target)
    hot = target / "gpu-saturation.yaml"
    text = hot.read_text()
    marker = "      range: {min: 0, max: 2}"
    assert marker in text
    hot.write_text(text.replace(marker, f"      range: {declared}", 1))

    [error] = [e for e in refused(target) if Path(e.file).name == "gpu-saturation.yaml"]
    assert "range" in error.path
    assert said in error.message


def test_the_shipped_signals_declare_their_ranges() -> None:
    policies, errors = check_directory(SHIPPED, complete=True)
    assert errors == []
    assert policies is not None
    ranged = [use for use in policies.signal_uses() if use.spec.valid_range is not None]
    assert len(ranged) == len(list(policies.signal_uses()))
    assert all(use.spec.valid_range.min == 0 for use in ranged)  # type: ignore[union-attr]
