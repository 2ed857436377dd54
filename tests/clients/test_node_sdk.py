"""The OpenAI Node SDK (npm `openai`, run with this machine's node) through `governor
gateway`: success, streaming with the usual `choices[0]` loop, 429 retried on
retry-after-ms, 429 without retries, 402, 429 insufficient_quota, 403."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.clients.conftest import World

# The Python clients tested beside this one leave connections and event loops of their own
# unclosed; a collection that happens to run inside this test must not fail it (see
# tests/conftest.py, which collects them after this folder).
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::ResourceWarning")]


def run_scenarios(node_dir: Path, world: World) -> dict[str, Any]:
    node = shutil.which("node")
    assert node is not None
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GOVERNOR_BASE_URL": world.base_url,
        "KEY_FREE": world.key("acme"),
        "KEY_BURST": world.key("initech"),
        "KEY_HASTY": world.key("hooli"),
        "KEY_SPENT": world.spent("globex"),
        "KEY_METERED": world.spent("stark", "metered"),
    }
    done = subprocess.run(
        [node, "scenarios.mjs"],
        cwd=node_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results: dict[str, Any] = json.loads(done.stdout)
    return results


def test_the_node_sdk_meets_every_answer(node_sdk: Path, world: World) -> None:
    results = run_scenarios(node_sdk, world)

    assert results["success"]["ok"]["content"]
    assert results["success"]["ok"]["total"] > 0
    assert results["streaming"]["ok"]["text"]
    assert results["retried"]["ok"]["served"] == [True] * 8
    assert world.outcomes("initech", "rate_limited") >= 1  # refused, retried, served
    limited = results["rate_limited"]["error"]
    assert (limited["name"], limited["status"]) == ("RateLimitError", 429)
    assert (limited["code"], limited["type"]) == ("rate_limit_exceeded", "requests")
    spent = results["spent"]["error"]
    assert (spent["status"], spent["code"]) == (402, "budget_exhausted")
    quota = results["quota"]["error"]
    assert (quota["name"], quota["code"]) == ("RateLimitError", "insufficient_quota")
    assert world.outcomes("stark", "budget_exhausted") == 1  # not retried
    forbidden = results["forbidden"]["error"]
    assert (forbidden["name"], forbidden["status"]) == ("PermissionDeniedError", 403)
    assert (forbidden["code"], forbidden["param"]) == ("model_not_allowed", "model")
