"""Seeded hostile mutations of a policy directory, for the loader's fuzz test and benchmark."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from controller.policy.loader import Sources, policy_files, read_sources

SHIPPED = Path(__file__).resolve().parents[2] / "policies"

# Values an attacker or a broken generator puts where a scalar belongs.
HOSTILE_VALUES = (
    "1e400",
    "1.0e+400",
    ".nan",
    ".inf",
    "-.inf",
    "-1",
    "-5m",
    "0s",
    "99999999999999999999d",
    "1" + "0" * 5000,
    "'" + "x" * 20_000 + "'",
    "'" + "A" * 300 + "'",
    "Europe/../../../etc/passwd",
    "!!python/object/apply:os.system ['true']",
    "!!binary aGVsbG8=",
    "!!set {a: null}",
    "!!omap [a: 1]",
    "&anchor x",
    "*undefined",
    "[" * 200 + "]" * 200,
    "{a: " * 70 + "1" + "}" * 70,
    "~",
    "",
    "null",
    "true",
    "0x1F",
    "0o17",
    "1_000",
    "2001-12-14t21:59:43.10-05:00",
    '"\\x00"',
    '"\\uD800"',
    "'\u202e\u0000'",
    "- - - - x",
    "? complex key",
    "|\n  block",
    "{" * 1200,
)

# Conditions that are deep, long or not conditions at all.
HOSTILE_CONDITIONS = (
    lambda rng: "!" * rng.randint(50, 3000) + "(gpu_util > 1.0)",
    lambda rng: " && ".join(["gpu_util > 1.0"] * rng.randint(50, 1500)),
    lambda rng: " || ".join(["!(gpu_util > 1.0)"] * rng.randint(50, 400)),
    lambda rng: "(" * (n := rng.randint(50, 3000)) + "gpu_util > 1.0" + ")" * n,
    lambda rng: "-" * rng.randint(50, 3000) + "gpu_util > 1.0",
    lambda rng: "size('" + "a" * rng.randint(10, 10_000) + "') > 0",
    lambda rng: "'" + "a" * 40 + "!'.matches('(a+)+$')",
    lambda rng: "gpu_util > 1e400",
    lambda rng: "gpu_util > " + "9" * rng.randint(20, 6000),
    lambda rng: "gpu_util >",
    lambda rng: "gpu_util ? 1.0 : 2.0",
    lambda rng: "[" * rng.randint(50, 2000) + "]" * 3,
    lambda rng: " ".join(
        rng.choice(["gpu_util", "1.0", "&&", "||", "!", "(", ")", "?", ":", ">", "-", "double("])
        for _ in range(rng.randint(1, 300))
    ),
)

# Whole files an attacker adds beside the policies.
HOSTILE_FILES: tuple[Callable[[random.Random], bytes], ...] = (
    lambda rng: (
        "a: &a [x, x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n"
            for i in range(rng.randint(3, 9))
        )
    ).encode(),
    lambda rng: ("a: " + "[" * rng.randint(60, 5000) + "]" * 10 + "\n").encode(),
    lambda rng: ("- " * rng.randint(60, 5000) + "x\n").encode(),
    lambda rng: b"---\n{}\n" * rng.randint(100, 3000),
    lambda rng: _merge_bomb(rng.randint(100, 5000)).encode(),
    lambda rng: bytes(rng.randrange(256) for _ in range(rng.randint(1, 4000))),
    lambda rng: b"\xff\xfe" + "kind: Plan\n".encode("utf-16-le"),
    lambda rng: b"kind: Plan\x00\nmetadata: {name: x}\n",
    lambda rng: ("x: " + "'" + "y" * rng.randint(10, 200_000) + "'\n").encode(),
)


def _merge_bomb(keys: int) -> str:
    base = "".join(f"  k{i}: {i}\n" for i in range(keys))
    override = "".join(f"  k{i}: x\n" for i in range(keys))
    return f"base: &b\n{base}other:\n  <<: *b\n{override}"


@dataclass(frozen=True)
class Case:
    """One mutated set: what was done (for a failure message) and the files' bytes."""

    number: int
    steps: tuple[str, ...]
    sources: Sources


def shipped_files() -> dict[Path, bytes]:
    """The shipped policy files (without tests) and their bytes."""
    sources = read_sources(policy_files(SHIPPED), SHIPPED)
    assert not sources.errors, sources.errors
    return dict(sources.files)


def cases(seed: int, count: int) -> Iterator[Case]:
    """`count` mutated copies of the shipped set, the same ones for the same seed."""
    rng = random.Random(seed)
    original = shipped_files()
    for number in range(count):
        files = dict(original)
        steps = tuple(_mutate(rng, files) for _ in range(rng.randint(1, 3)))
        yield Case(number, steps, Sources(SHIPPED, tuple(sorted(files.items())), ()))


def _mutate(rng: random.Random, files: dict[Path, bytes]) -> str:
    operation = rng.choice(_OPERATIONS)
    if not files and operation is not _add_file:
        operation = _add_file
    return operation(rng, files)


def _pick(rng: random.Random, files: dict[Path, bytes]) -> tuple[Path, list[bytes]]:
    path = rng.choice(sorted(files))
    return path, files[path].splitlines(keepends=True) or [b""]


def _replace_value(rng: random.Random, files: dict[Path, bytes]) -> str:
    path, lines = _pick(rng, files)
    row = rng.randrange(len(lines))
    key, colon, _ = lines[row].partition(b": ")
    value = rng.choice(HOSTILE_VALUES)
    lines[row] = (key + b": " if colon else b"x: ") + value.encode() + b"\n"
    files[path] = b"".join(lines)
    return f"{path.name}:{row + 1} value -> {value[:40]!r}"


def _replace_condition(rng: random.Random, files: dict[Path, bytes]) -> str:
    path, lines = _pick(rng, files)
    rows = [i for i, line in enumerate(lines) if line.lstrip().startswith((b"when:", b"until:"))]
    row = rng.choice(rows) if rows else rng.randrange(len(lines))
    condition = rng.choice(HOSTILE_CONDITIONS)(rng)
    indent = lines[row][: len(lines[row]) - len(lines[row].lstrip())]
    quoted = "'" + condition.replace("'", "''") + "'"
    lines[row] = indent + b"when: " + quoted.encode() + b"\n"
    files[path] = b"".join(lines)
    return f"{path.name}:{row + 1} condition -> {condition[:40]!r}"


def _edit_lines(rng: random.Random, files: dict[Path, bytes]) -> str:
    path, lines = _pick(rng, files)
    start = rng.randrange(len(lines))
    end = min(len(lines), start + rng.randint(1, 6))
    how = rng.choice(("delete", "duplicate", "indent", "tab", "swap"))
    if how == "delete":
        del lines[start:end]
    elif how == "duplicate":
        lines[start:start] = lines[start:end] * rng.randint(1, 50)
    elif how == "indent":
        lines[start] = b" " * rng.randint(1, 9) + lines[start]
    elif how == "tab":
        lines[start] = b"\t" + lines[start].lstrip()
    else:
        other = rng.randrange(len(lines))
        lines[start], lines[other] = lines[other], lines[start]
    files[path] = b"".join(lines)
    return f"{path.name}:{start + 1} {how}"


def _flip_bytes(rng: random.Random, files: dict[Path, bytes]) -> str:
    path = rng.choice(sorted(files))
    data = bytearray(files[path])
    for _ in range(rng.randint(1, 8)):
        if data:
            data[rng.randrange(len(data))] = rng.randrange(256)
    if rng.random() < 0.3:
        del data[rng.randrange(len(data) + 1) :]
    files[path] = bytes(data)
    return f"{path.name} bytes flipped/truncated"


def _add_file(rng: random.Random, files: dict[Path, bytes]) -> str:
    index = rng.randrange(len(HOSTILE_FILES))
    files[SHIPPED / f"zz-hostile-{len(files)}.yaml"] = HOSTILE_FILES[index](rng)
    return f"added hostile file #{index}"


def _remove_file(rng: random.Random, files: dict[Path, bytes]) -> str:
    path = rng.choice(sorted(files))
    del files[path]
    return f"removed {path.name}"


_OPERATIONS: tuple[Callable[[random.Random, dict[Path, bytes]], str], ...] = (
    _replace_value,
    _replace_value,
    _replace_condition,
    _edit_lines,
    _edit_lines,
    _flip_bytes,
    _add_file,
    _remove_file,
)
