"""`governor policy lint` and `governor policy schema` through the real Typer app."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from controller.cli import app
from controller.policy.loader import load_directory

EXAMPLES = Path(__file__).parents[1] / "data" / "policy_format"
SHIPPED = Path(__file__).parents[2] / "policies"

PLAN = """\
apiVersion: governor/v1
kind: Plan
metadata: {name: free}
spec:
  limits: {requests_per_minute: 10}
"""

THROTTLE = """\
apiVersion: governor/v1
kind: ThrottlePolicy
metadata: {name: hot}
spec:
  signals:
    gpu: {query: avg(gpu_util)}
  when: gpu > 0.9
  for: 2m
  actions:
    - {target: plan/free/requests_per_minute, scale: 0.5}
"""

LIMITS = """\
apiVersion: governor/v1
kind: Limits
metadata: {name: global}
spec:
  default_plan: gold
"""

FREE_LIMITS = LIMITS.replace("gold", "free")

ADAPTIVE = """\
apiVersion: governor/v1
kind: AdaptiveLimit
metadata: {name: steer}
spec:
  target: plan/gold/requests_per_minute
  signal: {name: gpu, query: avg(gpu_util)}
  setpoint: 0.8
  algorithm: aimd
  aimd: {increase: 1, decrease_factor: 0.8}
  bounds: {min: 1, max: 10}
"""


def where(text: str, needle: str, occurrence: int = 0) -> tuple[int, int]:
    """1-based line and column of the `occurrence`-th `needle` in `text`."""
    offset = -1
    for _ in range(occurrence + 1):
        offset = text.index(needle, offset + 1)
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def lint(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["policy", "lint", *args])
    return result.exit_code, result.stdout, result.stderr


# name: (files of the directory, the broken file, the text the error points at, which
# occurrence of it, what the message must say)
BROKEN: dict[str, tuple[dict[str, str], str, str, int, str]] = {
    "bad YAML (a tab indents)": (
        {"p.yaml": PLAN.replace("  limits:", "\tlimits:")},
        "p.yaml",
        "\t",
        0,
        "YAML syntax: found character '\\t' that cannot start any token",
    ),
    "unknown field": (
        {"p.yaml": PLAN, "t.yaml": THROTTLE.replace("  when:", "  whne:")},
        "t.yaml",
        "whne",
        0,
        "spec: unknown field 'whne' (did you mean 'when'?)",
    ),
    "unknown signal in when": (
        {"p.yaml": PLAN, "t.yaml": THROTTLE.replace("when: gpu", "when: gpu_util")},
        "t.yaml",
        "gpu_util > 0.9",
        0,
        "spec.when: unknown signal 'gpu_util'",
    ),
    "bad duration": (
        {"p.yaml": PLAN, "t.yaml": THROTTLE.replace("for: 2m", "for: two minutes")},
        "t.yaml",
        "two minutes",
        0,
        "spec.for: 'two minutes' is not a duration",
    ),
    "bad address": (
        {"p.yaml": PLAN, "t.yaml": THROTTLE.replace("per_minute, scale", "per_hour, scale")},
        "t.yaml",
        "plan/free/requests_per_hour",
        0,
        "spec.actions[0].target: invalid limit address 'plan/free/requests_per_hour'",
    ),
    "duplicate key": (
        {"p.yaml": PLAN, "t.yaml": THROTTLE.replace("  for: 2m\n", "  for: 2m\n  for: 5m\n")},
        "t.yaml",
        "for: 5m",
        0,
        "duplicate key 'for' (first at line 8, column 3)",
    ),
    "duplicate name": (
        {"a.yaml": PLAN, "b.yaml": PLAN},
        "b.yaml",
        "free",
        0,
        "metadata.name: Plan 'free' is defined twice",
    ),
    "wrong apiVersion": (
        {"p.yaml": PLAN.replace("governor/v1", "governor/v2")},
        "p.yaml",
        "governor/v2",
        0,
        "apiVersion: 'governor/v2' is not supported: write `apiVersion: governor/v1`",
    ),
    "missing kind (second document)": (
        {"p.yaml": PLAN + "---\n" + PLAN.replace("kind: Plan\n", "")},
        "p.yaml",
        "apiVersion",
        1,
        "missing `kind`: write one of Plan, Limits, ThrottlePolicy, AdaptiveLimit or FairShare",
    ),
    "unknown kind": (
        {"p.yaml": PLAN.replace("kind: Plan", "kind: Plna")},
        "p.yaml",
        "Plna",
        0,
        "kind: 'Plna' is not a kind of policy document (did you mean 'Plan'?)",
    ),
    "unknown limit": (
        {"p.yaml": PLAN.replace("requests_per_minute", "requests_per_min")},
        "p.yaml",
        "requests_per_min",
        0,
        "key 'requests_per_min' is not one of requests_per_second, requests_per_minute",
    ),
    "missing required field": (
        {"p.yaml": PLAN, "t.yaml": THROTTLE[: THROTTLE.index("  actions:")]},
        "t.yaml",
        "signals",
        0,
        "spec: missing required field 'actions'",
    ),
    "default plan that no Plan defines": (
        {"p.yaml": PLAN, "l.yaml": LIMITS},
        "l.yaml",
        "gold",
        0,
        "spec.default_plan: default_plan 'gold' is not a Plan (plans: free)",
    ),
    "a limit written as a word YAML reads as false": (
        {"p.yaml": PLAN.replace("requests_per_minute: 10", "requests_per_minute: off")},
        "p.yaml",
        "off",
        0,
        "spec.limits.requests_per_minute: write a number, not False",
    ),
    "a floor on a plan no Plan defines": (
        {"p.yaml": PLAN, "l.yaml": FREE_LIMITS + "  floors: {plan/gold/requests_per_minute: 5}\n"},
        "l.yaml",
        "5}",
        0,
        "address 'plan/gold/requests_per_minute' names plan 'gold', which no Plan defines",
    ),
    "a ceiling on a plan no Plan defines": (
        {"p.yaml": PLAN,
         "l.yaml": FREE_LIMITS + "  ceilings: {plan/gold/requests_per_minute: 5}\n"},
        "l.yaml",
        "5}",
        0,
        "address 'plan/gold/requests_per_minute' names plan 'gold', which no Plan defines",
    ),
    "an AdaptiveLimit on a plan no Plan defines": (
        {"p.yaml": PLAN, "a.yaml": ADAPTIVE},
        "a.yaml",
        "plan/gold/requests_per_minute",
        0,
        "spec.target: target 'plan/gold/requests_per_minute' names plan 'gold', which no Plan",
    ),
    "a floor on a misspelt plan": (
        {"p.yaml": PLAN, "l.yaml": FREE_LIMITS + "  floors: {plan/fre/requests_per_minute: 5}\n"},
        "l.yaml",
        "5}",
        0,
        "names plan 'fre', which no Plan defines (plans: free) (did you mean 'free'?)",
    ),
    "an action on a misspelt plan": (
        {"p.yaml": PLAN, "t.yaml": THROTTLE.replace("plan/free/", "plan/freee/")},
        "t.yaml",
        "plan/freee/",
        0,
        "target 'plan/freee/requests_per_minute' names plan 'freee', which no Plan defines "
        "(plans: free) (did you mean 'free'?)",
    ),
    "a default plan misspelt": (
        {"p.yaml": PLAN, "l.yaml": LIMITS.replace("gold", "fre")},
        "l.yaml",
        "fre",
        0,
        "default_plan 'fre' is not a Plan (plans: free) (did you mean 'free'?)",
    ),
    "a floor narrowed to a model its plan may not call": (
        {"p.yaml": PLAN.replace("spec:\n", "spec:\n  models: [small]\n"),
         "l.yaml": FREE_LIMITS + "  floors: {plan/free/requests_per_minute@big: 5}\n"},
        "l.yaml",
        "5}",
        0,
        "address 'plan/free/requests_per_minute@big': plan 'free' may not call model 'big', so "
        "no request meets this limit; name one of small, or add the model to the plan's `models`",
    ),
    "an action narrowed to a model no plan may call": (
        {"p.yaml": PLAN.replace("spec:\n", "spec:\n  models: [small]\n"),
         "t.yaml": THROTTLE.replace("plan/free/requests_per_minute,",
                                    "tenant/acme/requests_per_minute@smal,")},
        "t.yaml",
        "tenant/acme",
        0,
        "target 'tenant/acme/requests_per_minute@smal': no plan may call model 'smal', so no "
        "request meets this limit (did you mean 'small'?)",
    ),
    "a credits floor no top-up could reach": (
        {"p.yaml": PLAN + "  credits: {min_balance_usd: 1e308}\n"},
        "p.yaml",
        "1e308",
        0,
        "spec.credits.min_balance_usd: input should be less than or equal to 1000000000",
    ),
    "a floor above its ceiling": (
        {"p.yaml": PLAN, "l.yaml": FREE_LIMITS + "  floors: {global/requests_per_second: 10}\n"
         "  ceilings: {global/requests_per_second: 5}\n"},
        "l.yaml",
        "default_plan",
        0,
        "spec: the floor of global/requests_per_second (10) is above its ceiling (5)",
    ),
    "a query Prometheus' grammar does not take": (
        {"p.yaml": PLAN, "t.yaml": THROTTLE.replace("avg(gpu_util)", "'avg(rate(gpu_util[5m])'"),
         "l.yaml": FREE_LIMITS},
        "t.yaml",
        "'avg(rate",
        0,
        "spec.signals.gpu.query: the query does not parse with Prometheus' grammar (unclosed "
        "left parenthesis): fix it",
    ),
    "a query of blanks": (
        {"p.yaml": PLAN, "t.yaml": THROTTLE.replace("avg(gpu_util)", "'   '"),
         "l.yaml": FREE_LIMITS},
        "t.yaml",
        "'   '",
        0,
        "spec.signals.gpu.query: the query does not parse with Prometheus' grammar (no "
        "expression found in input)",
    ),
    "one address twice, its model in two cases": (
        {"p.yaml": PLAN, "l.yaml": FREE_LIMITS + "  floors: {plan/free/requests_per_minute@GPT-4:"
         " 1, plan/free/requests_per_minute@gpt-4: 2}\n"},
        "l.yaml",
        "{plan/free/requests_per_minute@GPT-4",
        0,
        "spec.floors: 'plan/free/requests_per_minute@GPT-4' and "
        "'plan/free/requests_per_minute@gpt-4' are one address",
    ),
    "a plan's weight written as a global one": (
        {"p.yaml": PLAN, "l.yaml": FREE_LIMITS + "  global: {concurrent_weight: 2}\n"},
        "l.yaml",
        "default_plan",
        0,
        "spec: concurrent_weight is written only as plan/<plan>/concurrent_weight or "
        "tenant/<tenant>/concurrent_weight",
    ),
    "a headroom in a plan": (
        {"p.yaml": PLAN.replace("{requests", "{concurrent_headroom: 0.1, requests")},
        "p.yaml",
        "limits",
        0,
        "spec: concurrent_headroom is written only as global/concurrent_headroom",
    ),
    "a headroom above the limit itself": (
        {"p.yaml": PLAN, "l.yaml": FREE_LIMITS + "  global: {concurrent_headroom: 2}\n"},
        "l.yaml",
        "default_plan",
        0,
        "spec: concurrent_headroom must be between 0.001 and 1",
    ),
    "a policy setting a weight of 0": (
        {"p.yaml": PLAN, "t.yaml": THROTTLE.replace(
            "{target: plan/free/requests_per_minute, scale: 0.5}",
            "{target: plan/free/concurrent_weight, set: 0}")},
        "t.yaml",
        "{target",
        0,
        "spec.actions[0]: plan/free/concurrent_weight: concurrent_weight must be between 0.001",
    ),
    "a ceiling above a headroom's range": (
        {"p.yaml": PLAN, "l.yaml": FREE_LIMITS + "  ceilings: {global/concurrent_headroom: 3}\n"},
        "l.yaml",
        "default_plan",
        0,
        "spec: global/concurrent_headroom: concurrent_headroom must be between 0.001 and 1",
    ),
    "a weight of 0": (
        {"p.yaml": PLAN.replace("{requests", "{concurrent_weight: 0, requests")},
        "p.yaml",
        "limits",
        0,
        "spec: concurrent_weight must be between 0.001 and 1000000",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN))
def test_lint_reports_each_error_at_its_file_line_and_column(tmp_path: Path, case: str) -> None:
    files, broken, needle, occurrence, message = BROKEN[case]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    line, column = where(files[broken], needle, occurrence)

    code, stdout, stderr = lint(str(tmp_path))

    assert code == 1, stderr
    assert stdout == ""
    prefix = f"{tmp_path / broken}:{line}:{column}: "
    found = [row for row in stderr.splitlines() if row.startswith(prefix)]
    assert found, f"no error at {prefix!r} in:\n{stderr}"
    assert message in found[0]
    assert stderr.splitlines()[-1] == "1 error in 1 file"


def test_lint_names_where_a_duplicate_name_was_first_defined(tmp_path: Path) -> None:
    """A name defined twice was reported at its second definition only."""
    first = THROTTLE + "---\n" + PLAN
    (tmp_path / "a.yaml").write_text(first)
    (tmp_path / "b.yaml").write_text(PLAN.replace("{name: free}", "\n  name: free"))

    code, _, stderr = lint(str(tmp_path))

    assert code == 1
    line, column = where(first, "free}")
    first_at = f"first defined at {tmp_path / 'a.yaml'}:{line}:{column}"
    assert f"Plan 'free' is defined twice (names are unique per kind); {first_at}" in stderr
    assert stderr.startswith(f"{tmp_path / 'b.yaml'}:4:9: metadata.name: ")


def test_lint_json_lists_every_error_as_an_object(tmp_path: Path) -> None:
    throttle = THROTTLE.replace("  when:", "  whne:").replace("for: 2m", "for: soon")
    (tmp_path / "p.yaml").write_text(PLAN)
    (tmp_path / "t.yaml").write_text(throttle)

    code, stdout, _ = lint(str(tmp_path), "--json")

    assert code == 1
    errors = json.loads(stdout)
    assert [(e["line"], e["column"], e["path"]) for e in errors] == [
        (*where(throttle, "whne"), "spec.whne"),
        (*where(throttle, "soon"), "spec.for"),
    ]
    assert {e["file"] for e in errors} == {str(tmp_path / "t.yaml")}
    assert "did you mean 'when'?" in errors[0]["message"]


def test_lint_of_the_examples_prints_a_one_line_summary() -> None:
    code, stdout, stderr = lint(str(EXAMPLES))

    assert (code, stderr) == (0, "")
    version = load_directory(EXAMPLES).version
    assert stdout == (
        "ok: 6 documents in 5 files (Plan 2, Limits 1, ThrottlePolicy 2, AdaptiveLimit 1), "
        f"version {version}\n"
    )
    assert re.fullmatch(r"[0-9a-f]{12}", version)


def test_lint_json_of_a_valid_directory_is_an_empty_list() -> None:
    code, stdout, _ = lint(str(EXAMPLES), "--json")

    assert (code, json.loads(stdout)) == (0, [])


def test_lint_of_a_missing_directory_exits_2_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"

    code, stdout, stderr = lint(str(missing))

    assert (code, stdout) == (2, "")
    assert f"policy directory {str(missing)!r} does not exist" in stderr


def test_lint_of_a_directory_with_only_tests_exits_2(tmp_path: Path) -> None:
    (tmp_path / "plans_test.yaml").write_text("tests: []\n")

    code, _, stderr = lint(str(tmp_path))

    assert code == 2
    assert "holds no policy files" in stderr


def schema_of(*args: str) -> dict[str, object]:
    result = CliRunner().invoke(app, ["policy", "schema", *args])
    assert result.exit_code == 0, result.output
    loaded: dict[str, object] = json.loads(result.stdout)
    return loaded


def documents_in(directory: Path) -> list[object]:
    documents: list[object] = []
    for path in sorted(directory.glob("*.yaml")):
        if not path.name.endswith("_test.yaml"):
            documents += yaml.safe_load_all(path.read_text())
    return documents


def test_the_shipped_policies_lint_clean() -> None:
    code, stdout, stderr = lint(str(SHIPPED))

    assert (code, stderr) == (0, "")
    assert stdout.startswith("ok: ")


@pytest.mark.parametrize("directory", [EXAMPLES, SHIPPED], ids=["format-examples", "shipped"])
def test_schema_is_a_json_schema_that_accepts_every_example(directory: Path) -> None:
    schema = schema_of()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    documents = documents_in(directory)

    invalid = [doc for doc in documents if not validator.is_valid(doc)]
    # The top-level oneOf hides why; the kind's own definition tells.
    reasons = [
        f"{doc['kind']}: {error.json_path}: {error.message}"  # type: ignore[index]
        for doc in invalid
        for error in jsonschema.Draft202012Validator(
            {"$ref": f"#/$defs/{doc['kind']}", "$defs": schema["$defs"]}  # type: ignore[index]
        ).iter_errors(doc)
    ]

    assert len(documents) >= 6
    assert reasons == []
    assert invalid == []


def test_schema_rejects_an_unknown_field_and_an_unknown_kind() -> None:
    validator = jsonschema.Draft202012Validator(schema_of())
    plan = {"apiVersion": "governor/v1", "kind": "Plan", "metadata": {"name": "free"}}

    assert validator.is_valid(plan)
    assert not validator.is_valid({**plan, "spec": {"modles": []}})
    assert not validator.is_valid({**plan, "kind": "Plna"})


def test_schema_output_writes_the_same_schema_to_a_file(tmp_path: Path) -> None:
    target = tmp_path / "governor.schema.json"

    result = CliRunner().invoke(app, ["policy", "schema", "--output", str(target)])

    assert result.exit_code == 0
    assert json.loads(target.read_text()) == schema_of()


@pytest.mark.parametrize("directory", [SHIPPED, SHIPPED / "examples" / "fair-share"])
def test_policy_test_passes_on_the_shipped_policies_and_examples(directory: Path) -> None:
    result = CliRunner().invoke(app, ["policy", "test", str(directory)])
    assert result.exit_code == 0, result.output
    assert "0 failing" in result.output
    assert "FAIL" not in result.output


def test_policy_test_counts_one_test_in_one_file_in_the_singular(tmp_path: Path) -> None:
    for name in ("plans.yaml", "limits.yaml", "gpu-saturation.yaml"):
        (tmp_path / name).write_text((SHIPPED / name).read_text())
    shipped = yaml.safe_load((SHIPPED / "gpu-saturation_test.yaml").read_text())
    (tmp_path / "one_test.yaml").write_text(
        yaml.safe_dump({**shipped, "tests": shipped["tests"][:1]})
    )

    result = CliRunner().invoke(app, ["policy", "test", str(tmp_path)])

    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "ok: 1 test in 1 file, 0 failing"  # was "1 tests"


def test_policy_test_reports_a_wrong_expectation_with_expected_and_actual(tmp_path: Path) -> None:
    for name in ("plans.yaml", "limits.yaml", "gpu-saturation.yaml"):
        (tmp_path / name).write_text((SHIPPED / name).read_text())
    (tmp_path / "gpu_test.yaml").write_text(
        "policy_files: [plans.yaml, limits.yaml, gpu-saturation.yaml]\n"
        "interval: 30s\n"
        "tests:\n"
        "  - name: wrong on purpose\n"
        "    signals: {saturation: '0.95x20'}\n"
        "    expect:\n"
        "      - at: 5m\n"
        "        limits: {plan/free/requests_per_minute: 10}\n"
    )
    result = CliRunner().invoke(app, ["policy", "test", str(tmp_path), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    (failure,) = report["files"][0]["tests"][0]["failures"]
    assert "plan/free/requests_per_minute: expected 10, got 5" in failure
    assert "saturation=0.95" in failure


def test_policy_test_locates_a_broken_test_file(tmp_path: Path) -> None:
    (tmp_path / "plans.yaml").write_text((SHIPPED / "plans.yaml").read_text())
    (tmp_path / "x_test.yaml").write_text(
        "policy_files: [plans.yaml, nowhere.yaml]\ninterval: 30s\ntests:\n"
        "  - name: t\n    expect: [{at: 1m}]\n"
    )
    result = CliRunner().invoke(app, ["policy", "test", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{tmp_path / 'x_test.yaml'}:1:28: policy_files[1]: 'nowhere.yaml'" in result.output


def test_policy_test_refuses_a_test_file_it_would_have_skipped_or_misread(tmp_path: Path) -> None:
    # `x_TEST.YAML` was skipped by the loader (a test) and by `policy test` (case-sensitive
    # patterns): its tests never ran and the run said "0 failing". A Latin-1 test file got
    # Python's codec message, not the place and the fix a policy file gets.
    (tmp_path / "plans.yaml").write_text((SHIPPED / "plans.yaml").read_text())
    (tmp_path / "gpu_TEST.YAML").write_text("policy_files: [plans.yaml]\ntests: []\n")
    (tmp_path / "cost_test.yaml").write_bytes(b"policy_files: [plans.yaml]\n# caf\xe9\n")
    result = CliRunner().invoke(app, ["policy", "test", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{tmp_path / 'gpu_TEST.YAML'}:1:1: " in result.output
    assert "rename it to gpu_TEST.yaml" in result.output
    assert f"{tmp_path / 'cost_test.yaml'}:2:6: " in result.output
    assert "not UTF-8 text (byte 0xe9)" in result.output


@pytest.mark.parametrize(
    "name",
    [
        "../plans.yaml",  # the directory above: a plan the controller never reads
        "{outside}/plans.yaml",  # an absolute path anywhere
        "sub/plans.yaml",  # a subdirectory: the controller reads none
        "plans.yaml.bak",  # not a policy file name
        "gpu_test.yaml",  # a policy test, not a policy
    ],
)
def test_policy_test_runs_only_policies_the_controller_reads_from_its_directory(
    tmp_path: Path, name: str
) -> None:
    # Before, a test named any readable file and passed on a set the controller never runs.
    policies, outside = tmp_path / "policies", tmp_path / "elsewhere"
    for directory in (policies, policies / "sub", outside):
        directory.mkdir()
    for directory in (tmp_path, policies, policies / "sub", outside):
        (directory / "plans.yaml").write_text((SHIPPED / "plans.yaml").read_text())
    (policies / "plans.yaml.bak").write_text((SHIPPED / "plans.yaml").read_text())
    (policies / "plans.yaml").unlink()
    for file in ("limits.yaml", "gpu-saturation.yaml"):
        (policies / file).write_text((SHIPPED / file).read_text())
    listed = name.format(outside=outside)
    (policies / "gpu_test.yaml").write_text(
        f"policy_files: ['{listed}', limits.yaml, gpu-saturation.yaml]\n"
        "interval: 30s\ntests:\n  - name: t\n    signals: {saturation: '0.5x4'}\n"
        "    expect: [{at: 1m, limits: {plan/free/requests_per_minute: 10}}]\n"
    )

    result = CliRunner().invoke(app, ["policy", "test", str(policies)])

    assert result.exit_code == 1, result.output
    assert "PASS" not in result.output
    assert f"{policies / 'gpu_test.yaml'}:1:16: policy_files[0]: {listed!r}" in result.output
    assert "limits.yaml" in result.output  # the files it may name


@pytest.mark.parametrize(
    ("interval", "series", "at", "said"),
    [
        # ~10^12 samples: the expansion alone held the run for hours and its memory grew
        # without bound (the CI job's runner ends it or the kernel kills it)
        (
            "30s",
            "0.5x999999999999",
            "1m",
            "6:19: tests[0].signals.saturation: Value error, "
            "'0.5x999999999999' makes the series longer than 100,000 samples",
        ),
        # 3.2 × 10^10 evaluations (~0.3 ms each): a run of months
        (
            "1ms",
            "0.5x4",
            "366d",
            "expect at 366d: 31,622,400,000 evaluations at the interval "
            "1ms, over the 100,000 a test may run: lengthen the interval or expect sooner",
        ),
    ],
    ids=["series", "evaluations"],
)
def test_policy_test_refuses_a_test_too_long_to_run_in_good_time(
    tmp_path: Path, interval: str, series: str, at: str, said: str
) -> None:
    for name in ("plans.yaml", "limits.yaml", "gpu-saturation.yaml"):
        (tmp_path / name).write_text((SHIPPED / name).read_text())
    (tmp_path / "gpu_test.yaml").write_text(
        "policy_files: [plans.yaml, limits.yaml, gpu-saturation.yaml]\n"
        f"interval: {interval}\n"
        "tests:\n"
        "  - name: a typo\n"
        "    signals:\n"
        f"      saturation: '{series}'\n"
        f"    expect: [{{at: {at}, limits: {{plan/free/requests_per_minute: 10}}}}]\n"
    )
    started = time.monotonic()
    result = CliRunner().invoke(app, ["policy", "test", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert said in result.output
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("signal", "said"),
    [
        ("saturation: '0.5 NaN'", "5:27: tests[0].signals.saturation: Value error, 'NaN' is not"),
        ("saturation: {acme: '1 abc'}", "5:34: tests[0].signals.saturation.acme: Value error, "),
        (
            "saturation: [0.5, 1]",
            "5:27: tests[0].signals.saturation: Value error, [0.5, 1] is "
            "not expanding notation: write a series as one string",
        ),
    ],
    ids=["scalar", "per label value", "a list"],
)
def test_a_bad_series_is_one_error_at_its_value(tmp_path: Path, signal: str, said: str) -> None:
    # Each bad series also drew an error for the shape it was not written in: "…signals.
    # saturation['dict[str,function-before[expand_series(), …]]']: Input should be a valid
    # dictionary", or a located "Value error" on a mapping of series.
    for name in ("plans.yaml", "limits.yaml", "gpu-saturation.yaml"):
        (tmp_path / name).write_text((SHIPPED / name).read_text())
    (tmp_path / "gpu_test.yaml").write_text(
        "policy_files: [plans.yaml, limits.yaml, gpu-saturation.yaml]\n"
        "tests:\n"
        "  - name: t\n"
        "    expect: [{at: 1m}]\n"
        f"    signals: {{{signal}}}\n"
    )
    result = CliRunner().invoke(app, ["policy", "test", str(tmp_path)])
    assert result.exit_code == 1, result.output
    [error] = [line for line in result.output.splitlines() if "gpu_test.yaml:" in line]
    assert said in error


def test_policy_test_without_tests_exits_2(tmp_path: Path) -> None:
    (tmp_path / "plans.yaml").write_text((SHIPPED / "plans.yaml").read_text())
    result = CliRunner().invoke(app, ["policy", "test", str(tmp_path)])
    assert result.exit_code == 2


def test_the_committed_editor_schema_is_current() -> None:
    # The shipped policy files point editors at docs/policy.schema.json: keep it in step.
    from controller.policy.documents import json_schema

    committed = json.loads((SHIPPED.parent / "docs" / "policy.schema.json").read_text())
    assert committed == json_schema(), "run: governor policy schema -o docs/policy.schema.json"


def test_schema_to_an_unwritable_path_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    """`policy schema -o /nonexistent/dir/x.json` ended in a FileNotFoundError traceback."""
    target = tmp_path / "missing" / "policy.schema.json"
    result = CliRunner().invoke(app, ["policy", "schema", "-o", str(target)])

    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: cannot write the schema to {target}: No such file or directory; pass a "
        "writable file path, or no -o to print it\n"
    )
