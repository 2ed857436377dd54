"""Seeded fuzzing of the loader: 1,200 hostile mutations of the shipped policies each end as a
valid set or as located load errors, never as an exception or the loader's last-resort error."""

from __future__ import annotations

from collections import Counter

import pytest

from controller.policy.loader import check_sources
from tests.support.policy_mutations import cases

SEED = 14  # the issue: fixed, so a failure replays exactly
COUNT = 1200


@pytest.mark.parametrize("part", range(4))
def test_mutated_policy_sets_load_or_fail_with_located_errors(part: int) -> None:
    outcomes: Counter[str] = Counter()
    for case in cases(SEED + part, COUNT // 4):
        names = {str(path) for path, _ in case.sources.files} | {str(case.sources.root)}
        where = f"case {case.number} of seed {SEED + part}: {case.steps}"
        policies, errors = check_sources(case.sources, complete=True)  # raising fails the test
        if policies is not None:
            assert errors == [], where
            outcomes["valid"] += 1
            continue
        assert errors, where
        for error in errors:
            assert error.file in names, where
            assert min(error.line, error.column) >= 1, where
            assert error.message.strip(), where
            assert "the loader failed on this file" not in error.message, (where, str(error))
        outcomes["refused"] += 1
    # The mutations mostly break the set, and some leave it valid (a harmless value).
    assert outcomes["refused"] > COUNT // 8
    assert outcomes["valid"] + outcomes["refused"] == COUNT // 4
