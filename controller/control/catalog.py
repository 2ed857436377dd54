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
    """Replace `<P>:plans` and its version with the plans of `policies` in one transaction."""
    keys = key_schema(client, prefix)
    refuse_other_contract(client, keys, "publish the plan catalog")  # another layout's plans
    key = keys.catalog
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
