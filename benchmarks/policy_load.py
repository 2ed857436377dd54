"""Time to load (or refuse) hostile policy sets: the fuzz test's 1,200 mutations of the shipped
policies and the issue #14 cases (a merge overriding 8,000 keys, an alias bomb, deep nesting).

Run: `.venv/bin/python benchmarks/policy_load.py`. Prints the slowest cases and exits 1 when any
case took over 2 s (the bound issue #14 sets; tests assert outcomes, never times).
"""

from __future__ import annotations

import time
from pathlib import Path

from controller.policy.loader import MAX_FILE_BYTES, MAX_SET_BYTES, Sources, check_sources
from tests.support.policy_mutations import SHIPPED, _merge_bomb, cases, shipped_files
from tests.unit.test_policy_fuzz import COUNT, SEED

BOUND_SECONDS = 2.0


def _named() -> dict[str, Sources]:
    files = shipped_files()
    extra = {
        "merge overriding 8,000 keys": _merge_bomb(8000),
        "alias bomb (9^9)": "a: &a [x,x,x,x,x,x,x,x,x]\n"
        + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n"
            for i in range(8)
        ),
        "flow nesting 100,000 deep": "a: " + "[" * 100_000 + "]" * 100_000,
        "1,000 `&&` terms": "when: '" + " && ".join(["x > 1.0"] * 1000) + "'",
        "a string of the largest file": "x: '" + "y" * (MAX_FILE_BYTES - 10) + "'",
        "keys filling the largest file": "".join(f"k{i}: 1\n" for i in range(MAX_FILE_BYTES // 9)),
    }
    named = {
        name: Sources(
            SHIPPED,
            tuple(sorted({**files, Path(SHIPPED / "zz.yaml"): text.encode()}.items())),
            (),
        )
        for name, text in extra.items()
    }
    # The largest set the bounds let through, of the densest YAML: flow lists of numbers.
    room = MAX_SET_BYTES - sum(len(data) for data in files.values()) - MAX_FILE_BYTES
    largest = {
        **files,
        SHIPPED / "zz1.yaml": _flow_list(MAX_FILE_BYTES),
        SHIPPED / "zz2.yaml": _flow_list(room),
    }
    named["the largest set of the densest YAML"] = Sources(
        SHIPPED, tuple(sorted(largest.items())), ()
    )
    return named


def _flow_list(size: int) -> bytes:
    """`[1,1,...,1]` of at most `size` bytes: a node every two bytes."""
    return b"[" + b"1," * ((size - 3) // 2) + b"1]"


def _time(sources: Sources) -> float:
    started = time.perf_counter()
    check_sources(sources, complete=True)
    return time.perf_counter() - started


def main() -> int:
    timings = [(_time(s), name) for name, s in _named().items()]
    for part in range(4):
        for case in cases(SEED + part, COUNT // 4):
            timings.append((_time(case.sources), f"seed {SEED + part} #{case.number} {case.steps}"))
    timings.sort(reverse=True)
    print(f"{len(timings)} cases; slowest:")
    for seconds, name in timings[:8]:
        print(f"  {seconds:6.3f} s  {name[:110]}")
    over = [name for seconds, name in timings if seconds > BOUND_SECONDS]
    print(f"over {BOUND_SECONDS} s: {len(over)}")
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
