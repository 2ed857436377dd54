"""CEL conditions over float signals: validated once by the CEL library, evaluated with numpy.

Pure: no I/O. `compile_expression` checks the text with the real CEL parser, then compiles the
numeric subset (literals, signals, arithmetic, comparisons, `!`, `&&`, `||`, `?:`, `double()`)
into a closure over numpy arrays so one call decides a condition for every tenant at once.
Valid CEL outside that subset falls back to the CEL program, one row at a time.
"""

from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import operator
import re
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Bools = npt.NDArray[np.bool_]
# A sub-expression's value: a numpy scalar (constants, scalar signals) or a 1-d array.
_Value = Any
_Env = Mapping[str, _Value]
_Fn = Callable[[_Env], _Value]
_Kind = Literal["double", "int", "bool"]

_EXAMPLE = "`gpu_util > 0.9 && spend > 3.0 * usual`"
# A condition is a line or two; these bounds stop hostile text before any parser recurses on
# it. Depth counts every operator on the way down: `!!x` is 3 deep, and a chain of N `&&`
# terms is N deep (the parser nests them).
MAX_EXPRESSION_CHARS = 4096
MAX_EXPRESSION_DEPTH = 100


class ExpressionError(ValueError):
    """A condition that cannot be compiled or evaluated; the message names the text and the fix."""


class _OutsideSubsetError(Exception):
    """Valid CEL outside the numeric subset: evaluate it row by row with the CEL program."""


@dataclass(frozen=True)
class Expression:
    """A compiled condition. Call `evaluate` once per tick with every tenant's signals."""

    text: str
    names: frozenset[str]
    vectorized: bool
    _vector: _Fn | None = field(repr=False, compare=False)
    _program: Any = field(repr=False, compare=False)

    def evaluate(self, env: Mapping[str, float | np.ndarray], size: int) -> Bools:
        """True/false per row. Scalars apply to every row; arrays must have `size` rows.

        Float division by zero gives ±inf/NaN as in CEL, and comparisons with NaN are false.
        On the per-row fallback a row whose evaluation fails in CEL is false.
        """
        columns = self._columns(env, size)
        if self._vector is None:
            return self._rows(columns, size)
        with np.errstate(all="ignore"):
            result = self._vector(columns)
        return np.array(np.broadcast_to(result, (size,)), dtype=np.bool_)

    def evaluate_one(self, env: Mapping[str, float]) -> bool:
        """The condition for one set of signal values."""
        return bool(self.evaluate(env, 1)[0])

    def _columns(self, env: Mapping[str, float | np.ndarray], size: int) -> dict[str, _Value]:
        columns: dict[str, _Value] = {}
        for name in self.names:
            if name not in env:
                raise ExpressionError(
                    f"no value for signal {name!r} in {self.text!r}: pass every name in .names"
                )
            value = np.asarray(env[name], dtype=np.float64)
            if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != size):
                raise ExpressionError(
                    f"signal {name!r} in {self.text!r} has shape {value.shape}, "
                    f"expected a scalar or {size} rows"
                )
            columns[name] = value if value.ndim else value[()]
        return columns

    def _rows(self, columns: Mapping[str, _Value], size: int) -> Bools:
        out = np.zeros(size, dtype=np.bool_)
        for row in range(size):
            bound = {n: float(v[row] if np.ndim(v) else v) for n, v in columns.items()}
            out[row] = _execute(self._program, bound) is True
        return out


def compile_expression(text: str, known: Collection[str]) -> Expression:
    """Check `text` against CEL and the declared signal names, and compile it once."""
    if not text.strip():
        raise ExpressionError(
            f"a condition cannot be empty: write a CEL expression like {_EXAMPLE}"
        )
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(
            f"a condition is at most {MAX_EXPRESSION_CHARS} characters, this one has "
            f"{len(text)}: split it into signals (recording rules) and shorter conditions"
        )
    _check_brackets(text)
    program = _cel_compile(text)
    names = frozenset(program.variables()) - _comprehension_variables(text)
    _check_names(text, names, known)
    try:
        kind, vector = _Compiler(text, names).compile(_Parser(text).parse())
    except _OutsideSubsetError:
        _check_fallback_result(text, program, names)
        return Expression(text, names, False, None, program)
    if kind != "bool":
        raise _not_a_condition(text)
    return Expression(text, names, True, vector, program)


def _too_deep(text: str) -> ExpressionError:
    return ExpressionError(
        f"condition {text[:80]!r}... nests deeper than {MAX_EXPRESSION_DEPTH} levels "
        "(brackets, ! and - signs, and each term of a && or || chain count one): "
        "write a flatter condition"
    )


def _check_brackets(text: str) -> None:
    """Bracket nesting, in one pass and before the CEL parser sees the text."""
    depth = 0
    for char in text:
        depth += (char in "([{") - (char in ")]}")
        if depth > MAX_EXPRESSION_DEPTH:
            raise _too_deep(text)


# --- validation with the CEL library ---------------------------------------------------------

_CEL_POSITION = re.compile(r"ERROR: <input>:(\d+):(\d+): ")


# The distribution that provides `import cel` (cel-python provides `celpy`, another library).
CEL_DISTRIBUTION = "common-expression-language"


def _cel() -> ModuleType:
    """The CEL library: `import cel`, from the common-expression-language distribution."""
    if "cel" not in sys.modules:
        _defer_cel_cli()
    try:
        import cel
    except ImportError as exc:
        raise ImportError(
            f"the CEL library that policy conditions are checked with is missing ({exc}): "
            f"install the {CEL_DISTRIBUTION} distribution, "
            f"pip install '{CEL_DISTRIBUTION}>=0.10,<0.11' (or reinstall governor)"
        ) from exc
    return cel


def _defer_cel_cli() -> None:
    """Put the `cel` package's REPL module (`cel.cli`) in place unrun before `import cel`: the
    package's `__init__` imports it first (typer, prompt_toolkit, rich, pygments: ~15 MB
    resident and 0.5 s in every controller, for a command-line tool it never runs). Found by
    the package's own finder; its code runs when one of its names is first asked for."""
    package = importlib.util.find_spec("cel")  # a top-level spec: nothing imported yet
    if package is None or not package.submodule_search_locations:
        return  # `import cel` fails next, with the message that names the distribution
    spec = importlib.machinery.PathFinder.find_spec("cel.cli", package.submodule_search_locations)
    if spec is None or spec.loader is None:
        return  # a version without the REPL module: nothing to defer
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _RunOnFirstUse
    sys.modules["cel.cli"] = module


class _RunOnFirstUse(ModuleType):
    """A module whose code runs when a name it does not have yet is first asked for.
    (importlib's LazyLoader runs it on any attribute, and the import system reads
    `__spec__` of every module it imports, so it would run at `import cel` itself.)"""

    def __getattr__(self, name: str) -> Any:
        object.__setattr__(self, "__class__", ModuleType)  # a plain module again: runs once
        spec = self.__spec__
        if spec is None or spec.loader is None:  # cannot be: it was made from a found spec
            raise AttributeError(name)
        spec.loader.exec_module(self)
        return getattr(self, name)


def _cel_compile(text: str) -> Any:
    try:
        return _cel().compile(text)
    except ValueError as exc:
        message = str(exc)
        found = _CEL_POSITION.search(message)
        where, detail = "", message
        if found:
            where = f" at line {found.group(1)}, column {found.group(2)}"
            detail = message[found.end() :]
        raise ExpressionError(
            f"condition {text!r} is not valid CEL{where}: {detail}\n{_syntax_hint(text)}"
        ) from None


def _syntax_hint(text: str) -> str:
    if re.search(r"\b(and|or|not)\b", text):
        return "fix: CEL writes and/or/not as &&, || and !"
    if re.search(r"(?<![=!<>])=(?!=)", text):
        return "fix: compare with == (a single = is not an operator in CEL)"
    return f"fix: write comparisons of signals and numbers joined by && or ||, e.g. {_EXAMPLE}"


_COMPREHENSION = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")


def _comprehension_variables(text: str) -> frozenset[str]:
    """Macro loop variables (`[..].exists(v, ...)`), which CEL lists among the variables."""
    return frozenset(_COMPREHENSION.findall(text))


def _check_names(text: str, names: frozenset[str], known: Collection[str]) -> None:
    for name in sorted(names):
        if name in known:
            continue
        declared = ", ".join(sorted(known)) or "none (declare signals under `signals:`)"
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ExpressionError(
            f"unknown signal {name!r} in {text!r}; declared signals: {declared}{hint}"
        )


def _check_fallback_result(text: str, program: Any, names: frozenset[str]) -> None:
    # The subset knows its result type; for other CEL, one trial evaluation catches `size(x)`.
    result = _execute(program, dict.fromkeys(names, 1.0))
    if result is not None and not isinstance(result, bool):
        raise _not_a_condition(text)


def _execute(program: Any, env: dict[str, float]) -> object:
    try:
        return program.execute(env)
    except Exception:  # CEL reports bad operands and missing overloads as various errors
        return None


def _not_a_condition(text: str) -> ExpressionError:
    operand = text.strip()
    if not re.fullmatch(r"[\w.]+", operand):
        operand = f"({operand})"
    return ExpressionError(
        f"condition {text!r} must be a condition that is true or false, not a value: "
        f"compare it, e.g. `{operand} > 0.5`"
    )


# --- the numeric subset: tokens and a Pratt parser --------------------------------------------

_TOKEN = re.compile(
    r"""(?P<space>\s+|//[^\n]*)
    |(?P<double>(?:\d+\.\d+|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)
    |(?P<uint>(?:0[xX][0-9a-fA-F]+|\d+)[uU])
    |(?P<int>0[xX][0-9a-fA-F]+|\d+)
    |(?P<name>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<op>&&|\|\||<=|>=|==|!=|[-+*/%<>!?:(),])""",
    re.VERBOSE,
)
_RELATIONS = ("<", "<=", ">", ">=", "==", "!=")
# Binding powers follow the CEL grammar: ?: < || < && < relations < + - < * / % < unary.
_INFIX = {"||": 2, "&&": 3, **dict.fromkeys(_RELATIONS, 4), "+": 5, "-": 5, "*": 6, "/": 6, "%": 6}
_PREFIX_POWER = 7


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    pos: int


@dataclass(frozen=True)
class _Node:
    op: str  # "double", "int", "bool", "name", "call", a unary "-x"/"!x", an infix op, or "?:"
    pos: int
    args: tuple[_Node, ...] = ()
    value: float | int | bool | str = 0.0
    depth: int = 1  # of the tree below: the compiler and the closures recurse this deep


def _tokenize(text: str) -> list[_Token]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.lastgroup == "uint":
            raise _OutsideSubsetError  # strings, bytes, lists, maps, members, uints
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append(_Token(kind, match.group(), pos))
        pos = match.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.at = 0
        self.level = 0  # nested expression() calls

    def node(self, op: str, pos: int, args: tuple[_Node, ...], value: str = "") -> _Node:
        """An operator node; refused past MAX_EXPRESSION_DEPTH (before anything recurses)."""
        depth = 1 + max(arg.depth for arg in args)
        if depth > MAX_EXPRESSION_DEPTH:
            raise _too_deep(self.text)
        return _Node(op, pos, args, value or 0.0, depth)

    def parse(self) -> _Node:
        node = self.expression()
        self.expect("end")
        return node

    def next(self) -> _Token:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def peek(self) -> _Token:
        return self.tokens[self.at]

    def expect(self, text: str) -> None:
        token = self.next()
        if (token.kind if text == "end" else token.text) != text:
            raise _OutsideSubsetError  # CEL accepted it, so it is a construct we do not parse

    def expression(self, power: int = 0) -> _Node:
        self.level += 1
        if self.level > MAX_EXPRESSION_DEPTH:
            raise _too_deep(self.text)
        try:
            return self.operators(self.prefix(), power)
        finally:
            self.level -= 1

    def operators(self, left: _Node, power: int) -> _Node:
        while True:
            token = self.peek()
            if token.text == "?" and power < 1:
                self.next()
                middle = self.expression()
                self.expect(":")
                left = self.node("?:", token.pos, (left, middle, self.expression(0)))
                continue
            bound = _INFIX.get(token.text) if token.kind == "op" else None
            if bound is None or bound <= power:
                return left
            self.next()
            left = self.node(token.text, token.pos, (left, self.expression(bound)))

    def prefix(self) -> _Node:
        token = self.next()
        if token.text in ("-", "!") and token.kind == "op":
            return self.node(token.text + "x", token.pos, (self.expression(_PREFIX_POWER),))
        if token.text == "(":
            node = self.expression()
            self.expect(")")
            return node
        if token.kind == "double":
            return _Node("double", token.pos, value=float(token.text))
        if token.kind == "int":
            base = 16 if token.text[:2] in ("0x", "0X") else 10
            return _Node("int", token.pos, value=int(token.text, base))
        if token.kind == "name":
            return self.name(token)
        raise _OutsideSubsetError

    def name(self, token: _Token) -> _Node:
        if token.text in ("true", "false"):
            return _Node("bool", token.pos, value=token.text == "true")
        if self.peek().text != "(":
            return _Node("name", token.pos, value=token.text)
        if token.text != "double":
            raise _OutsideSubsetError  # size(), int(), has(), matches() ...
        self.next()
        argument = self.expression()
        self.expect(")")
        return self.node("call", token.pos, (argument,), token.text)


# --- the numeric subset: type check and compile to numpy --------------------------------------

_UFUNCS: dict[str, Callable[..., _Value]] = {
    "+": np.add,
    "-": np.subtract,
    "*": np.multiply,
    "/": np.divide,
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
    "==": np.equal,
    "!=": np.not_equal,
    "&&": np.logical_and,
    "||": np.logical_or,
    "%": np.fmod,  # only for a rejected `double % double`: compiling raises before it runs
}
_INT64 = range(-(2**63), 2**63)
_EXACT: dict[str, Callable[[int, int], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass(frozen=True)
class _Typed:
    kind: _Kind
    fn: _Fn
    whole: int | None = None  # the exact value of a whole-number (CEL int) constant


def _constant(kind: _Kind, value: float | bool) -> _Typed:
    constant = np.bool_(value) if kind == "bool" else np.float64(value)
    whole = int(value) if kind == "int" else None
    return _Typed(kind, lambda env: constant, whole)


def _fold_int(op: str, left: int, right: int) -> _Typed:
    """Whole-number constants follow CEL int64 rules: truncating / and %, errors on overflow."""
    if op in _RELATIONS:
        return _constant("bool", _EXACT[op](left, right))
    if op in ("/", "%") and right == 0:
        raise _OutsideSubsetError  # CEL raises "division by zero"; let it say so per row
    quotient = abs(left) // abs(right) * (1 if (left < 0) == (right < 0) else -1) if right else 0
    value = {
        "+": left + right,
        "-": left - right,
        "*": left * right,
        "/": quotient,
        "%": left - right * quotient,
    }[op]
    if value not in _INT64:
        raise _OutsideSubsetError  # CEL raises on int64 overflow
    return _constant("int", value)


class _Compiler:
    """Types each node and builds numpy closures; reports misuse with its column.

    Deliberate leniency: a whole-number literal next to a decimal value is read as a decimal
    (`3 * usual`, `y - 1`), which plain CEL rejects on every evaluation because it never
    converts int to double. Whole numbers among themselves keep CEL's int rules (7 / 2 == 3).
    """

    def __init__(self, text: str, names: frozenset[str]) -> None:
        self.text = text
        self.names = names
        self.problems: list[str] = []

    def compile(self, root: _Node) -> tuple[_Kind, _Fn]:
        typed = self.node(root)
        if typed.kind == "bool" and self.problems:
            raise ExpressionError(self.problems[0])
        return typed.kind, typed.fn

    def problem(self, node: _Node, message: str) -> None:
        self.problems.append(f"condition {self.text!r}, column {node.pos + 1}: {message}")

    def node(self, node: _Node) -> _Typed:
        if node.op in ("double", "int", "bool"):
            return _constant(node.op, node.value)  # type: ignore[arg-type]
        if node.op == "name":
            name = str(node.value)
            if name not in self.names:
                raise _OutsideSubsetError  # `null` and other words CEL does not read as a signal
            return _Typed("double", lambda env: env[name])
        if node.op == "call":
            argument = self.node(node.args[0])
            if argument.kind == "bool":
                raise _OutsideSubsetError  # double(true) has no overload; CEL reports it per row
            return _Typed("double", argument.fn)
        if node.op == "?:":
            return self.ternary(node)
        if len(node.args) == 1:
            return self.unary(node)
        return self.binary(node)

    def unary(self, node: _Node) -> _Typed:
        operand = self.node(node.args[0])
        fn = operand.fn
        if node.op == "!x":
            if operand.kind != "bool":
                self.problem(node, "! negates a condition, not a number: write !(x > 1.0)")
            return _Typed("bool", lambda env: np.logical_not(fn(env)))
        if operand.kind == "bool":
            self.problem(node, "unary - needs a number, not true/false")
        if operand.whole is not None:
            return _fold_int("-", 0, operand.whole)
        return _Typed(operand.kind, lambda env: np.negative(fn(env)))

    def ternary(self, node: _Node) -> _Typed:
        test, yes, no = (self.node(arg) for arg in node.args)
        if test.kind != "bool":
            self.problem(node, "the part before ? must be a condition that is true or false")
        kinds = {yes.kind, no.kind}
        if len(kinds) > 1 and "bool" in kinds:
            raise _OutsideSubsetError  # the result type depends on the row; CEL decides per row
        kind: _Kind = yes.kind if len(kinds) == 1 else "double"
        test_fn, yes_fn, no_fn = test.fn, yes.fn, no.fn
        return _Typed(kind, lambda env: np.where(test_fn(env), yes_fn(env), no_fn(env)))

    def binary(self, node: _Node) -> _Typed:
        left, right = (self.node(arg) for arg in node.args)
        if left.whole is not None and right.whole is not None:
            return _fold_int(node.op, left.whole, right.whole)
        kind = self.binary_kind(node, left.kind, right.kind)
        ufunc, left_fn, right_fn = _UFUNCS[node.op], left.fn, right.fn
        return _Typed(kind, lambda env: ufunc(left_fn(env), right_fn(env)))

    def binary_kind(self, node: _Node, left: _Kind, right: _Kind) -> _Kind:
        op, kinds = node.op, {left, right}
        if op in ("&&", "||"):
            if kinds != {"bool"}:
                self.problem(node, f"{op} joins conditions; compare the number first, e.g. x > 1.0")
            return "bool"
        if op in _RELATIONS:
            if "bool" in kinds and kinds != {"bool"}:
                self.problem(node, f"{op} compares a number with true/false")
            return "bool"
        if "bool" in kinds:
            self.problem(node, f"{op} needs numbers, not true/false")
        elif op == "%":
            self.problem(
                node,
                "CEL defines % only for whole numbers and signals are decimal numbers: "
                "remove the % (e.g. compare x - y * 2.0 instead)",
            )
        elif kinds == {"int"}:
            raise _OutsideSubsetError  # non-constant ints (from ?:) keep CEL's int rules
        return "double"
