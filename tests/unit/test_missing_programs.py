"""A test run whose tests start a program that is not installed stops before the first test,
in one line naming the programs, their Debian packages and the command that installs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROGRAMS, missing_programs

REPO = Path(__file__).resolve().parents[2]


def test_only_the_programs_the_selected_folders_start_are_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    every_folder = {folder for _, users in PROGRAMS.values() for folder in users}
    assert missing_programs(every_folder) == {}  # this machine has them all
    monkeypatch.setenv("PATH", str(tmp_path))  # and now none on PATH
    assert missing_programs({"nginx"}) == {
        "redis-server": "redis-server",
        "nginx": "nginx-extras",
        "lua5.1": "lua5.1",
        "luac5.1": "lua5.1",
    }
    assert missing_programs({"unit", "kubernetes_sink"}) == {}


def test_a_run_without_them_stops_at_once_in_one_line(tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/nginx"],
        cwd=REPO,
        env={"PATH": str(tmp_path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert ran.returncode == pytest.ExitCode.USAGE_ERROR, ran.stdout + ran.stderr
    (line,) = [text for text in ran.stdout.splitlines() if "missing programs" in text]
    assert (
        "missing programs: redis-server (redis-server), nginx (nginx-extras), lua5.1 (lua5.1), "
        "luac5.1 (lua5.1); install them with: apt-get install -y --no-install-recommends "
        "lua5.1 nginx-extras redis-server"
    ) in line
    assert "passed" not in ran.stdout
    assert "FileNotFoundError" not in ran.stdout
