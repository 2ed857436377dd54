"""Benchmark: what one admission decision costs Redis, in CPU instructions (callgrind).

Timings on a shared 2-core machine move by more than a script change gains; instruction
counts do not. This runs a redis-server under valgrind's callgrind, loads the throughput
limits of benchmarks/admission.py, and counts the instructions Redis executes per call
(reading the command, running the script, answering) for the trivial `return 1` script,
the one-level GCRA and the full decision (global + ip + plan + tenant + user + token
budget), then the full decision with a global in-flight limit, plain and shared by weight
(`concurrent_headroom`), each on its own fresh server. Ratios are to the trivial script;
`--against REV` also counts the full decision as a git revision had it (lib.lua + admit.lua
of REV, called as that revision's gateway called it), to show what a change to the scripts
gained;
`--profile N` prints the N functions that cost most inside the full decision (names only
where the redis-server binary has them).

Needs valgrind (`apt-get install valgrind`); without it, says so and exits 0.
Run: `.venv/bin/python -m benchmarks.admission_cost [--calls 1000] [--against HEAD~1]
[--profile 30]`
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from benchmarks.admission import (
    GCRA,
    HUGE,
    THROUGHPUT_LIMITS,
    TRIVIAL,
    full_decision_call,
    write_limits,
)
from controller.clients.scripts import ADMIT, Script
from controller.contract.enforcement import EnforcementKeys
from controller.model import Scope
from tests.support.redis import RedisServer, free_port

WARM_UP = 200  # calls before counting: scripts compiled, hashes and lease sets in place
# A script's keys and arguments, worked out once the limits are written.
Call = Callable[["redis.Redis[str]"], tuple[Sequence[str], Sequence[Any]]]
IN_FLIGHT = {**THROUGHPUT_LIMITS, "global/concurrent_requests": HUGE}
SHARED = {**IN_FLIGHT, "global/concurrent_headroom": 0.05, "plan/bench/concurrent_weight": 2}


def count(
    script: Script, call_for: Call, calls: int, out: Path, limits: dict[str, float]
) -> tuple[float, str]:
    """Instructions per call of `script` on a fresh redis-server under callgrind, with
    `limits` written."""
    port = free_port()
    dump = out / f"{script.name}.callgrind"
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={dump}",
         "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(port=port, decode_responses=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server under valgrind did not start") from None
                time.sleep(0.2)  # valgrind takes seconds to start the server
        write_limits(RedisServer(out, port=port), limits)
        keys, args = call_for(client)
        client.execute_command("SCRIPT LOAD", script.source)
        ids = iter(range(WARM_UP + calls))

        def call() -> None:
            call_args = [f"c{next(ids)}" if arg == "s__rand_int__" else arg for arg in args]
            client.execute_command("EVALSHA", script.sha, len(keys), *keys, *call_args)

        for _ in range(WARM_UP):
            call()
        subprocess.run(["callgrind_control", "--instr=on", str(server.pid)], check=True,
                       capture_output=True)  # fmt: skip
        for _ in range(calls):
            call()
        subprocess.run(["callgrind_control", "--instr=off", str(server.pid)], check=True,
                       capture_output=True)  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=60)
    report = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", str(dump)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    total = re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", report)
    if total is None:
        raise RuntimeError(f"callgrind_annotate printed no total for {script.name}")
    return int(total.group(1).replace(",", "")) / calls, report


def script_at(revision: str) -> tuple[Script, Call]:
    """admit.lua (with lib.lua, as Script.named builds it) at a git revision, and its call."""

    def show(name: str) -> str:
        # The scripts lived in controller/gateway/lua/ until the contract got its package.
        for folder in ("controller/contract/lua", "controller/gateway/lua"):
            found = subprocess.run(["git", "show", f"{revision}:{folder}/{name}.lua"],
                                   capture_output=True, text=True, check=False)  # fmt: skip
            if found.returncode == 0:
                return found.stdout
        raise SystemExit(f"no {name}.lua at revision {revision}")

    source = show("lib") + "\n" + show("admit")
    script = Script(f"admit@{revision}", source, hashlib.sha1(source.encode()).hexdigest())
    # Scripts before the limits were resolved by the gateway read the five limit hashes.
    return script, (hash_reading_call if "KEYS  1 global limits" in source else full_decision_call)


def hash_reading_call(client: redis.Redis[str]) -> tuple[Sequence[str], Sequence[Any]]:
    """The full decision's call to an admit.lua that reads the limit hashes itself (KEYS 1-5
    the limit hashes, then the levels and credits; ARGV without resolved limits)."""
    keys = EnforcementKeys.for_prefix("governor")
    levels = (keys.global_level(), keys.ip_level("10.1.2.3"), keys.tenant_level("t-server"),
              keys.user_level("t-server", "alice"))  # fmt: skip
    hashes = (keys.limits(Scope.GLOBAL), keys.limits(Scope.IP),
              keys.limits(Scope.PLAN, plan="bench"), keys.limits(Scope.TENANT, tenant="t-server"),
              keys.limits(Scope.USER, tenant="t-server", user="alice"))  # fmt: skip
    states = tuple(key for level in levels for key in (level.state, level.leases))
    args = ["s__rand_int__", 1, "", "t-server", "bench", "alice", "1", 600000, 3600000, "", ""]
    return (*hashes, *states, keys.credits("t-server")), args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="counted calls per script")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N costliest functions of the full decision")  # fmt: skip
    parser.add_argument("--against", metavar="REV",
                        help="also count admit.lua as git revision REV had it")  # fmt: skip
    options = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("admission_cost needs valgrind: apt-get install valgrind (skipped)")
        return
    runs: dict[str, tuple[Script, Call, dict[str, float]]] = {
        "trivial (return 1)": (TRIVIAL, lambda _: ((), ()), THROUGHPUT_LIMITS),
        "one-level GCRA": (GCRA, lambda _: (("gcra:cost",), (HUGE, 60000)), THROUGHPUT_LIMITS),
        "full decision (admit.lua)": (ADMIT, full_decision_call, THROUGHPUT_LIMITS),
        "+ global in flight": (ADMIT, full_decision_call, IN_FLIGHT),
        "+ global in flight, shared": (ADMIT, full_decision_call, SHARED),
    }
    if options.against:
        runs[f"full decision at {options.against}"] = (*script_at(options.against),
                                                        THROUGHPUT_LIMITS)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        counts, reports = {}, {}
        for name, (script, call_for, limits) in runs.items():
            counts[name], reports[name] = count(script, call_for, options.calls, Path(tmp), limits)
    trivial = counts["trivial (return 1)"]
    print(f"\ninstructions Redis executes per call (callgrind, {options.calls} calls each)")
    print(f"{'script':34} {'instructions':>13} {'vs trivial':>11}")
    for name, value in counts.items():
        print(f"{name:34} {value:13,.0f} {value / trivial:10.1f}x")
    shared, plain = counts["+ global in flight, shared"], counts["+ global in flight"]
    print(
        f"sharing the in-flight limit by weight / the plain in-flight limit = {shared / plain:.3f}"
    )
    if options.against:
        before = counts[f"full decision at {options.against}"]
        now = counts["full decision (admit.lua)"]
        print(f"full decision now / at {options.against} = {now / before:.3f}")
    if options.profile:
        lines = reports["full decision (admit.lua)"].splitlines()
        start = next(i for i, line in enumerate(lines) if "file:function" in line)
        print("\n".join(lines[start : start + 2 + options.profile]))


if __name__ == "__main__":
    main()
