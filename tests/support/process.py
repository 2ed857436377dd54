"""Helpers for test servers run as real processes: wait for a condition, stop by PID."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def wait_for(
    ready: Callable[[], bool], failure: Callable[[], str], timeout: float, step: float = 0.01
) -> None:
    """Poll `ready` until it holds; after `timeout` seconds raise with `failure()`'s text."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(failure())
        time.sleep(step)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a re-parented daemon is a zombie until reaped: not alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def stop_pid(pid: int, signum: int, wait: Callable[[Callable[[], bool], str], None]) -> None:
    """Send `signum` to `pid` and wait (with the server's own `wait`) until it has exited."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return
    wait(lambda: not alive(pid), f"exit (pid {pid})")
