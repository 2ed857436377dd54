"""Fail closed in the nginx module as in `governor gateway`: the same 503 not-configured before
the controller's first tick, the same 403 unknown-plan, and one start line in the error log."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from controller.contract.enforcement import EnforcementKeys
from controller.control.catalog import publish_catalog
from controller.policy.loader import load_directory
from tests.gateway.conftest import PROBLEM
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.nginx.conftest import Side, chat_body
from tests.nginx.gateway_pair import PairOptions, gateway_pair
from tests.nginx.nginx_server import NginxServer
from tests.nginx.test_parity import shape

pytestmark = pytest.mark.integration

BASE = "/docs/gateway.md"  # after the configured problem base URL


@contextmanager
def fresh_sides(
    root: Path, export_dir: Path, upstream: tuple[FakeUpstream, ServerThread], plans: Path | None
) -> Iterator[tuple[Side, Side, NginxServer]]:
    """A new nginx and a new Python gateway, each on a new Redis holding only the plan
    catalog of `plans` (None: nothing at all), started after it was written."""

    def catalog(db: redis.Redis[str]) -> None:
        assert plans is not None
        publish_catalog(db, load_directory(plans), prefix="governor")

    options = PairOptions(prepare=None if plans is None else catalog)
    with gateway_pair(root, export_dir, upstream, options) as pair:
        yield pair.nginx, pair.python, pair.server


def start_line(server: NginxServer) -> str:
    (line,) = [
        line
        for line in server.error_log.read_text().splitlines()
        if "governor: nginx module ready" in line
    ]
    return line


def test_before_the_first_tick_both_answer_503_not_configured(
    tmp_path: Path, export_dir: Path, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    seen = len(upstream[0].seen)
    with fresh_sides(tmp_path, export_dir, upstream, None) as (nginx, python, server):
        answers = {
            side.name: [side.chat(side.key("acme", "free"), chat_body(model=m))
                        for m in ("gpt-4", "gpt-9")]
            for side in (nginx, python)
        }  # fmt: skip
        line = start_line(server)
    assert [shape(a)[0] for a in answers["nginx"]] == [shape(a)[0] for a in answers["python"]]
    for answer in answers["nginx"]:
        assert answer.status_code == 503
        assert answer.headers["content-type"] == PROBLEM
        assert answer.json()["type"].endswith(f"{BASE}#not-configured")
    assert len(upstream[0].seen) == seen  # nothing served unrestricted
    assert "listening on nginx.conf's listen directives, upstream via /_governor/upstream" in line
    assert "plan catalog none yet (no controller has published one)" in line


def test_a_catalog_without_limits_and_an_unknown_plan_answer_alike(
    tmp_path: Path,
    export_dir: Path,
    upstream: tuple[FakeUpstream, ServerThread],
    policy_dir: Path,
) -> None:
    seen = len(upstream[0].seen)
    with fresh_sides(tmp_path, export_dir, upstream, policy_dir) as (nginx, python, server):
        answers = {
            side.name: [side.chat(side.key("acme", plan), chat_body(model="gpt-9"))
                        for plan in ("free", "enterprise", "platinum", "fre")]
            for side in (nginx, python)
        }  # fmt: skip
        line = start_line(server)
    assert [shape(a)[0] for a in answers["nginx"]] == [shape(a)[0] for a in answers["python"]]
    # free: its models refuse gpt-9 first; enterprise (any model) meets no limits: 503 (its
    # fail_mode: open knows no rate to hold it to either).
    assert [a.status_code for a in answers["nginx"]] == [403, 503, 403, 403]
    assert answers["nginx"][0].json()["type"].endswith(f"{BASE}#model-not-allowed")
    assert answers["nginx"][1].json()["type"].endswith(f"{BASE}#not-configured")
    for answer in answers["nginx"][2:]:
        assert answer.json()["type"].endswith(f"{BASE}#unknown-plan")
        assert answer.json()["plan"] in ("platinum", "fre")
    assert len(upstream[0].seen) == seen
    version = load_directory(policy_dir).version
    assert f"plan catalog {version} (4 plans)" in line


def test_a_damaged_counter_is_refused_by_both_naming_its_repair(
    nginx: Side, python_gateway: Side, nginx_session: NginxServer
) -> None:
    state = EnforcementKeys.for_prefix("governor").tenant_level("acme").state
    answers = {}
    for side in (nginx, python_gateway):
        key = side.key("acme", "free")
        assert side.chat(key).status_code == 200
        side.db.hset(state, "u|tokens_per_day", "inf")  # Lua 5.1 reads it as a number
        answers[side.name] = side.chat(key)
    for answer in answers.values():
        assert answer.status_code == 503
        assert answer.json()["type"].endswith(f"{BASE}#corrupt-state")
        assert f"{state} field u|tokens_per_day holds 'inf'" in answer.json()["detail"]
    assert answers["nginx"].json() == answers["python"].json()
    assert "limit state damaged" in nginx_session.error_log.read_text()
