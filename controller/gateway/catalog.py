"""The plan catalog: what each plan allows beyond numbers (models, fail mode, degrade, credits).

The daemon publishes it to `<P>:plans` on each policy load (`publish_catalog`), with the
policy set's version in `<P>:plans:version`; gateways read it through `PlanCatalog`, cached
and refreshed every few seconds or when told to. A plan the catalog does not hold is no plan:
gateways refuse it (403 unknown-plan), and refuse everyone while no catalog is published.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

import redis
import redis.asyncio

from controller.errors import SinkError
from controller.policy.documents import Credits, PlanSpec
from controller.policy.documents import Degrade as DegradeSpec
from controller.policy.policyset import PolicySet
from controller.sinks.keys import KeySchema

_FIELDS = {"models", "fail_mode", "degrade", "credits", "quota_exhausted"}
_REQUIRED = {"models", "fail_mode"}


def catalog_key(prefix: str) -> str:
    """`<P>:plans`: a hash plan → JSON {models, fail_mode, degrade, credits, quota_exhausted}."""
    return f"{KeySchema(prefix).prefix}:plans"


def catalog_version_key(prefix: str) -> str:
    """`<P>:plans:version`: the version of the policy set the catalog was published from."""
    return f"{catalog_key(prefix)}:version"


def unknown_plan_message(plan: str, known: Collection[str], source: str) -> str:
    """Why `plan` is refused, naming the known plans (from `source`) and the closest one."""
    names = sorted(known)
    close = difflib.get_close_matches(plan, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listed = ", ".join(names) if names else "none"
    return f"no plan {plan!r} in {source} (known plans: {listed}){hint}"


@dataclass(frozen=True)
class PlanInfo:
    """One plan as a gateway needs it."""

    models: tuple[str, ...] = ()  # empty: any model
    fail_mode: Literal["open", "closed"] = "closed"
    degrade: DegradeSpec | None = None
    credits: Credits | None = None
    # A spent budget is 402, or (True) OpenAI's 429 insufficient_quota.
    insufficient_quota: bool = False

    def allows(self, model: str | None) -> bool:
        """Whether the plan may call `model` (a request naming no model is always allowed)."""
        return not self.models or model is None or model in self.models

    @classmethod
    def from_spec(cls, spec: PlanSpec) -> PlanInfo:
        return cls(
            tuple(spec.models),
            spec.fail_mode,
            spec.degrade,
            spec.credits,
            spec.quota_exhausted == "insufficient_quota",
        )

    @classmethod
    def from_json(cls, text: str) -> PlanInfo:
        """An entry as `to_json` writes it; ValueError for any other (an empty models list
        means any model, so an entry that leaves it or the fail mode out is no plan)."""
        spec = PlanSpec.model_validate_json(text)
        missing = sorted(_REQUIRED - spec.model_fields_set)
        if missing:
            raise ValueError(f"a catalog entry without {' and '.join(missing)}")
        return cls.from_spec(spec)

    def to_json(self) -> str:
        spec = PlanSpec(
            models=list(self.models),
            fail_mode=self.fail_mode,
            degrade=self.degrade,
            credits=self.credits,
            quota_exhausted="insufficient_quota" if self.insufficient_quota else "payment_required",
        )
        return json.dumps(spec.model_dump(mode="json", include=_FIELDS), sort_keys=True)


def publish_catalog(
    client: redis.Redis[str], policies: PolicySet, *, prefix: str = "governor"
) -> None:
    """Replace `<P>:plans` and its version with the plans of `policies` in one transaction."""
    key = catalog_key(prefix)
    entries: dict[str | bytes, bytes | float | int | str] = {
        name: PlanInfo.from_spec(plan.spec).to_json() for name, plan in policies.plans.items()
    }
    try:
        with client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if entries:
                pipe.hset(key, mapping=entries)
            pipe.set(catalog_version_key(prefix), policies.version)
            pipe.execute()
    except redis.RedisError as exc:
        raise SinkError(f"publishing the plan catalog to {key} failed: {exc}") from exc


@dataclass
class PlanCatalog:
    """A gateway's cached view of `<P>:plans`, refreshed every `refresh_seconds`."""

    client: redis.asyncio.Redis[str]
    prefix: str
    refresh_seconds: float = 5.0
    version: str | None = None  # the policy set's version; None: none published (or fixed)
    _plans: dict[str, PlanInfo] | None = None  # None: never read
    _loaded_at: float | None = None

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
        catalog._plans = dict(plans)
        catalog._loaded_at = time.monotonic()
        return catalog

    @property
    def plans(self) -> Mapping[str, PlanInfo] | None:
        """Every cached plan; None while the catalog was never read (Redis away since start)."""
        return self._plans

    def get(self, plan: str) -> PlanInfo | None:
        """The cached plan; None for a plan the catalog does not hold (never a default)."""
        return None if self._plans is None else self._plans.get(plan)

    def invalidate(self) -> None:
        """Read Redis again on the next `current` call (e.g. on a `<P>:changes` message)."""
        if self.refresh_seconds != float("inf"):
            self._loaded_at = None

    async def refresh(self) -> None:
        """Load every plan now; raise SinkError when Redis cannot be read."""
        key = catalog_key(self.prefix)
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(key)
            pipe.get(catalog_version_key(self.prefix))
            raw, version = await pipe.execute()
            plans = {name: PlanInfo.from_json(text) for name, text in raw.items()}
        except redis.RedisError as exc:
            raise SinkError(f"reading the plan catalog {key} failed: {exc}") from exc
        except ValueError as exc:  # pydantic's ValidationError: a hand-written entry
            raise SinkError(
                f"the plan catalog {key} holds an entry that is no plan: {exc}"
            ) from None
        self._plans = plans
        self.version = version if plans else None
        # None published: read again at the next request, so the first publish counts at once.
        self._loaded_at = time.monotonic() if plans else None

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
