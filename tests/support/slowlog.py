"""What a real Redis ran, from its SLOWLOG at threshold 0: every command with its arguments."""

from __future__ import annotations

import re
from dataclasses import dataclass

import redis

MORE = re.compile(r"\.\.\. \((\d+) more arguments\)")
# A connection's set-up, and the watching itself: not what the code under test sent.
_SETUP = ("SLOWLOG", "CONFIG", "HELLO", "CLIENT", "AUTH", "SELECT")


@dataclass(frozen=True)
class Command:
    """One command as Redis logged it: its arguments (at most 32 shown) and their count."""

    args: tuple[str, ...]
    argc: int

    @property
    def name(self) -> str:
        return self.args[0].upper()


def watch(db: redis.Redis[str]) -> None:
    """Log every command from now on (until `ran`)."""
    db.config_set("slowlog-log-slower-than", 0)
    db.config_set("slowlog-max-len", 1_000_000)
    db.slowlog_reset()


def ran(db: redis.Redis[str]) -> list[Command]:
    """Every command since `watch` in order, but the SLOWLOG's own and a connection's set-up;
    the server's SLOWLOG is back to its defaults after (it is shared by the session)."""
    # The raw reply: redis-py's parser joins the arguments with spaces (JSON has spaces).
    entries = db.execute_command("SLOWLOG", "GET", 1_000_000)
    db.config_set("slowlog-log-slower-than", 10_000)
    db.config_set("slowlog-max-len", 128)
    db.slowlog_reset()
    assert len(entries) < 1_000_000, "the SLOWLOG overflowed: raise slowlog-max-len"
    found = []
    for entry in reversed(entries):
        args = tuple(a.decode() if isinstance(a, bytes) else str(a) for a in entry[3])
        more = MORE.fullmatch(args[-1])
        argc = len(args) - 1 + int(more.group(1)) if more else len(args)
        if args[0].upper() not in _SETUP:
            found.append(Command(args, argc))
    return found
