"""Cost per row of one policy condition: CEL per row (Rust, Python), a lambda, our numpy path."""

from __future__ import annotations

import time
from collections.abc import Callable

import cel
import celpy
import numpy as np

from controller.policy.expressions import compile_expression

TEXT = "spend > 3.0 * usual && spend > 0.01"
# The same condition written with a CEL function our numpy subset does not cover.
FALLBACK_TEXT = 'spend > 3.0 * usual && spend > 0.01 && size("") == 0'
ROWS = 100_000
CELPY_ROWS = 2_000  # cel-python costs ~100 µs a row; a sample keeps the run short
REPEATS = 3


def best_seconds(run: Callable[[], object], repeats: int = REPEATS) -> float:
    """The fastest of a few runs: the least disturbed by other work on the machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(7)
    spend = rng.exponential(0.05, ROWS)
    usual = rng.exponential(0.02, ROWS)
    rows = [{"spend": float(s), "usual": float(u)} for s, u in zip(spend, usual, strict=True)]

    expression = compile_expression(TEXT, {"spend", "usual"})
    program = cel.compile(TEXT)
    environment = celpy.Environment()
    runner = environment.program(environment.compile(TEXT))
    celpy_rows = [
        {name: celpy.celtypes.DoubleType(value) for name, value in row.items()}
        for row in rows[:CELPY_ROWS]
    ]

    def condition(row: dict[str, float]) -> bool:
        return row["spend"] > 3.0 * row["usual"] and row["spend"] > 0.01

    ours = expression.evaluate({"spend": spend, "usual": usual}, ROWS)
    reference = [program.execute(row) for row in rows]
    assert expression.vectorized
    assert ours.tolist() == reference, "numpy path disagrees with CEL"
    assert [bool(runner.evaluate(row)) for row in celpy_rows] == reference[:CELPY_ROWS]

    fallback = compile_expression(FALLBACK_TEXT, {"spend", "usual"})
    assert not fallback.vectorized
    assert fallback.evaluate({"spend": spend, "usual": usual}, ROWS).tolist() == reference

    per_row = {
        "cel (Rust) Program.execute": best_seconds(lambda: [program.execute(r) for r in rows])
        / ROWS,
        f"celpy (cel-python), {CELPY_ROWS} rows": best_seconds(
            lambda: [runner.evaluate(r) for r in celpy_rows], repeats=1
        )
        / CELPY_ROWS,
        "Python lambda": best_seconds(lambda: [condition(r) for r in rows]) / ROWS,
        "ours, per-row fallback (non-subset CEL)": best_seconds(
            lambda: fallback.evaluate({"spend": spend, "usual": usual}, ROWS), repeats=1
        )
        / ROWS,
        "ours, vectorized evaluate": best_seconds(
            lambda: expression.evaluate({"spend": spend, "usual": usual}, ROWS)
        )
        / ROWS,
    }
    baseline = per_row["ours, vectorized evaluate"]
    print(f"{TEXT!r}, {ROWS} rows ({int(ours.sum())} true); best of {REPEATS} runs")
    print(f"{'path':<40} {'µs/row':>10} {'× ours':>10}")
    for name, seconds in per_row.items():
        print(f"{name:<40} {seconds * 1e6:>10.4f} {seconds / baseline:>10.1f}")


if __name__ == "__main__":
    main()
