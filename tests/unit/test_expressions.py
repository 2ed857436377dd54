"""CEL conditions: the numpy path agrees with the CEL library, errors name the text and fix."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass

import cel
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.policy.expressions import ExpressionError, compile_expression

SIGNALS = ("a", "b", "c")


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("gpu_util > 0.90", {"gpu_util": [0.5, 0.9, 0.95]}, [False, False, True]),
        (
            "spend > 3.0 * usual && spend > 0.01",
            {"spend": [0.005, 0.5, 0.5, 2.0], "usual": [0.0, 0.1, 0.2, 0.5]},
            [False, True, False, True],
        ),
        (
            "!(q < 5) || x >= 2.5 * (y - 1)",
            {"q": [3.0, 7.0, 3.0], "x": 2.5, "y": [2.0, 0.0, 3.0]},
            [True, True, False],
        ),
        ("a - b - c > 0.0", {"a": 5.0, "b": 3.0, "c": [1.0, 3.0]}, [True, False]),
        ("a / b / c == 1.0", {"a": 8.0, "b": 4.0, "c": [2.0, 1.0]}, [True, False]),
        ("-a * b == -6.0", {"a": 2.0, "b": [3.0, -3.0]}, [True, False]),
        ("a + b * c == 7.0", {"a": 1.0, "b": 2.0, "c": [3.0, 2.0]}, [True, False]),
        ("a > 1.0 || b > 1.0 && c > 1.0", {"a": 2.0, "b": 0.0, "c": 0.0}, [True]),
        (
            "a < b == (b < c)",
            {"a": [1.0, 3.0, 1.0], "b": 2.0, "c": [3.0, 1.0, 0.0]},
            [True] * 2 + [False],
        ),
        ("a > 0.0 ? b > 0.0 : c > 0.0", {"a": [1.0, -1.0], "b": -1.0, "c": 1.0}, [False, True]),
        ("a > 0.0 ? true : false ? a < 0.0 : true", {"a": [1.0, -1.0]}, [True, True]),
        ("a / 0.0 > 1e300", {"a": [1.0, -1.0, 0.0]}, [True, False, False]),
        ("a != a", {"a": [math.nan, 1.0]}, [True, False]),
        ("a < 1.0 || a >= 1.0", {"a": [math.nan, 0.0]}, [False, True]),
        ("!(a < 1.0)", {"a": [math.nan]}, [True]),
        ("double(a) >= 0x10 && a < 1e2", {"a": [16.0, 15.0, 100.0]}, [True, False, False]),
        ("true", {}, [True, True]),
        (
            "a > 3 * b && b - 1 >= 0",
            {"a": [7.0, 5.0, 7.0], "b": [2.0, 2.0, 0.5]},
            [True, False, False],
        ),
        ("a == 7 / 2 && 7 % -3 == 1 && -7 / 2 == -3", {"a": [3.0, 3.5]}, [True, False]),
        ("a < 9223372036854775807 && 2 * 3 == 6", {"a": [1.0]}, [True]),
        ("(a > 0.0 ? 1 : 2.5) * 2.0 == 2.0", {"a": [1.0, -1.0]}, [True, False]),
        ("a > 1 // comments are whitespace\n&& a < 3", {"a": [2.0, 3.0]}, [True, False]),
    ],
)
def test_hand_cases(text: str, env: dict[str, float | list[float]], expected: list[bool]) -> None:
    expression = compile_expression(text, env)
    arrays = {name: np.asarray(value, dtype=float) for name, value in env.items()}
    result = expression.evaluate(arrays, len(expected))
    assert expression.vectorized
    assert result.dtype == np.bool_
    assert result.tolist() == expected


def test_names_are_the_signals_read() -> None:
    expression = compile_expression("a > 1.0 && c < 2.0", {"a", "b", "c"})
    assert expression.names == frozenset({"a", "c"})


def test_scalars_broadcast_and_evaluate_one_agrees() -> None:
    expression = compile_expression("spend > 3.0 * usual", {"spend", "usual"})
    spend = np.array([0.1, 0.4, 0.2])
    result = expression.evaluate({"spend": spend, "usual": 0.1}, 3)
    assert result.tolist() == [False, True, False]
    assert [expression.evaluate_one({"spend": s, "usual": 0.1}) for s in spend] == [
        False,
        True,
        False,
    ]


def test_constant_condition_has_the_requested_length() -> None:
    assert compile_expression("1.0 < 2.0", []).evaluate({}, 4).tolist() == [True] * 4


def test_result_is_a_fresh_bool_array_for_any_numeric_input() -> None:
    expression = compile_expression("a >= 2", {"a"})
    result = expression.evaluate({"a": np.array([1, 2, 3])}, 3)  # integers arrive as floats
    result[0] = True  # writable, not a broadcast view
    assert result.tolist() == [True, True, True]
    assert expression.evaluate({"a": np.array([])}, 0).shape == (0,)
    assert expression.evaluate({"a": 5.0}, 0).shape == (0,)


def test_wrong_length_and_missing_signal_are_errors() -> None:
    expression = compile_expression("a > b", {"a", "b"})
    with pytest.raises(ExpressionError, match=r"signal 'a' .* expected a scalar or 3 rows"):
        expression.evaluate({"a": np.zeros(2), "b": 1.0}, 3)
    with pytest.raises(ExpressionError, match=r"no value for signal 'b'"):
        expression.evaluate({"a": 1.0}, 1)


def test_fallback_evaluates_valid_cel_outside_the_subset() -> None:
    expression = compile_expression('size("ab") == 2 && x > 1.0', {"x"})
    assert not expression.vectorized
    assert expression.names == frozenset({"x"})
    result = expression.evaluate({"x": np.array([0.5, 1.5, 2.0])}, 3)
    assert result.tolist() == [False, True, True]
    assert expression.evaluate_one({"x": 3.0})


def test_fallback_integer_arithmetic_follows_cel() -> None:
    # A whole number chosen per row keeps CEL int rules: 7 / 2 == 3 (not 3.5).
    expression = compile_expression("(x > 0.0 ? 7 : 8) / 2 == 3", {"x"})
    assert not expression.vectorized
    assert expression.evaluate({"x": np.array([1.0, -1.0])}, 2).tolist() == [True, False]


def test_fallback_row_that_fails_in_cel_is_false() -> None:
    expression = compile_expression("x > 0.0 && 1 / int(x) > 0", {"x"})
    assert not expression.vectorized
    assert expression.evaluate({"x": np.array([0.5, 1.0])}, 2).tolist() == [False, True]


def test_null_is_not_a_signal() -> None:
    expression = compile_expression("x != null && x > 1.0", {"x"})
    assert not expression.vectorized
    assert expression.evaluate({"x": np.array([0.5, 1.5])}, 2).tolist() == [False, True]


def test_comprehension_variables_are_not_signals() -> None:
    expression = compile_expression("[1.0, 2.0].exists(v, v > x)", {"x"})
    assert expression.names == frozenset({"x"})
    assert expression.evaluate({"x": np.array([1.5, 2.5])}, 2).tolist() == [True, False]


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("", ["cannot be empty", "gpu_util > 0.9"]),
        ("   ", ["cannot be empty"]),
        ("gpu_util >", ["'gpu_util >'", "not valid CEL", "column 11", "^"]),
        ("gpu_util > 0.9 and a < 1.0", ["not valid CEL", "&&, || and !"]),
        ("gpu_util = 0.9", ["not valid CEL", "=="]),
        ("gpu_util + 1", ["'gpu_util + 1'", "must be a condition that is true or false"]),
        ("gpu_util", ["must be a condition", "`gpu_util > 0.5`"]),
        ('size("ab")', ["must be a condition"]),
        ("gpu_util % 2.0 > 0.5", ["column 10", "% only for whole numbers"]),
        ("!gpu_util", ["column 1", "! negates a condition"]),
        ("gpu_util && a > 1.0", ["&& joins conditions"]),
        ("gpu_util == true", ["compares a number with true/false"]),
        ("a < gpu_util == gpu_util < a", ["column 14", "compares a number with true/false"]),
        ("true + 1.0 > 0.0", ["needs numbers"]),
        ("gpu_util ? a > 0.0 : a < 0.0", ["before ? must be a condition"]),
    ],
)
def test_compile_errors_name_the_text_and_the_fix(text: str, fragments: list[str]) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(text, {"gpu_util", "a"})
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_unknown_signal_suggests_the_close_name() -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression("gpu_utl > 0.9", {"gpu_util", "spend"})
    assert str(caught.value) == (
        "unknown signal 'gpu_utl' in 'gpu_utl > 0.9'; declared signals: gpu_util, spend; "
        "did you mean 'gpu_util'?"
    )


def test_unknown_signal_without_declared_signals() -> None:
    with pytest.raises(ExpressionError, match=r"declared signals: none \(declare signals"):
        compile_expression("x > 1.0", [])


def test_expression_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown signal"):
        compile_expression("x > 1.0", ["y"])


# --- property: the numpy path equals CEL row by row -------------------------------------------


@dataclass(frozen=True)
class Tree:
    """A generated expression; `power` is the CEL binding power of its outermost operator."""

    text: str
    power: int


ATOM = 9
UNARY = 7
BINARY_POWER = {"||": 2, "&&": 3, "<": 4, "<=": 4, ">": 4, ">=": 4, "==": 4, "!=": 4}
BINARY_POWER |= {"+": 5, "-": 5, "*": 6, "/": 6}


def wrap(tree: Tree, needs: bool, extra: bool) -> str:
    return f"({tree.text})" if needs or extra else tree.text


def binary(op: str, left: Tree, right: Tree, extra: tuple[bool, bool]) -> Tree:
    # Left-associative: parenthesise a left child that binds looser, a right one that binds
    # no tighter; `extra` adds redundant parentheses so both spellings are exercised.
    power = BINARY_POWER[op]
    first = wrap(left, left.power < power, extra[0])
    return Tree(f"{first} {op} {wrap(right, right.power <= power, extra[1])}", power)


def ternary(test: Tree, yes: Tree, no: Tree) -> Tree:
    return Tree(
        f"{wrap(test, test.power <= 1, False)} ? {wrap(yes, yes.power <= 1, False)} : {no.text}", 1
    )


def unary(op: str, operand: Tree) -> Tree:
    return Tree(f"{op}{wrap(operand, operand.power < UNARY, False)}", UNARY)


leaf_numbers = st.one_of(
    st.sampled_from(SIGNALS).map(lambda name: Tree(name, ATOM)),
    st.sampled_from([0.5, 1.0, 2.0, 3.0]).map(lambda value: Tree(repr(value), ATOM)),
    st.floats(min_value=0.0, max_value=1e6).map(lambda value: Tree(repr(value), ATOM)),
)
# CEL compares whole numbers with doubles but refuses to mix them in arithmetic, so whole
# numbers appear only as operands of comparisons (hand cases cover the lenient mixing).
whole_numbers = st.integers(0, 5).map(lambda value: Tree(str(value), ATOM))
leaf_conditions = st.sampled_from(["true", "false"]).map(lambda text: Tree(text, ATOM))
NUMBER_FORMS = ("+", "-", "*", "/", "+", "*", "-x", "double", "?:")
CONDITION_FORMS = ("<", "<=", ">", ">=", "==", "!=", "&&", "||", "&&", "||", "bool==", "!", "?:")


@st.composite
def trees(draw: st.DrawFn, kind: str, depth: int) -> Tree:
    """A `kind` ("number" or "condition") expression; one in four subtrees is a leaf."""
    number = kind == "number"
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        return draw(leaf_numbers if number else leaf_conditions)
    form = draw(st.sampled_from(NUMBER_FORMS if number else CONDITION_FORMS))
    sub = trees(kind if form in ("?:", "&&", "||", "bool==", "!") else "number", depth - 1)
    if form == "?:":
        return ternary(draw(trees("condition", depth - 1)), draw(sub), draw(sub))
    if form in ("-x", "!", "double"):
        operand = draw(sub)
        return (
            Tree(f"double({operand.text})", ATOM) if form == "double" else unary(form[0], operand)
        )
    if form not in BINARY_POWER:  # bool==: compare two conditions
        form = draw(st.sampled_from(["==", "!="]))
    elif kind == "condition" and form not in ("&&", "||"):
        sub = st.one_of(sub, whole_numbers)
    return binary(form, draw(sub), draw(sub), draw(st.tuples(st.booleans(), st.booleans())))


# Small distinct values tell operator precedence apart; any float covers inf, NaN, overflow.
values = st.one_of(st.sampled_from([-2.0, -0.5, 0.0, 0.5, 1.0, 3.0]), st.floats())
rows = st.lists(st.tuples(values, values, values), min_size=1, max_size=6)


@settings(max_examples=400, deadline=None)
@given(tree=trees("condition", 5), table=rows)
def test_numpy_path_matches_cel_row_by_row(tree: Tree, table: list[tuple[float, ...]]) -> None:
    expression = compile_expression(tree.text, SIGNALS)
    assert expression.vectorized, tree.text
    columns = {name: np.array([row[i] for row in table]) for i, name in enumerate(SIGNALS)}
    result = expression.evaluate(columns, len(table))
    program = cel.compile(tree.text)
    for row, ours in zip(table, result, strict=True):
        try:
            expected = program.execute(dict(zip(SIGNALS, row, strict=True)))
        except Exception:  # CEL errors (e.g. NaN in an ordering) are skipped by design
            continue
        assert ours == expected, (tree.text, row)


def test_the_controller_does_not_load_the_cel_command_line_tool() -> None:
    # The `cel` package imports its REPL (typer, prompt_toolkit: ~15 MB) before its parser:
    # the controller imports `cel` with that module's code left to its first use.
    code = (
        "import sys, controller.control.daemon\n"
        "from controller.policy.expressions import compile_expression\n"
        "compile_expression('a > 1.0', frozenset({'a'}))\n"
        "heavy = ('prompt_toolkit', 'typer')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "import cel\n"
        "print(callable(cel.cli.main), 'prompt_toolkit' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Not loaded by the controller; still there, whole, for whoever uses it.
    assert done.stdout.split("\n")[:2] == ["[]", "True True"]


def test_a_missing_cel_library_names_its_distribution_and_the_install_command() -> None:
    code = (
        "import sys\n"
        "sys.modules['cel'] = None  # what an environment without the distribution shows\n"
        "from controller.policy.expressions import compile_expression\n"
        "compile_expression('a > 1.0', frozenset({'a'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: the CEL library that policy conditions are checked")
    assert "install the common-expression-language distribution" in last
    assert "pip install 'common-expression-language>=0.10,<0.11'" in last
    assert "cel-python" not in done.stderr
