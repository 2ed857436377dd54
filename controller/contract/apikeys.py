"""The API key record the gateways authenticate with (`<P>:apikeys`: key id → JSON). Pure."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from controller.model import validate_id


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What Redis holds for one key: who it stands for, and the hash of the key."""

    key_id: str
    tenant: str
    plan: str
    user: str | None
    digest: str  # "hmac-sha256:<hex>" or "sha256:<hex>"
    created_at: float
    name: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KeyRecord:
        """Parse a stored record; ValueError when someone wrote something else there."""
        try:
            data = json.loads(text)
            record = cls(**{name: data.get(name) for name in cls.__dataclass_fields__})
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"API key record {text[:80]!r} is not a key record: {exc}") from None
        if not all(isinstance(v, str) for v in (record.key_id, record.tenant, record.plan,
                                                record.digest)):  # fmt: skip
            raise ValueError(f"API key record {text[:80]!r} misses key_id/tenant/plan/digest")
        return record

    def usable(self) -> KeyRecord:
        """The record if it may authenticate: its tenant, plan and user (absent, or a string)
        are ids safe to put in key names, as `governor keys create` checks them; ValueError
        naming the field otherwise. A hand-written record with an unsafe id, or a user that
        is not a string (read as no user, it escaped the user's limits), authenticates
        nobody."""
        names = {"tenant": self.tenant, "plan": self.plan}
        if self.user is not None:
            names["user"] = self.user
        for what, value in names.items():
            if not isinstance(value, str):
                raise ValueError(f"API key record {self.key_id}: {what} is not a string")
            validate_id(value, f"API key record {self.key_id}: {what}")
        return self

    def public(self) -> dict[str, object]:
        """The record without its digest, for listings."""
        data = asdict(self)
        del data["digest"]
        return data


def parsed_records(values: Iterable[str]) -> list[KeyRecord]:
    """The records that parse (a hand-written one authenticates nobody and is left alone)."""
    out = []
    for text in values:
        try:
            out.append(KeyRecord.from_json(text))
        except ValueError:
            continue
    return out
