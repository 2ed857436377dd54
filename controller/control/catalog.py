"""Publishing the plan catalog gateways read (`<P>:plans`) from a loaded policy set."""

from __future__ import annotations

import redis

from controller.clients.redis import key_schema, refuse_other_contract
from controller.contract.catalog import PlanInfo
from controller.errors import SinkError
from controller.policy.policyset import PolicySet


def publish_catalog(
    client: redis.Redis[str], policies: PolicySet, *, prefix: str = "governor"
) -> None:
    """Replace `<P>:plans` and its version with the plans of `policies` in one transaction,
    unless Redis holds them already (one round trip: the leader asks every tick, so a Redis
    restarted empty or a catalog deleted by hand is published again, not left for gateways
    to refuse every request 503 not-configured)."""
    keys = key_schema(client, prefix)
    key = keys.catalog
    if _holds(client, key, keys.catalog_version, policies):
        return
    refuse_other_contract(client, keys, "publish the plan catalog")  # another layout's plans
    entries: dict[str | bytes, bytes | float | int | str] = {
        name: PlanInfo.from_spec(plan.spec).to_json() for name, plan in policies.plans.items()
    }
    try:
        with client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if entries:
                pipe.hset(key, mapping=entries)
            pipe.set(keys.catalog_version, policies.version)
            pipe.execute()
    except redis.RedisError as exc:
        raise SinkError(f"publishing the plan catalog to {key} failed: {exc}") from exc


def _holds(client: redis.Redis[str], key: str, version_key: str, policies: PolicySet) -> bool:
    """Whether Redis holds the catalog of `policies`: its version, and plans if it has any."""
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.get(version_key)
            pipe.exists(key)
            version, plans = pipe.execute()
    except redis.RedisError as exc:
        raise SinkError(f"reading the plan catalog version {version_key} failed: {exc}") from exc
    return bool(version == policies.version and (plans or not policies.plans))
