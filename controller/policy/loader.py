"""Load a directory of policy files into a PolicySet; every error names file:line:column. Pure
but for reading the files."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import ValidationError

from controller.errors import PolicyError
from controller.policy.diagnostics import diagnose, format_path, located
from controller.policy.documents import Document, DocumentFile
from controller.policy.policyset import PolicySet, PolicySetError
from controller.policy.sourcemap import Position, SourceDocument, SourceProblem, parse_yaml

SUFFIXES = (".yaml", ".yml")
TEST_SUFFIXES = ("_test.yaml", "_test.yml")  # policy tests live beside the policies


@dataclass(frozen=True, slots=True)
class LocatedError:
    """One problem in one file, at a 1-based line and column, with the field path."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        # Continuation lines (a CEL caret diagram) are indented so each error starts a line.
        message = self.message.replace("\n", "\n    ")
        return f"{self.file}:{self.line}:{self.column}: {message}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class PolicyLoadError(PolicyError):
    """The policy files have errors; `errors` holds every one of them, located."""

    def __init__(self, errors: Sequence[LocatedError]) -> None:
        super().__init__("\n".join(str(error) for error in errors))
        self.errors = tuple(errors)


@dataclass(frozen=True, slots=True)
class _Loaded:
    """A document that validated, with the file and source map it came from."""

    file: str
    source: SourceDocument
    document: Document


def policy_files(directory: Path) -> list[Path]:
    """The policy files of `directory`: `*.yaml`/`*.yml`, sorted, without tests or dotfiles.

    Raises PolicyError when the directory is missing or is not a directory.
    """
    if not directory.is_dir():
        what = "does not exist" if not directory.exists() else "is not a directory"
        raise PolicyError(
            f"policy directory {str(directory)!r} {what}: give the directory that holds the "
            "policy YAML files (the controller reads GOVERNOR_CONTROLLER__POLICY_DIR)"
        )
    return sorted(
        path
        for path in directory.iterdir()
        if path.name.endswith(SUFFIXES)
        and not path.name.endswith(TEST_SUFFIXES)
        and not path.name.startswith(".")
        and path.is_file()
    )


def check_directory(directory: Path) -> tuple[PolicySet | None, list[LocatedError]]:
    """Load every policy file of `directory`; the set, or None and every error found."""
    return check_files(policy_files(directory), directory)


def load_directory(directory: Path) -> PolicySet:
    """Load every policy file of `directory`, or raise PolicyLoadError listing every error."""
    policies, errors = check_directory(directory)
    if policies is None:
        raise PolicyLoadError(errors)
    return policies


def check_files(files: Sequence[Path], root: Path) -> tuple[PolicySet | None, list[LocatedError]]:
    """Load `files` (in this order) as one set; its version hashes their names below `root`."""
    digest = hashlib.sha256()
    errors: list[LocatedError] = []
    loaded: list[_Loaded] = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            errors.append(LocatedError(str(path), 1, 1, "", f"cannot read the file: {exc}"))
            continue
        digest.update(_relative_name(path, root).encode() + b"\0" + data + b"\0")
        loaded += _load_file(str(path), data, errors)
    if errors:
        return None, errors
    try:
        policies = PolicySet.from_documents([d.document for d in loaded], digest.hexdigest()[:12])
    except PolicySetError as exc:
        for problem in exc.problems:
            origin = loaded[problem.document]
            errors.append(_locate(origin.file, origin.source, problem.path, problem.message))
        return None, errors
    return policies, []


def _relative_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _load_file(file: str, data: bytes, errors: list[LocatedError]) -> list[_Loaded]:
    """The documents of one file that validate; the others add to `errors`."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        errors.append(LocatedError(file, line, column, "", "the file is not UTF-8 text"))
        return []
    source = parse_yaml(text)
    found = [_from_problem(file, problem) for problem in source.problems]
    out: list[_Loaded] = []
    for document in source.documents:
        found += (_from_problem(file, problem) for problem in document.problems)
        try:
            parsed = DocumentFile(document=document.value).document
        except ValidationError as exc:
            found += _validation_errors(file, document, exc)
            continue
        if not document.problems:
            out.append(_Loaded(file, document, parsed))
    errors += sorted(found, key=lambda error: (error.line, error.column))
    return out


def _validation_errors(
    file: str, document: SourceDocument, exc: ValidationError
) -> list[LocatedError]:
    # A value YAML could not read is already reported; pydantic would only add a vaguer twin.
    unreadable = [problem.path for problem in document.problems if problem.path]
    out: list[LocatedError] = []
    for error in exc.errors():
        diagnosis = diagnose(error)
        if any(diagnosis.path[: len(p)] == p for p in unreadable):
            continue
        found, spot = document.spot(diagnosis.path)
        position = spot.key if diagnosis.at_key and found == diagnosis.path else spot.value
        out.append(_error(file, position, format_path(diagnosis.path), diagnosis.message))
    return out


def _locate(
    file: str, source: SourceDocument, path: tuple[str | int, ...], message: str
) -> LocatedError:
    _, spot = source.spot(path)
    return _error(file, spot.value, format_path(path), located(path, message))


def _from_problem(file: str, problem: SourceProblem) -> LocatedError:
    return _error(file, problem.position, format_path(problem.path), problem.message)


def _error(file: str, position: Position, path: str, message: str) -> LocatedError:
    return LocatedError(file, position.line, position.column, path, message)
