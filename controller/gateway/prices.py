"""The price table: USD per model and token kind, and the micro-dollar amounts credits move."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from controller.model import model_key
from controller.settings import ModelPrice, PricesSettings

MICRO = 1_000_000  # credits are kept in integer micro-USD: no float drift in the ledger


def to_micro(usd: float) -> int:
    """USD → micro-USD, rounded up (a charge is never smaller than its price)."""
    # The 1e-9 slack keeps 0.1 + 0.2 style float noise from adding a whole micro-dollar.
    return math.ceil(usd * MICRO - 1e-9)


def from_micro(micro: int | float) -> float:
    """Micro-USD → USD."""
    return micro / MICRO


@dataclass(frozen=True)
class PriceTable:
    """Per-model prices, keyed by `model_key` (a model is priced without regard to case, as
    it is limited); models not in the table cost the `default` price."""

    models: Mapping[str, ModelPrice]
    default: ModelPrice

    @classmethod
    def from_settings(cls, settings: PricesSettings) -> PriceTable:
        """The table of `settings.prices`; an unset default is the dearest model in the table."""
        default = settings.default
        if default is None:
            default = max(
                settings.models.values(),
                key=lambda p: (max(p.prompt_per_1k, p.completion_per_1k), p.prompt_per_1k),
                default=ModelPrice(prompt_per_1k=0.0, completion_per_1k=0.0),
            )
        return cls({model_key(name): p for name, p in settings.models.items()}, default)

    def price(self, model: str | None) -> ModelPrice:
        return self.models.get(model_key(model), self.default) if model else self.default

    def cost(self, model: str | None, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for one request's actual usage."""
        price = self.price(model)
        return (
            prompt_tokens * price.prompt_per_1k + completion_tokens * price.completion_per_1k
        ) / 1000.0

    def worst_case(self, model: str | None, tokens: int) -> float:
        """USD for `tokens` whose split between prompt and completion is not known yet."""
        price = self.price(model)
        return tokens * max(price.prompt_per_1k, price.completion_per_1k) / 1000.0
