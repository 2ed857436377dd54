"""Load a directory of policy files into a PolicySet; every error names file:line:column. Pure
but for reading the files."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import ValidationError

from controller.errors import PolicyError
from controller.policy.diagnostics import diagnose, format_path, located
from controller.policy.documents import Document, DocumentFile, Limits
from controller.policy.policyset import PolicySet, PolicySetError, SetProblem
from controller.policy.sourcemap import (
    Budget,
    Position,
    SourceDocument,
    SourceProblem,
    parse_yaml,
)

SUFFIXES = (".yaml", ".yml")
TEST_SUFFIXES = ("_test.yaml", "_test.yml")  # policy tests live beside the policies
# Policies are a few kilobytes; these bounds only ever stop hostile or broken input (a file
# that grew without end, a directory filled by mistake) before it is read whole. Reading YAML
# costs about 5 µs per node, so 512 KiB (at most ~250k nodes) loads in about a second.
MAX_FILE_BYTES = 256 << 10
MAX_SET_BYTES = 512 << 10
MAX_FILES = 500


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
class Sources:
    """The bytes of a set's files as read once (name, data), and the files that could not be
    read; hot reload fingerprints exactly what it then checks."""

    root: Path
    files: tuple[tuple[Path, bytes], ...]
    errors: tuple[LocatedError, ...]

    def fingerprint(self) -> str:
        """A hash of every file's name and bytes, and of every read error."""
        digest = hashlib.sha256()
        for path, data in self.files:
            digest.update(_relative_name(path, self.root).encode() + b"\0" + data + b"\0")
        for error in self.errors:
            digest.update(str(error).encode() + b"\0")
        return digest.hexdigest()


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
    try:
        entries = list(directory.iterdir())
    except OSError as exc:
        raise PolicyError(f"cannot list policy directory {str(directory)!r}: {exc}") from None
    found = sorted(path for path in entries if _is_policy_file(path))
    if len(found) > MAX_FILES:
        raise PolicyError(
            f"policy directory {str(directory)!r} holds {len(found)} policy files, over the "
            f"{MAX_FILES} a set may have: remove the files that are not policies"
        )
    return found


def _is_policy_file(path: Path) -> bool:
    """A policy by its name; anything but a dangling link (a ConfigMap update leaves one for
    a moment) is read, so a FIFO, a directory, a link out or a link loop is refused, not
    skipped: skipped, the policy its name stands for vanished from the set unreported."""
    # By the name in any case: `surge.YAML` skipped was a policy never in force, unreported;
    # read, it is refused with the rename (see `_read`).
    name = path.name.lower()
    if not name.endswith(SUFFIXES) or name.endswith(TEST_SUFFIXES):
        return False
    return not path.name.startswith(".") and (path.exists() or _loops(path))


def _loops(path: Path) -> bool:
    """A symbolic link that leads back to itself: `exists()` says False as for a dangling
    link, but no update ever completes it; skipped, its policies vanished unreported."""
    try:
        path.stat()
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def check_directory(
    directory: Path, *, complete: bool = False
) -> tuple[PolicySet | None, list[LocatedError]]:
    """Load every policy file of `directory`; the set, or None and every error found.

    `complete`: as in `check_files`."""
    return check_files(policy_files(directory), directory, complete=complete)


def load_directory(directory: Path, *, complete: bool = False) -> PolicySet:
    """Load every policy file of `directory`, or raise PolicyLoadError listing every error."""
    policies, errors = check_directory(directory, complete=complete)
    if policies is None:
        raise PolicyLoadError(errors)
    return policies


def check_files(
    files: Sequence[Path], root: Path, *, complete: bool = False
) -> tuple[PolicySet | None, list[LocatedError]]:
    """Load `files` (in this order) as one set; its version hashes their names below `root`.

    `complete`: the set is what the controller runs (`governor run`, hot reload, `policy
    lint`), so it must hold a Limits and a Plan; tools that read a few files need not."""
    return check_sources(read_sources(files, root), complete=complete)


def read_sources(files: Sequence[Path], root: Path) -> Sources:
    """Read each file once, refusing symbolic links that leave `root` and oversized files."""
    read: list[tuple[Path, bytes]] = []
    errors: list[LocatedError] = []
    total = 0
    for path in files:
        try:
            data = _read(path, root, MAX_SET_BYTES - total)
        except PolicyError as exc:
            errors.append(LocatedError(str(path), 1, 1, "", str(exc)))
            continue
        total += len(data)
        read.append((path, data))
    return Sources(root, tuple(read), tuple(errors))


def check_sources(
    sources: Sources, *, complete: bool = False
) -> tuple[PolicySet | None, list[LocatedError]]:
    """Validate what `read_sources` read as one set (see `check_files`)."""
    errors = list(sources.errors)
    loaded: list[_Loaded] = []
    budget = Budget()  # shared: many files cannot multiply the alias-expansion bound
    for path, data in sources.files:
        try:
            loaded += _load_file(str(path), data, errors, budget)
        except Exception as exc:  # a guard the loader lacks must still name the file
            message = f"the loader failed on this file ({type(exc).__name__}: {exc})"
            errors.append(LocatedError(str(path), 1, 1, "", f"{message}: please report it"))
    if errors:
        return None, errors
    version = sources.fingerprint()[:12]
    try:
        policies = PolicySet.from_documents([d.document for d in loaded], version)
    except PolicySetError as exc:
        errors += (_located_problem(loaded, problem) for problem in exc.problems)
        return None, errors
    if complete:
        errors = _incomplete(policies, sources.root)
    return (None, errors) if errors else (policies, [])


def _incomplete(policies: PolicySet, root: Path) -> list[LocatedError]:
    """A set without Limits or Plan is a directory emptied or half-synced, not a policy."""
    missing = []
    if not any(isinstance(document, Limits) for document in policies.documents):
        missing.append("`kind: Limits` document (global limits and default_plan)")
    if not policies.plans:
        missing.append("`kind: Plan` document")
    return [
        LocatedError(
            str(root),
            1,
            1,
            "",
            f"the policy set has no {what}: every set needs one; a directory emptied or "
            "half-written by a failed sync is refused, never applied",
        )
        for what in missing
    ]


def read_file(path: Path, root: Path) -> bytes:
    """The bytes of one file of `root` under the same bounds as a policy file (PolicyError)."""
    return _read(path, root, MAX_FILE_BYTES)


def name_case_problem(name: str) -> str | None:
    """Why a file named .YAML/.Yml (any capitals) cannot be used; None when its suffix is
    lower case. Read by its name in any case, so that it is refused with the rename, not
    skipped: skipped, a policy or a policy test was never in force, unreported."""
    if name.endswith(SUFFIXES):
        return None
    stem, suffix = name.rsplit(".", 1)
    return (
        f"the file name ends in '.{suffix}', not in lower case: policy files end in .yaml "
        f"or .yml; rename it to {stem}.{suffix.lower()}"
    )


def _read(path: Path, root: Path, room: int) -> bytes:
    """The bytes of one policy file; PolicyError says why it cannot be used."""
    if (problem := name_case_problem(path.name)) is not None:
        raise PolicyError(problem)
    if _loops(path):
        raise PolicyError(
            "the file is a symbolic link that leads back to itself (a link loop): point it "
            "at a policy file, or remove it"
        )
    try:
        if path.is_symlink() and not path.resolve(strict=True).is_relative_to(root.resolve()):
            raise PolicyError(
                f"the file is a symbolic link to {str(path.resolve())!r}, outside the policy "
                "directory: copy the file into the directory instead"
            )
        if path.is_dir():
            raise PolicyError(
                "the file is a directory: policies are plain files and subdirectories are not "
                "read; put the policy file back, or rename the directory (no .yaml/.yml)"
            )
        if not path.is_file():  # opening a FIFO would wait for a writer
            raise PolicyError(_not_regular(path))
        with path.open("rb") as handle:
            data = handle.read(min(MAX_FILE_BYTES, room) + 1)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop (Python 3.11)
        raise PolicyError(f"cannot read the file: {exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise PolicyError(
            f"the file is over {MAX_FILE_BYTES} bytes, the most a policy file may hold: "
            "split it or remove what is not policy"
        )
    if len(data) > room:
        raise PolicyError(
            f"the policy set is over {MAX_SET_BYTES} bytes with this file, the most a set "
            "may hold: remove files that are not policies"
        )
    return data


def _not_regular(path: Path) -> str:
    if not os.path.lexists(path):
        # Listed, then gone: an editor's save renames over it, a sync deletes it. Named so,
        # not as a FIFO; the reload reads the directory again before it reports anything.
        return (
            "the file was removed or renamed while the set was read: if that was meant, "
            "nothing to do; read the directory again"
        )
    return "the file is not a regular file (a FIFO or a device): policies are plain files"


def _relative_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _load_file(file: str, data: bytes, errors: list[LocatedError], budget: Budget) -> list[_Loaded]:
    """The documents of one file that validate; the others add to `errors`."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        errors.append(not_utf8(file, data, exc))
        return []
    source = parse_yaml(text, budget)
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
    if not source.documents and not found:
        # A policy file truncated by a failed sync is empty, and its policy would go silently.
        found.append(LocatedError(file, 1, 1, "", _NO_DOCUMENT))
    errors += sorted(found, key=lambda error: (error.line, error.column))
    return out


# Byte order marks of the encodings Windows tools write (PowerShell's `>`, Notepad's
# "Unicode"): UTF-32's first, since UTF-32-LE's starts with UTF-16-LE's.
_WIDE_MARKS = (
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


def not_utf8(file: str, data: bytes, exc: UnicodeDecodeError) -> LocatedError:
    """Where the bytes stop being UTF-8, and the conversion that fixes them."""
    wide = next((name for mark, name in _WIDE_MARKS if data.startswith(mark)), None)
    if wide is not None:
        return LocatedError(
            file,
            1,
            1,
            "",
            f"the file is {wide.upper()} text (it starts with a {wide.upper()} byte order "
            f"mark), not UTF-8: save it as UTF-8 (e.g. iconv -f {wide} -t utf-8)",
        )
    line = data.count(b"\n", 0, exc.start) + 1
    column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    # The byte and a fix: an editor or a ConfigMap made from a Latin-1 file writes `é` as
    # 0xe9, which the reader cannot see in the text it looks at.
    message = (
        f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x}): save it as UTF-8 "
        f"(e.g. iconv -f latin1 -t utf-8), or remove the byte"
    )
    return LocatedError(file, line, column, "", message)


_NO_DOCUMENT = (
    "the file holds no policy document (it is empty or only comments): a sync that did not "
    "finish writing it? Delete the file if it is meant to hold nothing"
)


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


def _located_problem(loaded: Sequence[_Loaded], problem: SetProblem) -> LocatedError:
    """A cross-document problem at its document's field, naming the file:line of the
    definition it clashes with (the other one may be in another file)."""
    message = problem.message
    if problem.first is not None:
        index, path = problem.first
        _, spot = loaded[index].source.spot(path)
        at = spot.value
        message += f"; first defined at {loaded[index].file}:{at.line}:{at.column}"
    origin = loaded[problem.document]
    return _locate(origin.file, origin.source, problem.path, message)


def _from_problem(file: str, problem: SourceProblem) -> LocatedError:
    return _error(file, problem.position, format_path(problem.path), problem.message)


def _error(file: str, position: Position, path: str, message: str) -> LocatedError:
    return LocatedError(file, position.line, position.column, path, message)
