"""The plan catalog: what each plan allows beyond numbers (models, fail mode, degrade, credits).

The daemon publishes it to `<P>:plans` on each policy load (`publish_catalog`), with the
policy set's version in `<P>:plans:version`; gateways read it through `PlanCatalog`, cached
and refreshed every few seconds or when told to. A plan the catalog does not hold is no plan:
gateways refuse it (403 unknown-plan), and refuse everyone while no catalog is published.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis
import redis.asyncio
import structlog

from controller.clients.redis import explained, is_cluster, key_schema
from controller.contract.catalog import PlanInfo
from controller.errors import SinkError
from controller.model import model_key

_log = structlog.get_logger("governor.gateway")


@dataclass
class PlanCatalog:
    """A gateway's cached view of `<P>:plans`, refreshed every `refresh_seconds`."""

    client: redis.asyncio.Redis[str]
    prefix: str
    refresh_seconds: float = 5.0
    version: str | None = None  # the policy set's version; None: none published (or fixed)
    _plans: dict[str, PlanInfo] | None = None  # None: never read
    _models: frozenset[str] = frozenset()  # every model a plan lists, as model_key has it
    _loaded_at: float | None = None
    _broken: frozenset[str] = frozenset()  # entries that are no plan, as last logged

    @classmethod
    def fixed(
        cls,
        client: redis.asyncio.Redis[str],
        prefix: str,
        plans: Mapping[str, PlanInfo],
        version: str | None = None,
    ) -> PlanCatalog:
        """A catalog that never reads Redis (for embedding and tests)."""
        catalog = cls(client, prefix, refresh_seconds=float("inf"), version=version)
        catalog._hold(dict(plans))
        catalog._loaded_at = time.monotonic()
        return catalog

    @property
    def plans(self) -> Mapping[str, PlanInfo] | None:
        """Every cached plan; None while the catalog was never read (Redis away since start)."""
        return self._plans

    def get(self, plan: str) -> PlanInfo | None:
        """The cached plan; None for a plan the catalog does not hold (never a default)."""
        return None if self._plans is None else self._plans.get(plan)

    def names(self, model: str) -> bool:
        """Whether a plan lists `model` among its `models` (compared as limits are: model_key)."""
        return model in self._models

    def _hold(self, plans: dict[str, PlanInfo]) -> None:
        """Take `plans` as the catalog, with the model names they list, read once per load
        (the metrics ask for every model they have not named yet, on every request)."""
        self._plans = plans
        self._models = frozenset(model_key(m) for plan in plans.values() for m in plan.models)

    def invalidate(self) -> None:
        """Read Redis again on the next `current` call (e.g. on a `<P>:changes` message)."""
        if self.refresh_seconds != float("inf"):
            self._loaded_at = None

    async def refresh(self) -> None:
        """Load every plan now; raise SinkError when Redis cannot be read."""
        schema = key_schema(self.client, self.prefix)
        key = schema.catalog
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(key)
            pipe.get(schema.catalog_version)
            raw, version = await pipe.execute()
        except redis.RedisError as exc:
            said = explained(exc, is_cluster(self.client))
            raise SinkError(f"reading the plan catalog {key} failed: {said}") from exc
        plans = self._plans_in(key, raw)
        self._hold(plans)
        self.version = version if plans else None
        # None published: read again at the next request, so the first publish counts at once.
        self._loaded_at = time.monotonic() if plans else None

    def _plans_in(self, key: str, raw: Mapping[str, str]) -> dict[str, PlanInfo]:
        """The entries that are plans. One the controller never writes (a hand edit) names no
        plan, as in the nginx module: it once made the whole catalog unreadable, and a gateway
        started then refused every tenant 503 "the limit store is unreachable". Logged when
        the set of such entries changes, not at every refresh."""
        plans: dict[str, PlanInfo] = {}
        broken: dict[str, str] = {}
        for name, text in raw.items():
            try:
                plans[name] = PlanInfo.from_json(text)
            except ValueError as exc:  # pydantic's ValidationError among them
                broken[name] = str(exc).splitlines()[0]
        if broken and frozenset(broken) != self._broken:
            _log.warning(
                "plan catalog entries that are no plan are left out: their keys and tokens "
                "are refused 403 unknown-plan (the controller republishes the catalog on its "
                f"next policy change; or redis-cli HDEL {key} <plan>)",
                entries=broken,
            )
        self._broken = frozenset(broken)
        return plans

    async def current(self, plan: str) -> PlanInfo | None:
        """The plan (None: not in the catalog), refreshing first when the cache is older than
        `refresh_seconds`.

        A failed refresh keeps the last good catalog: the admission call that follows
        reports the Redis failure itself, and the plan's fail mode must stay known.
        """
        loaded = self._loaded_at
        if loaded is None or time.monotonic() - loaded >= self.refresh_seconds:
            try:
                await self.refresh()
            except SinkError:
                self._loaded_at = time.monotonic()  # do not hammer a Redis that is away
        return self.get(plan)
