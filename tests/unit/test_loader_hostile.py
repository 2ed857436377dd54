"""Hostile policy files (issue #14): each ends as a located load error, never an exception,
and a set without Limits or Plan is refused."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.errors import PolicyError
from controller.policy import sourcemap
from controller.policy.expressions import MAX_EXPRESSION_CHARS, MAX_EXPRESSION_DEPTH
from controller.policy.loader import (
    MAX_FILE_BYTES,
    MAX_FILES,
    MAX_SET_BYTES,
    LocatedError,
    PolicyLoadError,
    check_directory,
    load_directory,
    policy_files,
)
from controller.policy.sourcemap import (
    MAX_DEPTH,
    MAX_DOCUMENTS,
    MAX_NODES,
    MAX_VALUES,
    parse_yaml,
)

SHIPPED = Path(__file__).parents[2] / "policies"

THROTTLE = """apiVersion: governor/v1
kind: ThrottlePolicy
metadata: {name: hostile}
spec:
  signals: {x: {query: up}}
  when: %s
  actions: [{target: global/requests_per_second, scale: 0.5}]
"""


@pytest.fixture
def shipped(tmp_path: Path) -> Path:
    """A writable copy of the shipped policies (a complete, valid set)."""
    target = tmp_path / "policies"
    shutil.copytree(SHIPPED, target)
    return target


def refused(directory: Path) -> list[LocatedError]:
    """The errors of a set that must not load; loading never raises anything else."""
    policies, errors = check_directory(directory, complete=True)
    assert policies is None
    assert errors
    with pytest.raises(PolicyLoadError):
        load_directory(directory, complete=True)
    return errors


def only_error(directory: Path, file: str) -> LocatedError:
    [error] = [e for e in refused(directory) if Path(e.file).name == file]
    return error


def condition(text: str) -> str:
    return THROTTLE % ("'" + text.replace("'", "''") + "'")


@pytest.mark.parametrize(
    "text",
    [
        "!" * 500 + "(x > 1.0)",
        "-" * 500 + "x > 1.0",
        "(" * 500 + "x > 1.0" + ")" * 500,
        " && ".join(["x > 1.0"] * 300),  # under the length bound: refused for its depth
        "[" * 500 + "]" * 500,
    ],
    ids=["500 !", "500 -", "500 (", "300 && terms", "500 ["],
)
def test_a_deeply_nested_condition_is_a_located_error(shipped: Path, text: str) -> None:
    assert len(text) <= MAX_EXPRESSION_CHARS
    (shipped / "deep.yaml").write_text(condition(text))

    error = only_error(shipped, "deep.yaml")

    assert (error.line, error.column, error.path) == (6, 9, "spec.when")
    assert f"nests deeper than {MAX_EXPRESSION_DEPTH} levels" in error.message


def test_a_condition_of_1000_terms_is_a_located_error(shipped: Path) -> None:
    (shipped / "long.yaml").write_text(condition(" && ".join(["x > 1.0"] * 1000)))

    error = only_error(shipped, "long.yaml")

    assert (error.line, error.column) == (6, 9)
    assert f"at most {MAX_EXPRESSION_CHARS} characters" in error.message


def test_a_condition_just_inside_the_depth_bound_still_loads(shipped: Path) -> None:
    # 90 `!` over a comparison: 92 levels deep, inside the bound of 100.
    (shipped / "ok.yaml").write_text(condition("!" * 90 + "(x > 1.0)"))

    assert check_directory(shipped, complete=True)[1] == []


@pytest.mark.parametrize(
    "zone", ["A" * 300, "Europe/" + "x" * 5000, "../../etc/passwd", "UTC\\x00"]
)
def test_an_absurd_time_zone_is_a_located_error(shipped: Path, zone: str) -> None:
    text = (shipped / "business-hours.yaml").read_text()
    (shipped / "business-hours.yaml").write_text(
        text.replace("timezone: Europe/Berlin", f'timezone: "{zone}"')
    )

    error = only_error(shipped, "business-hours.yaml")

    assert error.path == "spec.schedule.timezone"
    assert "unknown time zone" in error.message
    assert error.line == 14
    assert len(error.message) < 250  # the name is cut, not echoed whole


def test_the_hosts_own_time_zone_is_refused_for_a_named_one(shipped: Path) -> None:
    # Debian's tz database lists `localtime`, a link to /etc/localtime: the schedule would
    # follow whichever host reads it (UTC in the controller's image, the laptop's zone where
    # `governor policy test` ran), and a host without the link refuses what lint took.
    text = (shipped / "business-hours.yaml").read_text()
    (shipped / "business-hours.yaml").write_text(
        text.replace("timezone: Europe/Berlin", "timezone: localtime")
    )

    error = only_error(shipped, "business-hours.yaml")

    assert (error.path, error.line) == ("spec.schedule.timezone", 14)
    assert "Europe/Berlin" in error.message


def test_a_merge_overriding_8000_keys_keeps_every_override_and_its_place(tmp_path: Path) -> None:
    keys = 8000
    text = (
        "base: &b\n"
        + "".join(f"  k{i}: {i}\n" for i in range(keys))
        + "other:\n  <<: *b\n"
        + "".join(f"  k{i}: x{i}\n" for i in range(0, keys, 2))
    )

    [document] = parse_yaml(text).documents

    other = document.value["other"]  # type: ignore[index]
    assert other == {f"k{i}": (f"x{i}" if i % 2 == 0 else i) for i in range(keys)}
    # An overridden key points at where it is written; a merged one at the anchor's line.
    base_line = keys + 4  # `other:` is line keys+2, `<<` keys+3
    assert document.spots[("other", "k0")].key.line == base_line
    assert document.spots[("other", "k2")].key.line == base_line + 1
    assert document.spots[("other", "k1")].key.line == 3


@pytest.mark.parametrize("loader", ["libyaml", "python"])
@pytest.mark.parametrize("text", ["a: " + "[" * 5000, "- " * 5000 + "x", "a: " + "{b: " * 2000])
def test_deep_yaml_is_a_located_error_with_either_parser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: str, text: str
) -> None:
    if loader == "python":
        monkeypatch.setattr(sourcemap, "_LOADER", sourcemap._DepthLimitedLoader)
    (tmp_path / "deep.yaml").write_text(text + "\n")

    [error] = [e for e in refused(tmp_path) if "nest" in e.message]

    assert error.line >= 1
    assert error.column > MAX_DEPTH


def test_alias_bombs_in_several_files_share_one_bound(tmp_path: Path) -> None:
    # Each file alone stays under the bound; together they would not.
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    bomb += "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c]\n"
    for number in range(30):
        (tmp_path / f"bomb{number:02}.yaml").write_text(bomb)

    errors = refused(tmp_path)

    over = [e for e in errors if e.message == f"the policy set expands to over {MAX_VALUES} values"]
    assert over
    assert Path(over[0].file).name != "bomb00.yaml"


def test_thousands_of_documents_are_refused_past_the_bound(tmp_path: Path) -> None:
    (tmp_path / "many.yaml").write_text("---\n{}\n" * (MAX_DOCUMENTS + 500))

    errors = refused(tmp_path)

    [bound] = [e for e in errors if "documents" in e.message]
    assert bound.message.startswith(f"over {MAX_DOCUMENTS} documents")
    assert bound.line == 2 * MAX_DOCUMENTS + 2
    assert len(errors) <= MAX_DOCUMENTS + 1


def test_an_oversized_file_is_refused_before_it_is_parsed(shipped: Path) -> None:
    (shipped / "huge.yaml").write_bytes(b"# " + b"x" * MAX_FILE_BYTES + b"\n")

    error = only_error(shipped, "huge.yaml")

    assert (error.line, error.column) == (1, 1)
    assert f"over {MAX_FILE_BYTES} bytes" in error.message


def test_a_set_over_its_byte_bound_is_refused_at_the_file_that_crosses_it(tmp_path: Path) -> None:
    for name in ("a.yaml", "b.yaml", "c.yaml"):  # each under the file bound, together over
        (tmp_path / name).write_bytes(b"# " + b"x" * (MAX_SET_BYTES // 3) + b"\n")

    errors = refused(tmp_path)

    [crossing] = [e for e in errors if "bytes with this file" in e.message]
    assert (Path(crossing.file).name, crossing.line, crossing.column) == ("c.yaml", 1, 1)
    assert f"over {MAX_SET_BYTES} bytes" in crossing.message


@pytest.mark.parametrize("loader", ["libyaml", "python"])
def test_yaml_of_too_many_nodes_is_refused_before_it_is_converted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: str
) -> None:
    if loader == "python":
        monkeypatch.setattr(sourcemap, "_LOADER", sourcemap._DepthLimitedLoader)
    half = MAX_NODES // 2 + 1  # two files, each under the bound: the set is over it
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text("[" + "1," * half + "1]\n")

    errors = refused(tmp_path)

    [over] = [e for e in errors if "nodes" in e.message]
    assert (Path(over.file).name, over.line, over.column) == ("b.yaml", 1, 1)
    assert f"holds over {MAX_NODES} nodes" in over.message


def test_too_many_files_is_a_clear_refusal(tmp_path: Path) -> None:
    for number in range(MAX_FILES + 1):
        (tmp_path / f"p{number}.yaml").write_text("{}\n")

    with pytest.raises(PolicyError, match=f"over the {MAX_FILES} a set may have"):
        policy_files(tmp_path)


def test_a_symlink_out_of_the_directory_is_refused_and_one_inside_is_read(
    shipped: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "secret.yaml"
    outside.write_text("password: hunter2\n")
    (shipped / "leak.yaml").symlink_to(outside)

    error = only_error(shipped, "leak.yaml")

    assert "outside the policy directory" in error.message
    assert "hunter2" not in error.message
    # A ConfigMap mount: every file is a link into `..data` inside the directory.
    (shipped / "leak.yaml").unlink()
    (shipped / "..data").mkdir()
    (shipped / "limits.yaml").rename(shipped / "..data" / "limits.yaml")
    (shipped / "limits.yaml").symlink_to(Path("..data") / "limits.yaml")
    assert check_directory(shipped, complete=True)[1] == []


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/urandom", "/etc", "/proc/self/environ"])
def test_a_link_out_of_the_directory_to_anything_is_refused_unread(
    shipped: Path, target: str
) -> None:
    (shipped / "out.yaml").symlink_to(target)

    error = only_error(shipped, "out.yaml")

    assert (error.line, error.column) == (1, 1)
    assert "outside the policy directory" in error.message


def test_a_fifo_is_refused_without_waiting_for_a_writer(shipped: Path) -> None:
    os.mkfifo(shipped / "pipe.yaml")
    (shipped / "link.yaml").symlink_to("pipe.yaml")  # inside, to the FIFO

    errors = refused(shipped)

    assert {Path(e.file).name for e in errors} == {"pipe.yaml", "link.yaml"}
    assert all("not a regular file" in e.message for e in errors)


def test_a_dangling_link_is_skipped_as_a_configmap_update_leaves_one(shipped: Path) -> None:
    (shipped / "gone.yaml").symlink_to(Path("..data") / "gone.yaml")

    assert check_directory(shipped, complete=True)[1] == []


@pytest.mark.parametrize(
    ("data", "line", "column"),
    [
        (b"kind: Plan\nmetadata: {name: \xff\xfe}\n", 2, 18),
        (b"\x00\x01\x02binary", 1, 1),
        (bytes(range(256)), 2, 118),  # 0x80, after the line break 0x0a
    ],
    ids=["latin-1 bytes", "NUL bytes", "binary"],
)
def test_bytes_that_are_not_text_are_a_located_error(
    tmp_path: Path, data: bytes, line: int, column: int
) -> None:
    (tmp_path / "bin.yaml").write_bytes(data)

    error = only_error(tmp_path, "bin.yaml")

    assert (error.line, error.column) == (line, column)


def line_of(path: Path, text: str) -> int:
    """The 1-based number of the first line of `path` that holds `text` (the shipped files
    change; the tests must not depend on their line numbers)."""
    lines = path.read_text().splitlines()
    return next(number for number, line in enumerate(lines, 1) if text in line)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("scale", "1e400", "finite"),
        ("scale", ".nan", "finite"),
        ("scale", "-.inf", "finite"),
        ("scale", "1" + "0" * 5000, "digits"),
        ("max", "-1", "greater than or equal to 0"),
    ],
)
def test_absurd_numbers_are_located_errors(
    shipped: Path, field: str, value: str, expected: str
) -> None:
    path = shipped / "gpu-saturation.yaml"
    path.write_text(
        path.read_text().replace(
            "scale: 0.5}", "scale: 0.5}" if field != "scale" else f"scale: {value}}}"
        )
    )
    if field == "max":
        path.write_text(path.read_text().replace("scale: 0.5}", f"scale: 0.5, max: {value}}}"))

    errors = [e for e in refused(shipped) if Path(e.file).name == "gpu-saturation.yaml"]

    line = line_of(path, "scale:")
    assert any(expected in e.message and e.line == line for e in errors), errors


@pytest.mark.parametrize("value", ["'.inf'", ".inf", ".nan", "400d", "-5", "'-5m'", "1e400d"])
def test_absurd_durations_are_located_errors(shipped: Path, value: str) -> None:
    path = shipped / "gpu-saturation.yaml"
    path.write_text(path.read_text().replace("cooldown: 5m", f"cooldown: {value}"))

    error = only_error(shipped, "gpu-saturation.yaml")

    assert (error.line, error.path) == (line_of(path, "cooldown:"), "spec.cooldown")


def test_a_huge_promql_query_is_a_located_error(shipped: Path) -> None:
    path = shipped / "gpu-saturation.yaml"
    text = path.read_text()
    start = text.index("query:")
    end = text.index("      stale_after", start)  # the query's folded lines end there
    path.write_text(text[:start] + "query: " + "x" * 100_000 + "\n" + text[end:])

    error = only_error(shipped, "gpu-saturation.yaml")

    assert (error.line, error.path) == (line_of(path, "query:"), "spec.signals.saturation.query")
    assert "at most 8192 characters" in error.message


def test_duplicate_names_are_located_errors(shipped: Path) -> None:
    shutil.copy(shipped / "gpu-saturation.yaml", shipped / "copy.yaml")

    error = only_error(shipped, "gpu-saturation.yaml")  # the second by name: copy.yaml first

    line = line_of(shipped / "gpu-saturation.yaml", "  name:")
    assert (error.line, error.path) == (line, "metadata.name")
    assert "defined twice" in error.message


def test_an_empty_directory_is_not_a_policy_set(tmp_path: Path) -> None:
    messages = [e.message for e in refused(tmp_path)]

    assert any("no `kind: Limits` document" in m for m in messages)
    assert any("no `kind: Plan` document" in m for m in messages)


@pytest.mark.parametrize(
    ("removed", "missing"), [("limits.yaml", "Limits"), ("plans.yaml", "Plan")]
)
def test_a_set_without_limits_or_plan_is_refused(shipped: Path, removed: str, missing: str) -> None:
    (shipped / removed).unlink()
    for file in shipped.glob("*.yaml"):  # the policies that name plans go too
        if file.name not in ("limits.yaml", "plans.yaml"):
            file.unlink()

    [error] = refused(shipped)

    assert (error.file, error.line, error.column) == (str(shipped), 1, 1)
    assert f"no `kind: {missing}` document" in error.message


def test_lint_refuses_an_incomplete_set_and_an_empty_directory(shipped: Path) -> None:
    (shipped / "limits.yaml").unlink()

    result = CliRunner().invoke(app, ["policy", "lint", str(shipped)])

    assert result.exit_code == 1
    assert f"{shipped}:1:1: the policy set has no `kind: Limits` document" in result.stderr
    for file in shipped.iterdir():
        if file.is_dir():
            shutil.rmtree(file)  # policies/examples/
        else:
            file.unlink()
    empty = CliRunner().invoke(app, ["policy", "lint", str(shipped)])
    assert empty.exit_code == 2
    assert "holds no policy files" in empty.stderr


@pytest.mark.parametrize(
    "text",
    [
        condition("!" * 500 + "(x > 1.0)"),
        THROTTLE % "x > 1.0"
        + "  schedule: {timezone: '"
        + "A" * 300
        + "', windows: ['daily 00:00-06:00']}\n",
    ],
    ids=["deep condition", "long time zone"],
)
def test_lint_reports_hostile_files_as_errors_not_tracebacks(shipped: Path, text: str) -> None:
    (shipped / "hostile.yaml").write_text(text)

    result = CliRunner().invoke(app, ["policy", "lint", str(shipped)])

    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"{shipped / 'hostile.yaml'}:" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_an_unreadable_directory_is_a_clear_refusal(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root reads everything: a file in place of the directory stands in for it
        (tmp_path / "file").write_text("")
        with pytest.raises(PolicyError, match="is not a directory"):
            policy_files(tmp_path / "file")
        return
    locked = tmp_path / "locked"
    locked.mkdir(mode=0)
    with pytest.raises(PolicyError, match="cannot list policy directory"):
        policy_files(locked)


def test_a_max_tokens_past_32_bits_is_a_located_error(shipped: Path) -> None:
    path = shipped / "plans.yaml"
    path.write_text(path.read_text().replace("max_tokens: 256", "max_tokens: 1" + "0" * 400))

    error = only_error(shipped, "plans.yaml")

    assert (error.line, error.path) == (31, "spec.degrade.max_tokens")
    assert "less than 2147483648" in error.message


def test_policy_test_files_are_read_under_the_same_bounds(shipped: Path) -> None:
    os.mkfifo(shipped / "pipe_test.yaml")
    (shipped / "huge_test.yaml").write_bytes(b"# " + b"x" * MAX_FILE_BYTES + b"\n")

    result = CliRunner().invoke(app, ["policy", "test", str(shipped)])

    assert result.exit_code == 1
    assert f"{shipped / 'huge_test.yaml'}:1:1: the file is over" in result.stderr
    assert "pipe_test.yaml" not in result.output + result.stderr  # not a file: not opened


@pytest.mark.parametrize("text", ["", "\n", "# disabled for now\n", "---\n---\n...\n"])
def test_a_policy_file_that_holds_no_document_is_refused(shipped: Path, text: str) -> None:
    """A sync that truncated gpu-saturation.yaml would otherwise drop its policy silently
    (it removes no limit, so the reload guard would not stop it either)."""
    (shipped / "gpu-saturation.yaml").write_text(text)

    error = only_error(shipped, "gpu-saturation.yaml")

    assert (error.line, error.column) == (1, 1)
    assert "holds no policy document" in error.message
    assert "Delete the file if it is meant to hold nothing" in error.message


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("name: global", "name: !!binary Z2xvYmFs"),  # 'global', as bytes
        ("default_plan: free", "default_plan: !!binary ZnJlZQ=="),
    ],
)
def test_a_binary_scalar_is_a_located_error_naming_its_fix(
    shipped: Path, old: str, new: str
) -> None:
    # SafeLoader builds `!!binary` into bytes: a value a reviewer cannot read, which the
    # loader took (a `name` of b'global' even loaded) where `!!set` was refused.
    path = shipped / "limits.yaml"
    path.write_text(path.read_text().replace(old, new, 1))

    errors = [e for e in refused(shipped) if Path(e.file).name == "limits.yaml"]

    line = line_of(path, "!!binary")
    column = path.read_text().splitlines()[line - 1].index("!!") + 1
    tagged = [e for e in errors if "'tag:yaml.org,2002:binary' is not supported" in e.message]
    assert [(e.line, e.column) for e in tagged] == [(line, column)]
    assert "write the value itself, without the tag" in tagged[0].message


def test_a_symlink_loop_is_refused_naming_it_not_skipped(shipped: Path) -> None:
    (shipped / "loop.yaml").symlink_to("loop.yaml")

    error = only_error(shipped, "loop.yaml")

    assert (error.line, error.column) == (1, 1)
    assert "leads back to itself (a link loop)" in error.message


@pytest.mark.parametrize(
    ("file", "old", "new", "field"),
    [
        # 1e308 × the free plan's 10 requests a minute is infinity: "no limit" (the limit was
        # deleted, the plan served unrestricted) instead of the loosening meant.
        ("gpu-saturation.yaml", "scale: 0.5}", "scale: 1e308}", "spec.actions[0].scale"),
        ("gpu-saturation.yaml", "scale: 0.5}", "scale: 0.5, max: 1e300}", "spec.actions[0].max"),
        ("plans.yaml", "requests_per_minute: 10\n", "requests_per_minute: 1e300\n", None),
        ("limits.yaml", "concurrent_requests: 300", "concurrent_requests: 1e300", None),
    ],
)
def test_numbers_past_what_a_limit_can_mean_are_located_errors(
    shipped: Path, file: str, old: str, new: str, field: str | None
) -> None:
    path = shipped / file
    path.write_text(path.read_text().replace(old, new, 1))

    error = only_error(shipped, file)

    assert error.line == line_of(path, new.strip())
    assert field is None or error.path == field
    assert "the most" in error.message


def test_the_largest_scale_of_the_largest_limit_stays_a_limit(shipped: Path) -> None:
    from controller.policy.documents import MAX_LIMIT_VALUE, MAX_SCALE

    assert math.isfinite(MAX_LIMIT_VALUE * MAX_SCALE)
    plans = shipped / "plans.yaml"
    plans.write_text(
        plans.read_text().replace(
            "requests_per_minute: 10\n", f"requests_per_minute: {MAX_LIMIT_VALUE:.0f}\n", 1
        )
    )
    policy = shipped / "gpu-saturation.yaml"
    policy.write_text(policy.read_text().replace("scale: 0.5}", f"scale: {MAX_SCALE:.0f}}}"))

    policies, errors = check_directory(shipped, complete=True)

    assert policies is not None, errors


@pytest.mark.parametrize("name", ["surge.YAML", "surge.Yml", "surge.yaML"])
def test_a_policy_file_named_in_capitals_is_refused_not_skipped(shipped: Path, name: str) -> None:
    # Skipped, the policy in it was never in force while lint said "ok".
    (shipped / name).write_text((shipped / "gpu-saturation.yaml").read_text())
    (shipped / "gpu-saturation.yaml").unlink()

    error = only_error(shipped, name)

    assert (error.line, error.column) == (1, 1)
    assert "rename it to surge.yaml" in error.message or "rename it to surge.yml" in error.message
    result = CliRunner().invoke(app, ["policy", "lint", str(shipped)])
    assert result.exit_code == 1
    assert name in result.output


@pytest.mark.parametrize(
    ("written", "read_as"),
    [("0600", 384), ("010", 8), ("-010", -8), ("1:30", 90), ("1:30.5", 90.5)],
)
def test_a_number_yaml_1_1_reads_in_another_base_is_a_located_error(
    shipped: Path, written: str, read_as: float
) -> None:
    # YAML 1.1 reads `0600` as octal (384) and `1:30` in base 60 (90): a plan written with 600
    # requests a minute got 384, where an editor's YAML 1.2 schema check and a reader see 600.
    plans = shipped / "plans.yaml"
    plans.write_text(
        plans.read_text().replace("requests_per_minute: 600\n", f"requests_per_minute: {written}\n")
    )

    error = only_error(shipped, "plans.yaml")

    assert error.line == line_of(plans, f": {written}")
    assert error.path == "spec.limits.requests_per_minute"
    assert f"{read_as:g}" in error.message
    assert "decimal" in error.message


@pytest.mark.parametrize(
    ("encoding", "family"),
    [("utf-16-le", "utf-16"), ("utf-16-be", "utf-16"), ("utf-32-le", "utf-32")],
)
def test_a_utf16_file_is_refused_with_the_conversion_from_its_encoding(
    shipped: Path, encoding: str, family: str
) -> None:
    # Windows editors and PowerShell's `>` write UTF-16 with a byte order mark; the fix named
    # was `iconv -f latin1`, which turns the file into mojibake instead of the policy.
    path = shipped / "gpu-saturation.yaml"
    path.write_bytes(("\ufeff" + path.read_text()).encode(encoding))

    error = only_error(shipped, "gpu-saturation.yaml")

    assert (error.line, error.column) == (1, 1)
    assert f"iconv -f {family} -t utf-8" in error.message
    assert "latin1" not in error.message


def test_a_plan_whose_models_were_emptied_is_refused_not_opened_to_every_model(
    shipped: Path,
) -> None:
    # `models: []` reads as "any model", as a plan without the field does: an SRE emptying
    # the list to take a plan's models away gave it every model instead.
    path = shipped / "plans.yaml"
    path.write_text(path.read_text().replace("models: [gpt-3.5-turbo]\n", "models: []\n", 1))

    error = only_error(shipped, "plans.yaml")

    assert (error.path, error.line) == ("spec.models", 11)
    assert "any model" in error.message
    assert "requests_per_minute: 0" in error.message
    # Left out, the plan may call any model, as documented.
    path.write_text(path.read_text().replace("  models: []\n", "", 1))
    policies, errors = check_directory(shipped, complete=True)
    assert not errors
    assert policies is not None


@pytest.mark.parametrize("until", ["x > 1.0", "x>1.0", "  x  >  1.0 "])
def test_an_until_that_repeats_when_is_refused_naming_the_fix(shipped: Path, until: str) -> None:
    # It would release on the tick it engaged: engage, release, cool down, engage — a flap
    # by construction, which no test of the policy would show before a page did.
    (shipped / "echo.yaml").write_text(
        condition("x > 1.0").replace("  actions:", f"  until: '{until}'\n  actions:")
    )

    error = only_error(shipped, "echo.yaml")

    assert "`until` is the same condition as `when`" in error.message
    assert "leave `until` out" in error.message


def test_an_until_that_differs_from_when_loads(shipped: Path) -> None:
    (shipped / "hysteresis.yaml").write_text(
        condition("x > 1.0").replace("  actions:", "  until: 'x < 0.75'\n  actions:")
    )
    policies, errors = check_directory(shipped, complete=True)
    assert errors == []
    assert policies is not None
