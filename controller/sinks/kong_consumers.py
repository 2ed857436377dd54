"""Which Kong consumer is each tenant's, looked up afresh on every reconcile pass.

Operators edit consumers by hand: a custom_id (or username) moved to another consumer, a
consumer deleted and recreated (a new id), or deleted outright. A tenant → consumer id
mapping kept from an earlier pass then went on writing a tenant's limit to someone else's
consumer, or to a vanished one, and nothing reported it. So the mapping lives for one pass
only (`start`), and each of Governor's tenant plugins is checked against the consumer it sits
on (`tenant_of`).

Cost per pass: one paginated `GET /consumers` (ceil(consumers / page size) requests), or one
`GET /consumers/{id}` per consumer that carries a Governor plugin, whichever the last full
listing says is fewer: a Kong with a million consumers and fifty tenants pays fifty requests,
one with a hundred consumers pays one.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from controller.errors import SinkError

if TYPE_CHECKING:  # kong.py imports this module: no cycle at run time
    from controller.sinks.kong import KongAdmin


class ConsumerIndex:
    """Consumers as Kong holds them now: by id, and by the field that holds the tenant id."""

    def __init__(self, admin: KongAdmin, field: str, page_size: int) -> None:
        self.admin = admin
        self.field = field  # custom_id or username
        self.page_size = page_size
        self._pages: int | None = None  # requests the last full listing took; None: never
        self.start()

    def start(self) -> None:
        """A new pass: forget every consumer seen so far."""
        self._complete = False  # every consumer is in _by_id
        self._by_id: dict[str, dict[str, Any] | None] = {}  # None: no such consumer
        self._by_tenant: dict[str, str | None] = {}  # None: no consumer carries it

    def load(self, ids: Collection[str]) -> None:
        """Fetch the consumers with these ids, the cheaper way (module docstring)."""
        if not ids:
            return
        if self._pages is None or self._pages <= len(ids):
            self._list_all()
        else:
            for consumer_id in sorted(ids):
                self._fetch(consumer_id)

    def tenant_of(self, consumer_id: str) -> str | None:
        """The tenant id the consumer carries now; None when it is gone or carries none."""
        if consumer_id not in self._by_id and not self._complete:
            self._fetch(consumer_id)
        consumer = self._by_id.get(consumer_id)
        value = consumer.get(self.field) if consumer is not None else None
        return str(value) if value is not None else None

    def exists(self, consumer_id: str) -> bool:
        self.tenant_of(consumer_id)
        return self._by_id.get(consumer_id) is not None

    def consumer_of(self, tenant: str) -> str | None:
        """The id of the consumer whose field is exactly `tenant`, or None."""
        if tenant not in self._by_tenant and not self._complete:
            self._search(tenant)
        return self._by_tenant.get(tenant)

    def remember(self, consumer: dict[str, Any]) -> None:
        """A consumer this pass created or read."""
        consumer_id = str(consumer["id"])
        self._by_id[consumer_id] = consumer
        value = consumer.get(self.field)
        if value is not None:
            self._by_tenant[str(value)] = consumer_id

    def _list_all(self) -> None:
        count = 0
        for consumer in self.admin.pages("/consumers"):
            if isinstance(consumer, dict) and consumer.get("id"):
                self.remember(consumer)
                count += 1
        self._complete = True
        self._pages = max(1, math.ceil(count / self.page_size))

    def _fetch(self, consumer_id: str) -> None:
        # A UUID-shaped segment is read as the primary key; any other as a username, so the
        # answer's id is checked: a username that looks like the id is another consumer.
        found = self._get("/consumers/" + quote(consumer_id, safe=""))
        if isinstance(found, dict) and str(found.get("id")) == consumer_id:
            self.remember(found)
        else:
            self._by_id[consumer_id] = None

    def _search(self, tenant: str) -> None:
        if self.field == "custom_id":
            listing = self._get("/consumers", {"custom_id": tenant})
            found = (listing.get("data") or []) if isinstance(listing, dict) else []
        else:
            # /consumers/{x} reads x as the primary key when it looks like a UUID: a tenant
            # named like another consumer's id must not reach that consumer (checked below).
            consumer = self._get("/consumers/" + quote(tenant, safe=""))
            found = [consumer] if consumer is not None else []
        matches = [c for c in found if isinstance(c, dict) and c.get(self.field) == tenant]
        if matches:
            self.remember(matches[0])
        else:
            self._by_tenant[tenant] = None

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        """The JSON Kong answers, None for 404 (no such consumer); any other refusal raises:
        read as "no consumer", it would take the tenant's limit off its consumer."""
        response = self.admin.request("GET", path, params=params)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise SinkError(
                f"Kong Admin API at {self.admin.location}: GET {path} answered "
                f"{response.status_code}"
            )
        return response.json()
