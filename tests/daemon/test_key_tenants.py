"""The loop has no silent gap: a tenant known only through its API key is contained on its
key's plan, and an engagement that cannot write a limit is an error, logged and counted once,
never a quiet no-op (the journal and governor_policy_active would say "engaged" regardless)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import redis

from controller.contract.keys import KeySchema
from controller.gateway.keys import KeyStore
from tests.daemon.harness import DaemonFactory, daemon_env, events, limit
from tests.support.prometheus import Exporter, PrometheusServer, wait_for
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

POLICY = "ThrottlePolicy/tenant-hot"
ENTERPRISE_TPM = 400000.0


def write_policies(directory: Path, case: str) -> Path:
    """free has no tokens_per_minute (as shipped); enterprise has; a tenant whose `hot`
    gauge is 1 has its tokens_per_minute halved."""
    directory.mkdir(parents=True)
    (directory / "plans.yaml").write_text(
        "apiVersion: governor/v1\nkind: Plan\nmetadata: {name: free}\n"
        "spec: {limits: {requests_per_minute: 10}}\n---\n"
        "apiVersion: governor/v1\nkind: Plan\nmetadata: {name: enterprise}\n"
        f"spec: {{limits: {{requests_per_minute: 6000, tokens_per_minute: {ENTERPRISE_TPM:g}}}}}\n"
    )
    (directory / "limits.yaml").write_text(
        "apiVersion: governor/v1\nkind: Limits\nmetadata: {name: global}\n"
        "spec:\n  default_plan: free\n  global: {requests_per_second: 100}\n"
    )
    (directory / "tenant-hot.yaml").write_text(
        "apiVersion: governor/v1\nkind: ThrottlePolicy\nmetadata: {name: tenant-hot}\n"
        "spec:\n  per: tenant\n  signals:\n"
        f"    hot: {{query: 'max by (tenant) (tenant_hot{{case=\"{case}\"}})', stale_after: 30s}}\n"
        "  when: hot > 0.5\n"
        "  actions:\n    - {target: tenant/$tenant/tokens_per_minute, scale: 0.5}\n"
    )
    return directory


def test_a_key_only_tenant_is_cut_on_its_plan_and_a_tenant_without_one_is_an_error(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    exporter: Exporter,
    prometheus: PrometheusServer,
    redis_server: RedisServer,
    db: redis.Redis[str],
    daemons: DaemonFactory,
) -> None:
    case = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)
    # `keys create --tenant bigco --plan enterprise`, never `tenants set`.
    KeyStore(db, KeySchema(), secret=None).create("bigco", "enterprise")
    for tenant in ("bigco", "nokey"):
        exporter.set("tenant_hot", 1.0, {"case": case, "tenant": tenant})
    selector = f'tenant_hot{{case="{case}"}}'
    wait_for(lambda: len(prometheus.query(selector, time.time())) == 2, "both tenants are scraped")
    policies = write_policies(tmp_path / "policies", case)
    daemon = daemons("a", daemon_env(redis_server.url, prometheus.url, policies))
    key = "governor:{t:bigco}:limits"
    wait_for(lambda: limit(db, key, "tokens_per_minute") == ENTERPRISE_TPM / 2, "bigco is cut")
    # `nokey` is on the default plan, which has no tokens_per_minute to scale: an error.
    daemon.wait_for_metric("governor_engagements_unwritten_total", 1.0, policy=POLICY)
    assert daemon.metric("governor_policy_active", policy=POLICY) == 2.0
    assert not db.exists("governor:{t:nokey}:limits")
    logged = daemon.wait_for_log("policy.engagement_unwritten")
    assert logged["level"] == "error"
    assert (logged["policy"], logged["key"]) == (POLICY, "nokey")
    assert "no baseline" in logged["reason"]
    # The tick's events reach the stream when the tick ends, after the line above is logged.
    wait_for(
        lambda: (
            {e["details"]["key"] for e in events(db, "policy.transition")} >= {"bigco", "nokey"}
        ),
        "both engagements are journalled",
    )
    # Said once per engagement, not every tick.
    wait_for(lambda: (daemon.metric("governor_ticks_total", outcome="ok") or 0) >= 10, "ten ticks")
    assert len(daemon.logged("policy.engagement_unwritten")) == 1
    assert daemon.metric("governor_engagements_unwritten_total", policy=POLICY) == 1.0
