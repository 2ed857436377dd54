"""A tenant label value is no address part: one holding `/` or `@` (any series with a `tenant`
label can carry it, e.g. an exporter that labels by a caller-supplied name) once filled a
policy target into another tenant's address (`bigco/requests_per_minute@x` into
`tenant/$tenant/tokens_per_minute` is tenant bigco's `requests_per_minute@x/...`), and the
daemon wrote that limit into bigco's hash. It must be refused: logged as an engagement that
cannot be written, and nothing of bigco's touched."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import redis

from controller.contract.keys import KeySchema
from controller.gateway.keys import KeyStore
from tests.daemon.harness import DaemonFactory, daemon_env, limit
from tests.daemon.test_key_tenants import ENTERPRISE_TPM, POLICY, write_policies
from tests.support.prometheus import Exporter, PrometheusServer, wait_for
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

HOSTILE = "bigco/requests_per_minute@x"


def test_a_label_value_with_a_slash_or_at_never_writes_another_tenants_limit(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    exporter: Exporter,
    prometheus: PrometheusServer,
    redis_server: RedisServer,
    db: redis.Redis[str],
    daemons: DaemonFactory,
) -> None:
    case = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)
    for tenant in ("bigco", "evil"):
        KeyStore(db, KeySchema(), secret=None).create(tenant, "enterprise")
    exporter.set("tenant_hot", 1.0, {"case": case, "tenant": "evil"})
    exporter.set("tenant_hot", 1.0, {"case": case, "tenant": HOSTILE})
    selector = f'tenant_hot{{case="{case}"}}'
    wait_for(lambda: len(prometheus.query(selector, time.time())) == 2, "both series scraped")
    policies = write_policies(tmp_path / "policies", case)
    daemon = daemons("a", daemon_env(redis_server.url, prometheus.url, policies))
    evil, bigco = "governor:{t:evil}:limits", "governor:{t:bigco}:limits"
    wait_for(lambda: limit(db, evil, "tokens_per_minute") == ENTERPRISE_TPM / 2, "evil is cut")
    wait_for(lambda: (daemon.metric("governor_ticks_total", outcome="ok") or 0) >= 3, "3 ticks")
    assert db.hgetall(bigco) == {}  # bigco's limits are its plan's: nothing written for it
    logged = daemon.wait_for_log("policy.engagement_unwritten")
    assert (logged["policy"], logged["key"]) == (POLICY, HOSTILE)
    assert f"label value {HOSTILE!r} for $tenant is not a safe id" in logged["reason"]
