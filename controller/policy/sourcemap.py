"""YAML text → plain Python values, remembering the line and column of every key and value. Pure."""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field

import yaml

Path = tuple[Hashable, ...]

# Plain YAML tags; anything else (`!!set`, `!!omap`, application tags) is refused so that a
# policy means the same to every YAML reader.
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# The scalars a policy means: text, numbers, booleans, null, and timestamps (a policy test's
# `start:`). SafeLoader also builds `!!binary` into bytes, which no field takes as such and
# which hides what a value says from a reviewer: refused by its tag like `!!set`.
_SCALAR_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "timestamp")
)
# YAML 1.1 (PyYAML) reads a plain `0600` as octal (384) and `1:30` in base 60 (90); YAML 1.2
# (an editor's schema check, most other readers) and people read 600 and text. Refused, so a
# number means what it shows.
_NUMBER_TAGS = frozenset(("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"))
_OTHER_BASE = re.compile(r"[-+]?0[0-7_]+|.*:.*")

# Aliases can make a small file expand into a huge value ("billion laughs"); policies are
# small, so these bounds only ever stop hostile or broken input. MAX_VALUES and MAX_DOCUMENTS
# are shared by every file of a set (a Budget), so many files cannot multiply them.
MAX_VALUES = 50_000
MAX_DEPTH = 64
MAX_DOCUMENTS = 1_000
# Nodes as YAML writes them, before aliases expand: reading one costs ~5 µs even in libyaml
# (tags are resolved in Python), so this bound keeps a set's parse near half a second.
MAX_NODES = 100_000
# A syntax error in a file up to this size is worded by PyYAML's parser (see _explained).
REPARSE_CHARS = 64 * 1024


@dataclass(slots=True)
class Budget:
    """What is left to read of one policy set: values (after alias expansion) and documents."""

    values: int = MAX_VALUES
    documents: int = MAX_DOCUMENTS
    nodes: int = MAX_NODES


class _TooManyNodesError(Exception):
    """The set's YAML holds more nodes than MAX_NODES (raised while composing)."""


class _Counting:
    """Counts the nodes a loader composes against the set's Budget: every node with an
    implicit tag passes through `resolve`, in the Python loader and in libyaml's alike."""

    budget: Budget

    def resolve(self, kind: type[yaml.Node], value: object, implicit: object) -> str:
        self.budget.nodes -= 1
        if self.budget.nodes < 0:
            raise _TooManyNodesError
        return super().resolve(kind, value, implicit)  # type: ignore[misc,no-any-return]


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A place in a file, 1-based like editors and compilers show it."""

    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Spot:
    """Where a value and the key that names it are (the same place for list items)."""

    key: Position
    value: Position


@dataclass(frozen=True, slots=True)
class SourceProblem:
    """Something wrong with the YAML itself: syntax, duplicate keys, unsupported tags."""

    position: Position
    path: Path
    message: str


@dataclass(frozen=True, slots=True)
class SourceDocument:
    """One YAML document as Python values, with the spot of every path in it."""

    value: object
    spots: Mapping[Path, Spot]
    problems: tuple[SourceProblem, ...] = ()

    def spot(self, path: Path) -> tuple[Path, Spot]:
        """The deepest recorded prefix of `path` and its spot (the root always exists)."""
        for end in range(len(path), -1, -1):
            found = self.spots.get(path[:end])
            if found is not None:
                return path[:end], found
        raise KeyError(path)  # unreachable: the root path () is always recorded


@dataclass(frozen=True, slots=True)
class SourceFile:
    """Every non-empty document of a file, and the problems that stopped parsing."""

    documents: tuple[SourceDocument, ...]
    problems: tuple[SourceProblem, ...]


# The characters YAML reads as a line break (str.splitlines knows more, e.g. form feed).
LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


class _Lines:
    """Turns PyYAML marks into positions that always fall inside the file."""

    def __init__(self, text: str) -> None:
        self.lines = LINE_BREAK.split(text)
        if len(self.lines) > 1 and not self.lines[-1]:
            self.lines.pop()  # the text after a final line break is not a line

    def position(self, line: int, column: int) -> Position:
        """From 0-based line/column; a mark past the last line moves to its end."""
        if line >= len(self.lines):
            return Position(len(self.lines), len(self.lines[-1]) + 1)
        return Position(line + 1, column + 1)

    def at_mark(self, mark: yaml.Mark | None) -> Position:
        return self.position(mark.line, mark.column) if mark is not None else Position(1, 1)

    def at_offset(self, text: str, offset: int) -> Position:
        lines = LINE_BREAK.split(text[:offset])
        return self.position(len(lines) - 1, len(lines[-1]))


class _DepthLimitedLoader(_Counting, yaml.SafeLoader):
    """Refuses nesting deeper than MAX_DEPTH while composing: PyYAML's composer recurses once
    per level, so `[[[[...` would otherwise end in a RecursionError deep inside it."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self.budget = Budget()

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(
                    None, None, f"the document nests deeper than {MAX_DEPTH} levels", mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _CountingCLoader(_Counting, yaml.CSafeLoader):
    """libyaml's loader, counting nodes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.budget = Budget()


# libyaml (bundled with PyYAML's wheels) composes ten times faster than PyYAML's own Python
# and refuses nesting past 1,000 levels itself; the Python loader is the fallback.
_LOADER: type[_DepthLimitedLoader] | type[_CountingCLoader] = (
    _CountingCLoader if yaml.__with_libyaml__ else _DepthLimitedLoader
)


def _compose(text: str, loader_class: type[_Counting], budget: Budget) -> Iterator[yaml.Node]:
    """yaml.compose_all, with the set's budget."""
    loader = loader_class(text)  # type: ignore[call-arg]
    loader.budget = budget
    try:
        while loader.check_node():  # type: ignore[attr-defined]
            yield loader.get_node()  # type: ignore[attr-defined]
    finally:
        loader.dispose()  # type: ignore[attr-defined]


def parse_yaml(text: str, budget: Budget | None = None) -> SourceFile:
    """Every non-empty document of `text`; never raises for bad input, returns problems.

    `budget` is shared by the files of one set; each call gets its own when None."""
    lines = _Lines(text)
    budget = Budget() if budget is None else budget
    documents: list[SourceDocument] = []
    try:
        for node in _compose(text, _LOADER, budget):
            if node.tag == _NULL_TAG and isinstance(node, yaml.ScalarNode) and not node.value:
                continue  # an empty document between `---` lines
            budget.documents -= 1
            if budget.documents < 0:
                problem = SourceProblem(
                    lines.at_mark(node.start_mark),
                    (),
                    f"over {MAX_DOCUMENTS} documents: a policy set holds at most that many",
                )
                return SourceFile(tuple(documents), (problem,))
            documents.append(_Converter(lines, budget).document(node))
    except yaml.MarkedYAMLError as exc:
        return SourceFile(tuple(documents), (_syntax_problem(_explained(text, exc), lines),))
    except yaml.reader.ReaderError as exc:
        message = f"YAML: character #x{exc.character:04x} is not allowed ({exc.reason})"
        problem = SourceProblem(lines.at_offset(text, exc.position), (), message)
        return SourceFile(tuple(documents), (problem,))
    except _TooManyNodesError:
        message = (
            f"the policy set's YAML holds over {MAX_NODES} nodes (keys, values, list items); "
            "policies are small: remove what is not policy"
        )
        return SourceFile(tuple(documents), (SourceProblem(Position(1, 1), (), message),))
    except RecursionError:
        problem = SourceProblem(Position(1, 1), (), "YAML nests too deeply to be a policy")
        return SourceFile(tuple(documents), (problem,))
    return SourceFile(tuple(documents), ())


def _explained(text: str, exc: yaml.MarkedYAMLError) -> yaml.MarkedYAMLError:
    """PyYAML's own parser words a syntax error better than libyaml (it names the tab that
    cannot start a token): a file of ordinary size is read again by it to say so."""
    if _LOADER is _DepthLimitedLoader or len(text) > REPARSE_CHARS:
        return exc
    try:
        for _ in _compose(text, _DepthLimitedLoader, Budget()):
            pass
    except yaml.MarkedYAMLError as worded:
        return worded
    except (yaml.YAMLError, _TooManyNodesError):
        return exc
    return exc


def _syntax_problem(exc: yaml.MarkedYAMLError, lines: _Lines) -> SourceProblem:
    problem = exc.problem or "invalid YAML"
    if exc.context and exc.context_mark is not None:
        where = lines.at_mark(exc.context_mark)
        problem += f" ({exc.context} started at line {where.line}, column {where.column})"
    elif exc.context:
        problem += f" ({exc.context})"
    return SourceProblem(lines.at_mark(exc.problem_mark), (), f"YAML syntax: {problem}")


@dataclass
class _Converter:
    """Builds Python values from a node tree, recording spots and YAML-level problems."""

    lines: _Lines
    budget: Budget
    spots: dict[Path, Spot] = field(default_factory=dict)
    problems: list[SourceProblem] = field(default_factory=list)
    over_budget: bool = False
    active: set[int] = field(default_factory=set)
    scalars: yaml.SafeLoader = field(default_factory=lambda: yaml.SafeLoader(""))

    def document(self, node: yaml.Node) -> SourceDocument:
        start = self.lines.at_mark(node.start_mark)
        self.spots[()] = Spot(start, start)
        value = self.value(node, ())
        return SourceDocument(value, self.spots, tuple(self.problems))

    def problem(self, node: yaml.Node, path: Path, message: str) -> None:
        self.problems.append(SourceProblem(self.lines.at_mark(node.start_mark), path, message))

    def value(self, node: yaml.Node, path: Path) -> object:
        self.budget.values -= 1
        if self.budget.values < 0:
            if not self.over_budget:  # once per document, in every document past the bound
                self.over_budget = True
                self.problem(node, path, f"the policy set expands to over {MAX_VALUES} values")
            return None
        if len(path) > MAX_DEPTH:
            self.problem(node, path, f"the document nests deeper than {MAX_DEPTH} levels")
            return None
        if id(node) in self.active:
            self.problem(node, path, "an alias refers to a value that contains it")
            return None
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path)
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode) and node.tag == _MAP_TAG:
                return self.mapping(node, path)
            if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ_TAG:
                return self.sequence(node, path)
        finally:
            self.active.discard(id(node))
        self.problem(node, path, f"YAML tag {node.tag!r} is not supported here")
        return None

    def scalar(self, node: yaml.Node, path: Path) -> object:
        if node.tag.startswith("tag:yaml.org,2002:") and node.tag not in _SCALAR_TAGS:
            self.problem(
                node,
                path,
                f"YAML tag {node.tag!r} is not supported here: a policy takes text, numbers, "
                "booleans and null; write the value itself, without the tag",
            )
            return None
        try:
            value = self.scalars.construct_object(node, deep=True)
            if node.tag in _NUMBER_TAGS and _OTHER_BASE.fullmatch(node.value):
                self.problem(node, path, _other_base(node.value, value))
                return None
            return value
        except yaml.YAMLError as exc:
            reason = getattr(exc, "problem", None) or str(exc)
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            reason = str(exc) or type(exc).__name__
        self.problem(node, path, f"cannot read this value: {reason}")
        return None

    def sequence(self, node: yaml.SequenceNode, path: Path) -> list[object]:
        items: list[object] = []
        for index, child in enumerate(node.value):
            if self.budget.values < 0:
                break  # over the bound (reported once): the rest cannot matter
            here = self.lines.at_mark(child.start_mark)
            self.spots[(*path, index)] = Spot(here, here)
            items.append(self.value(child, (*path, index)))
        return items

    def mapping(self, node: yaml.MappingNode, path: Path) -> dict[Hashable, object]:
        result: dict[Hashable, object] = {}
        merged_spots: dict[Path, Spot] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                self.merge(value_node, path, result, merged_spots)
        first_seen: dict[Hashable, Position] = {}
        for key_node, value_node in node.value:
            key = None if key_node.tag == _MERGE_TAG else self.key(key_node, path)
            if key is None:
                continue
            where = self.lines.at_mark(key_node.start_mark)
            if key in first_seen:
                first = first_seen[key]
                self.problem(
                    key_node,
                    (*path, key),
                    f"duplicate key {key!r} (first at line {first.line}, column {first.column})",
                )
                continue
            first_seen[key] = where
            self.spots[(*path, key)] = Spot(where, self.lines.at_mark(value_node.start_mark))
            result[key] = self.value(value_node, (*path, key))
        # A merged key's spots count only where the mapping does not write that key itself;
        # one pass over them keeps merges linear (no search per overridden key).
        depth = len(path)
        self.spots.update(
            (spot_path, spot)
            for spot_path, spot in merged_spots.items()
            if spot_path[depth] not in first_seen
        )
        return result

    def key(self, node: yaml.Node, path: Path) -> Hashable | None:
        if not isinstance(node, yaml.ScalarNode):
            self.problem(node, path, "a key must be plain text, not a list or a mapping")
            return None
        key = self.scalar(node, path)
        if key is None:
            self.problem(node, path, "a key cannot be empty (null)")
            return None
        return key if isinstance(key, Hashable) else str(key)

    def merge(
        self, node: yaml.Node, path: Path, into: dict[Hashable, object], spots: dict[Path, Spot]
    ) -> None:
        """`<<: *defaults`: keys written in the mapping win, then earlier merged mappings.

        The merged values' spots go to `spots`, for `mapping` to keep those not overridden."""
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        mine, self.spots = self.spots, spots
        try:
            for source in reversed(sources):
                merged = self.value(source, path)
                if isinstance(merged, dict):
                    into.update(merged)
                else:
                    self.problem(source, path, "`<<` merges only mappings")
        finally:
            self.spots = mine


def _other_base(text: str, value: object) -> str:
    if ":" in text:
        read = f"YAML reads {text} as {value} (base 60), other YAML readers as the text {text!r}"
    else:
        shown = text[0] * (text[0] in "+-") + (text.lstrip("+-").lstrip("0_") or "0")
        read = f"YAML reads {text} as {value} (octal, for its leading 0), others as {shown}"
    return f"{read}: write the number in decimal, without a leading 0 (a duration as 1m30s)"
