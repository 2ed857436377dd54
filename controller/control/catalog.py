"""Publishing the plan catalog gateways read (`<P>:plans`) from a loaded policy set."""

from __future__ import annotations

import redis

from controller.clients.redis import key_schema, refuse_other_contract, wrapped
from controller.contract.catalog import PlanInfo
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
    # `wrapped`: the server and the repair of a refusal (OOM, READONLY, NOPERM), as the
    # limits' writes say them; the bare reply named neither.
    with (
        wrapped(client, f"publish the plan catalog to {key}"),
        client.pipeline(transaction=True) as pipe,
    ):
        pipe.delete(key)
        if entries:
            pipe.hset(key, mapping=entries)
        pipe.set(keys.catalog_version, policies.version)
        pipe.execute()


def _holds(client: redis.Redis[str], key: str, version_key: str, policies: PolicySet) -> bool:
    """Whether Redis holds the catalog of `policies`: its version, and plans if it has any."""
    with (
        wrapped(client, f"read the plan catalog version {version_key}"),
        client.pipeline(transaction=False) as pipe,
    ):
        pipe.get(version_key)
        pipe.exists(key)
        version, plans = pipe.execute()
    return bool(version == policies.version and (plans or not policies.plans))
