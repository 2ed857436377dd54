"""The plan catalog's format: what each plan allows beyond numbers (models, fail mode,
degrade, credits), as the controller publishes it to `<P>:plans` and gateways read it. Pure."""

from __future__ import annotations

import difflib
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


def _not_a_boolean(value: object) -> object:
    # YAML reads yes/on/true as true and no/off/false as false, and pydantic takes those as 1
    # and 0: `requests_per_minute: off` would stop all traffic. (Text stays: YAML 1.1 reads
    # `1e6` as text, and that is a number people write.)
    if isinstance(value, bool):
        raise ValueError(f"write a number, not {value!r} (YAML reads yes/no/on/off as true/false)")
    return value


NotBoolean = BeforeValidator(_not_a_boolean)
PositiveNumber = Annotated[float, Field(gt=0, allow_inf_nan=False), NotBoolean]
NonNegativeNumber = Annotated[float, Field(ge=0, allow_inf_nan=False), NotBoolean]


class Strict(BaseModel):
    """Every document part: unknown fields are errors, values are not coerced loosely."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Degrade(Strict):
    """Graceful degradation as a budget nears its end, before the hard 402."""

    at_percent: Annotated[float, Field(gt=0, lt=100), NotBoolean] = Field(
        90.0, description="start degrading once this share of a budget is spent"
    )
    # At most a 32-bit integer: gateways (Lua, JSON) read it as a number, not a big integer.
    max_tokens: Annotated[int, Field(gt=0, lt=2**31), NotBoolean] | None = Field(
        None, description="cap the request's max_tokens to this"
    )
    model: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="route to this (cheaper) model instead; must be one the plan allows"
    )

    @model_validator(mode="after")
    def _does_something(self) -> Degrade:
        if self.max_tokens is None and self.model is None:
            raise ValueError("degrade needs `max_tokens`, `model` or both")
        return self


class Credits(Strict):
    """A prepaid USD balance per tenant, charged at each model's price."""

    # At most a top-up's size (credits.MAX_TOP_UP_USD): in micro-USD a larger floor leaves
    # the integers a double holds exactly, which the nginx module's string.format('%d') needs.
    min_balance_usd: NonNegativeNumber = Field(
        0.0, le=1e9, description="answer 402 once a tenant's balance would fall below this"
    )


class PlanTerms(Strict):
    """What a plan allows beyond numbers: the part gateways read from the catalog."""

    models: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="models the plan may call; empty means any"
    )
    fail_mode: Literal["open", "closed"] = Field(
        "closed",
        description="when the gateway cannot reach Redis: closed refuses (503), open admits "
        "through a local limiter of the limit divided by the live gateway count",
    )
    degrade: Degrade | None = None
    credits: Credits | None = Field(
        None, description="charge a prepaid credit balance (USD) as well as token budgets"
    )
    quota_exhausted: Literal["payment_required", "insufficient_quota"] = Field(
        "payment_required",
        description="the answer when a token budget or the credits are spent: 402 "
        "(payment_required), or 429 with code insufficient_quota as OpenAI itself answers",
    )

    @model_validator(mode="after")
    def _degrade_model_allowed(self) -> PlanTerms:
        target = self.degrade.model if self.degrade else None
        if target is not None and self.models and target not in self.models:
            raise ValueError(
                f"degrade.model {target!r} is not one of the plan's models "
                f"({', '.join(self.models)})"
            )
        return self


_FIELDS = {"models", "fail_mode", "degrade", "credits", "quota_exhausted"}
_REQUIRED = {"models", "fail_mode"}


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
    degrade: Degrade | None = None
    credits: Credits | None = None
    # A spent budget is 402, or (True) OpenAI's 429 insufficient_quota.
    insufficient_quota: bool = False

    def allows(self, model: str | None) -> bool:
        """Whether the plan may call `model` (a request naming no model is always allowed)."""
        return not self.models or model is None or model in self.models

    @classmethod
    def from_spec(cls, spec: PlanTerms) -> PlanInfo:
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
        spec = PlanTerms.model_validate_json(text)
        missing = sorted(_REQUIRED - spec.model_fields_set)
        if missing:
            raise ValueError(f"a catalog entry without {' and '.join(missing)}")
        return cls.from_spec(spec)

    def to_json(self) -> str:
        spec = PlanTerms(
            models=list(self.models),
            fail_mode=self.fail_mode,
            degrade=self.degrade,
            credits=self.credits,
            quota_exhausted="insufficient_quota" if self.insufficient_quota else "payment_required",
        )
        return json.dumps(spec.model_dump(mode="json", include=_FIELDS), sort_keys=True)
