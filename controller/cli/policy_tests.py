"""`governor policy test DIR`: run the policy tests (`*_test.yaml`) beside the policies."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import typer

from controller.cli._redis import count
from controller.policy.loader import PolicyLoadError, check_files
from controller.policy.policyset import PolicySet
from controller.policy.testing import CaseResult, find_test_files, read_test_file, run_file


def _load(files: Sequence[Path]) -> PolicySet:
    policies, errors = check_files(files, files[0].parent if files else Path("."))
    if policies is None:
        raise PolicyLoadError(errors)
    return policies


def run_policy_tests(directory: Path, as_json: bool) -> None:
    """Run every test file of DIR; exit 0 when all pass, 1 on any failure or broken file."""
    if not directory.is_dir():
        typer.echo(f"error: {str(directory)!r} is not a directory of policy files", err=True)
        raise typer.Exit(2)
    files = find_test_files(directory)
    if not files:
        typer.echo(
            f"error: {str(directory)!r} holds no policy tests (*_test.yaml); "
            "see docs/policies.md, section 'Policy tests'",
            err=True,
        )
        raise typer.Exit(2)
    report: list[dict[str, object]] = []
    tests_per_file: list[list[CaseResult]] = []
    failed = 0
    for path in files:
        spec, errors = read_test_file(path)
        results: list[CaseResult] = []
        if spec is not None:
            try:
                results = run_file(path, spec, _load)
            except PolicyLoadError as exc:
                errors = list(exc.errors)
        failed += len(errors) + sum(not r.passed for r in results)
        tests_per_file.append(results)
        report.append(
            {
                "file": str(path),
                "errors": [str(e) for e in errors],
                "tests": [
                    {"name": r.name, "passed": r.passed, "failures": r.failures} for r in results
                ],
            }
        )
        if not as_json:
            _print(path, [str(e) for e in errors], results)
    total = sum(len(r) for r in tests_per_file)
    if as_json:
        typer.echo(json.dumps({"passed": failed == 0, "files": report}, indent=2))
    else:
        verdict = "FAILED" if failed else "ok"
        typer.echo(
            f"{verdict}: {count(total, 'test')} in {count(len(files), 'file')}, {failed} failing"
        )
    raise typer.Exit(1 if failed else 0)


def _print(path: Path, errors: list[str], results: list[CaseResult]) -> None:
    for error in errors:
        typer.echo(error, err=True)
    for result in results:
        mark = "PASS" if result.passed else "FAIL"
        typer.echo(f"{mark} {path.name}: {result.name}")
        for failure in result.failures:
            typer.echo(f"     {failure}")
