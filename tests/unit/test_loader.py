"""The policy directory loader: every example loads, every error is located, nothing crashes."""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Hashable
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from controller.errors import PolicyError
from controller.model import Address, LimitKind, Scope
from controller.policy.documents import AdaptiveLimit, Limits, Plan, ThrottlePolicy
from controller.policy.loader import (
    LocatedError,
    PolicyLoadError,
    check_directory,
    load_directory,
    policy_files,
)
from controller.policy.sourcemap import LINE_BREAK, MAX_DEPTH, MAX_VALUES

EXAMPLES = Path(__file__).parents[1] / "data" / "policy_format"
EXAMPLE_FILES = sorted(p for p in EXAMPLES.glob("*.yaml") if not p.name.endswith("_test.yaml"))


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """A writable copy of the examples of POLICY_FORMAT.md."""
    target = tmp_path / "policies"
    shutil.copytree(EXAMPLES, target)
    return target


def where(text: str, needle: str, occurrence: int = 0) -> tuple[int, int]:
    """1-based line and column of the `occurrence`-th `needle` in `text`."""
    offset = -1
    for _ in range(occurrence + 1):
        offset = text.index(needle, offset + 1)
    return text.count("\n", 0, offset) + 1, offset - (text.rfind("\n", 0, offset) + 1) + 1


def errors_of(directory: Path) -> list[LocatedError]:
    policies, errors = check_directory(directory)
    assert policies is None
    assert errors
    return errors


def test_every_example_of_the_format_document_loads() -> None:
    policies = load_directory(EXAMPLES)

    assert sorted(policies.plans) == ["free", "paid"]
    assert policies.plans["paid"].spec.limits[LimitKind.TOKENS_PER_DAY] == 100000
    assert isinstance(policies.limits, Limits)
    assert policies.limits.spec.floors == {
        Address(Scope.GLOBAL, LimitKind.REQUESTS_PER_SECOND): 200
    }
    assert [t.metadata.name for t in policies.throttles] == [
        "gpu-saturation",
        "tenant-cost-anomaly",
    ]
    assert policies.throttles[0].spec.for_ == 120.0
    assert policies.throttles[0].spec.schedule is not None
    assert [a.metadata.name for a in policies.adaptives] == ["global-rps-by-gpu"]
    assert {type(d) for d in policies.documents} == {Plan, Limits, ThrottlePolicy, AdaptiveLimit}


def test_policy_files_are_sorted_and_leave_out_tests_and_other_files(examples: Path) -> None:
    (examples / "notes.txt").write_text("not yaml")
    (examples / ".hidden.yaml").write_text("broken: [")
    (examples / "sub").mkdir()  # not read: the directory is not searched recursively
    (examples / "sub" / "inner.yaml").write_text("broken: [")
    (examples / "broken_test.yml").write_text("broken: [")

    assert [p.name for p in policy_files(examples)] == [p.name for p in EXAMPLE_FILES]
    assert load_directory(examples).version == load_directory(EXAMPLES).version

    (examples / "a.yml").write_text("")
    assert [p.name for p in policy_files(examples)][:2] == ["a.yml", "global-rps-by-gpu.yaml"]


def test_version_follows_the_bytes_and_names_of_the_loaded_files(examples: Path) -> None:
    before = load_directory(examples).version
    (examples / "gpu-saturation_test.yaml").write_text("tests: changed\n")
    assert load_directory(examples).version == before  # tests are not policies

    limits = examples / "limits.yaml"
    limits.write_text(limits.read_text() + "# a comment changes the version\n")
    changed = load_directory(examples).version
    assert changed != before

    limits.rename(examples / "limits-renamed.yaml")
    assert load_directory(examples).version not in {before, changed}


def test_empty_documents_are_skipped_and_a_file_holds_several(tmp_path: Path) -> None:
    plans = (EXAMPLES / "plans.yaml").read_text()
    (tmp_path / "all.yaml").write_text("---\n# nothing\n---\n" + plans + "---\n---\n")

    policies = load_directory(tmp_path)

    assert sorted(policies.plans) == ["free", "paid"]
    assert len(policies.documents) == 2


def test_anchors_and_merge_keys_work_and_locate_errors_where_written(tmp_path: Path) -> None:
    text = """\
apiVersion: governor/v1
kind: Limits
metadata: {name: global}
spec:
  default_plan: free
  global: &base {requests_per_second: 10, tokens_per_minute: 1000}
  ip:
    <<: *base
    tokens_per_minute: lots
"""
    (tmp_path / "limits.yaml").write_text(text)

    [error] = errors_of(tmp_path)

    assert (error.line, error.column) == where(text, "lots")
    assert error.path == "spec.ip.tokens_per_minute"
    (tmp_path / "limits.yaml").write_text(text.replace("lots", "500"))
    ip = load_directory(tmp_path).limits.spec.ip
    assert ip == {LimitKind.REQUESTS_PER_SECOND: 10, LimitKind.TOKENS_PER_MINUTE: 500}


def test_errors_of_every_document_of_every_file_are_collected(tmp_path: Path) -> None:
    first = "apiVersion: governor/v1\nkind: Plan\nmetadata: {name: a, colour: red}\n"
    second = "kind: Limits\nmetadata: {name: x}\nspec: {default_plan: a}\n"
    (tmp_path / "a.yaml").write_text(first + "---\n" + first.replace("kind: Plan", "kind: 7"))
    (tmp_path / "b.yaml").write_text(second + "---\n- a list\n")
    (tmp_path / "c.yaml").write_text("key: [unclosed\n")

    errors = errors_of(tmp_path)

    assert [(Path(e.file).name, e.line, e.column, e.path) for e in errors] == [
        ("a.yaml", *where(first, "colour"), "metadata.colour"),
        ("a.yaml", 4 + 2, len("kind: ") + 1, "kind"),
        ("b.yaml", 1, 1, ""),  # apiVersion is missing: reported at the document
        ("b.yaml", 5, 1, ""),
        ("c.yaml", 1, len("key: [unclosed") + 1, ""),  # the end of the file
    ]
    assert errors[2].message == "missing required field 'apiVersion'"
    assert errors[3].message.startswith("a policy document is a mapping")
    assert errors[4].message.startswith("YAML syntax: ")


def test_load_directory_raises_a_policy_error_holding_every_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("apiVersion: governor/v1\nkind: Plan\nmetadata: {}\n")

    with pytest.raises(PolicyLoadError) as raised:
        load_directory(tmp_path)

    assert isinstance(raised.value, PolicyError)
    [error] = raised.value.errors
    assert str(error) == f"{tmp_path / 'a.yaml'}:3:11: metadata: missing required field 'name'"
    assert str(raised.value) == str(error)
    assert error.to_dict() == {
        "file": str(tmp_path / "a.yaml"),
        "line": 3,
        "column": 11,
        "path": "metadata",
        "message": "metadata: missing required field 'name'",
    }


def test_a_missing_directory_is_a_policy_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        check_directory(tmp_path / "absent")
    (tmp_path / "file.yaml").write_text("")
    with pytest.raises(PolicyError, match="is not a directory"):
        load_directory(tmp_path / "file.yaml")


def test_bytes_that_are_not_utf8_are_located(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_bytes(b"apiVersion: governor/v1\nkind: Pl\xffan\n")

    [error] = errors_of(tmp_path)

    assert (error.line, error.column) == (2, 9)
    assert error.message == (
        "the file is not UTF-8 text (byte 0xff): save it as UTF-8 (e.g. iconv -f latin1 -t "
        "utf-8), or remove the byte"
    )


def test_a_control_character_is_located(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("apiVersion: governor/v1\r\nkind: P\x07lan\r\n")

    [error] = errors_of(tmp_path)

    assert (error.line, error.column) == (2, 8)
    assert "#x0007" in error.message


def test_an_alias_bomb_and_a_recursive_alias_are_errors_not_hangs(tmp_path: Path) -> None:
    rows = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for level in "bcdef":
        previous = chr(ord(level) - 1)
        rows.append(f"{level}: &{level} [{', '.join([f'*{previous}'] * 10)}]")
    (tmp_path / "bomb").mkdir()
    (tmp_path / "bomb" / "bomb.yaml").write_text("\n".join(rows) + "\n")
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "loop.yaml").write_text("a: &loop [*loop]\n")

    bomb = [e.message for e in errors_of(tmp_path / "bomb")]
    loop = [e.message for e in errors_of(tmp_path / "loop")]

    assert f"the policy set expands to over {MAX_VALUES} values" in bomb
    assert "an alias refers to a value that contains it" in loop


@pytest.mark.parametrize("depth", [100, 1000, 100_000])
def test_a_document_nested_too_deep_is_an_error(tmp_path: Path, depth: int) -> None:
    (tmp_path / "deep.yaml").write_text("a: " + "[" * depth + "]" * depth + "\n")

    [error] = [e for e in errors_of(tmp_path) if "nest" in e.message]

    # Located inside the nesting: past the bound, at most where YAML itself gives up.
    assert error.line == 1
    assert 3 + MAX_DEPTH <= error.column <= 3 + 1000 + 1


def test_a_set_problem_points_at_the_document_and_field(tmp_path: Path) -> None:
    adaptive = (EXAMPLES / "global-rps-by-gpu.yaml").read_text()
    (tmp_path / "a.yaml").write_text(adaptive)
    second = adaptive.replace("name: global-rps-by-gpu", "name: second")
    (tmp_path / "b.yaml").write_text(second)

    [error] = errors_of(tmp_path)

    assert (Path(error.file).name, error.line, error.column) == (
        "b.yaml",
        *where(second, "global/requests_per_second"),
    )
    assert error.path == "spec.target"
    assert "already driven by AdaptiveLimit 'global-rps-by-gpu'" in error.message


def test_keys_that_are_not_identifiers_are_quoted_in_paths(tmp_path: Path) -> None:
    text = (EXAMPLES / "limits.yaml").read_text().replace("floors: {", "floors: {ip/bogus: 1, ")
    (tmp_path / "limits.yaml").write_text(text)

    [error] = errors_of(tmp_path)

    assert error.path == "spec.floors['ip/bogus']"
    assert (error.line, error.column) == where(text, "ip/bogus")
    assert "invalid limit address 'ip/bogus'" in error.message


# --- property tests: whatever the input, errors are located inside the file ---------------------


def assert_located_or_loaded(directory: Path) -> None:
    """The loader returns a set or located errors; it never raises anything else."""
    texts = {str(p): p.read_bytes().decode("utf-8", "replace") for p in directory.iterdir()}
    policies, errors = check_directory(directory)
    event("loaded" if policies is not None else "errors")
    assert (policies is None) == bool(errors)
    for error in errors:
        assert error.file in texts
        lines = LINE_BREAK.split(texts[error.file])
        if len(lines) > 1 and not lines[-1]:
            lines.pop()
        assert 1 <= error.line <= len(lines), error
        assert 1 <= error.column <= len(lines[error.line - 1]) + 1, error
        assert error.message
        assert str(error).startswith(f"{error.file}:{error.line}:{error.column}: ")


def check_texts(texts: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        for file, text in texts.items():
            (directory / file).write_text(text, encoding="utf-8")
        assert_located_or_loaded(directory)


FIELDS = [
    "apiVersion", "kind", "metadata", "name", "spec", "signals", "query", "when", "for",
    "until", "actions", "target", "scale", "set", "limits", "models", "default_plan", "bounds",
    "min", "max", "setpoint", "algorithm", "aimd", "schedule", "windows", "per", "floors",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["governor/v1", "Plan", "Limits", "ThrottlePolicy", "AdaptiveLimit", "2m",
                     "x > 1", "plan/free/requests_per_minute", "tenant/$tenant/tokens_per_day",
                     "Mon-Fri 08:00-20:00", "requests_per_minute", "aimd", "free", "", "@", "$"]),
    st.text(max_size=12),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=25,
)
DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "apiVersion": st.sampled_from(["governor/v1", "governor/v2"]) | SCALARS,
        "kind": st.sampled_from(["Plan", "Limits", "ThrottlePolicy", "AdaptiveLimit"]) | SCALARS,
        "metadata": st.fixed_dictionaries({"name": st.sampled_from(["a", "free"]) | SCALARS}),
        "spec": st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6),
    },
)
YAML_ISH = st.lists(
    st.sampled_from([*"ab:-[]{},#&*!|>'\"?%@`0. \n\t\r", "  ", "<<", "---", "kind", "spec"]),
    max_size=40,
).map("".join)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(YAML_ISH, min_size=1, max_size=3))
def test_random_yaml_ish_text_gives_located_errors(texts: list[str]) -> None:
    check_texts({f"f{i}.yaml": text for i, text in enumerate(texts)})


@FUZZ
@given(st.lists(DOCUMENTS | VALUES, min_size=1, max_size=4))
def test_random_documents_give_located_errors(documents: list[object]) -> None:
    check_texts({"docs.yaml": yaml.safe_dump_all(documents, sort_keys=False)})


EXAMPLE_TEXTS = {p.name: p.read_text() for p in EXAMPLE_FILES}
EXAMPLE_DOCUMENTS = [
    (name, document)
    for name, text in EXAMPLE_TEXTS.items()
    for document in yaml.safe_load_all(text)
]


def paths_of(value: object, prefix: tuple[Hashable, ...] = ()) -> list[tuple[Hashable, ...]]:
    """Every path to a mapping entry or list item inside `value`."""
    out: list[tuple[Hashable, ...]] = []
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else []
    )
    for key, child in items:
        out.append((*prefix, key))
        out += paths_of(child, (*prefix, key))
    return out


@st.composite
def mutated_examples(draw: st.DrawFn) -> dict[str, str]:
    """The examples with one document changed: a key deleted or renamed, a value replaced."""
    index = draw(st.integers(0, len(EXAMPLE_DOCUMENTS) - 1))
    name, document = EXAMPLE_DOCUMENTS[index]
    mutated = copy.deepcopy(document)
    path = draw(st.sampled_from(paths_of(mutated)))
    parent = mutated
    for key in path[:-1]:
        parent = parent[key]
    operation = draw(st.sampled_from(["delete", "rename", "replace"]))
    if operation == "delete":
        del parent[path[-1]]
    elif operation == "rename" and isinstance(parent, dict):
        parent[draw(st.sampled_from(FIELDS) | st.text(min_size=1, max_size=8))] = parent.pop(
            path[-1]
        )
    else:
        parent[path[-1]] = draw(VALUES)
    others = [yaml.safe_dump(d) for n, d in EXAMPLE_DOCUMENTS if n == name and d is not document]
    return with_context(name, "---\n".join([yaml.safe_dump(mutated, sort_keys=False), *others]))


def with_context(name: str, text: str) -> dict[str, str]:
    """`text` as file `name`, beside the plans and limits that the other examples refer to."""
    return {
        "plans.yaml": EXAMPLE_TEXTS["plans.yaml"],
        "limits.yaml": EXAMPLE_TEXTS["limits.yaml"],
        name: text,
    }


@FUZZ
@given(mutated_examples())
def test_mutated_examples_give_located_errors(texts: dict[str, str]) -> None:
    check_texts(texts)


@FUZZ
@given(
    st.sampled_from(sorted(EXAMPLE_TEXTS)),
    st.lists(st.tuples(st.integers(0, 40), YAML_ISH.filter(lambda t: "\r" not in t)), max_size=3),
)
def test_examples_with_garbage_lines_give_located_errors(
    name: str, garbage: list[tuple[int, str]]
) -> None:
    lines = EXAMPLE_TEXTS[name].splitlines()
    for at, text in garbage:
        lines.insert(min(at, len(lines)), text)
    check_texts(with_context(name, "\n".join(lines) + "\n"))


def test_a_multi_line_message_keeps_one_error_per_unindented_line(tmp_path: Path) -> None:
    text = (EXAMPLES / "gpu-saturation.yaml").read_text().replace("gpu_util > 0.90", "gpu_util >")
    (tmp_path / "plans.yaml").write_text(EXAMPLE_TEXTS["plans.yaml"])
    (tmp_path / "gpu.yaml").write_text(text)

    [error] = errors_of(tmp_path)

    first, *rest = str(error).splitlines()
    assert first.startswith(
        f"{tmp_path / 'gpu.yaml'}:{':'.join(map(str, where(text, 'gpu_util >')))}: "
    )
    assert "spec.when: condition 'gpu_util >' is not valid CEL" in first
    assert rest
    assert all(line.startswith("    ") for line in rest)
