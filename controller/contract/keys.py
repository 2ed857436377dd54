"""The Redis key schema of docs/redis-contract.md (contract 1 for one Redis, contract 2 for a
Redis Cluster): pure key building, no I/O."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from controller.contract.slots import slot_tag, slot_tags
from controller.errors import ConfigurationError
from controller.model import Address, AddressError, Scope, validate_id

CONTRACT_VERSION = 1
# Contract 2 (a Redis Cluster): the keys used together share a slot. Per tenant in
# `{t:<tenant>}` as in contract 1; the shared keys in `{g}`; a client address's state in
# `{ip:<ip>}`; the ledger, the decision records and the fence per slot (`{s<n>}`, see
# contract/slots.py), so none is one hash of every limit.
SHARDED_CONTRACT_VERSION = 2
SHARED_TAG = "{g}"

# The prefix is ours, but it is configuration: it must not open a hash tag, hold a glob or
# the segment separator, or two deployments could read each other's keys.
_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_IDS = {Scope.PLAN: ("plan",), Scope.TENANT: ("tenant",), Scope.USER: ("tenant", "user")}
_ALL_IDS = ("plan", "tenant", "user")


def escape_id(value: str) -> str:
    """A validated id as a key segment: ':' (our separator) is written as '%3A'."""
    # validate_id admits ':' in ids but never '%', so this escape is reversible and keys
    # stay injective: no id can end one segment and start another.
    return value.replace(":", "%3A")


def checked(address: Address) -> Address:
    """Return `address` if every id in it is safe to put in a key, else raise AddressError.
    Not cached: the Redis sink keeps each address's key once (`RedisSink._place`)."""
    expected = _IDS.get(address.scope, ())
    for name in _ALL_IDS:
        value = getattr(address, name)
        if name not in expected:
            if value is not None:
                raise AddressError(str(address), f"a {address.scope} address has no {name}")
            continue
        if not isinstance(value, str):
            raise AddressError(str(address), f"{name} is missing")
        try:
            validate_id(value, name)
        except ValueError:
            raise AddressError(
                _shorten(value),
                f"{name} is not a safe id: 1-128 letters, digits and ._:+=~- starting with "
                "a letter or digit (untrusted ids are rejected, never rewritten)",
            ) from None
    # The round trip also checks the model name with the parser's own rule.
    if Address.parse(str(address)) != address:
        raise AddressError(str(address), "does not survive a parse round trip")
    return address


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def limit_field(address: Address) -> str:
    """The hash field of a limit inside its owner hash: `<limit>` or `<limit>@<model>`."""
    return f"{address.limit}@{address.model}" if address.model else str(address.limit)


def format_value(value: float) -> str:
    """A limit as Redis stores it: integers without '.0', so Lua's tonumber reads either."""
    value = float(value)  # an int has no is_integer() before Python 3.12
    if not math.isfinite(value):
        raise ValueError(f"limit value {value!r} is not a finite number")
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def parse_value(text: str) -> float:
    """A stored limit; NaN when someone wrote something that is not a number."""
    try:
        value = float(text)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


@dataclass(frozen=True, slots=True)
class KeySchema:
    """Every key Governor reads or writes, under one prefix; `sharded`: contract 2's names
    (a Redis Cluster), else contract 1's."""

    prefix: str = "governor"
    sharded: bool = False

    def __post_init__(self) -> None:
        if not _PREFIX_PATTERN.fullmatch(self.prefix):
            raise ConfigurationError(
                f"Redis key prefix {self.prefix!r} must be 1-64 letters, digits and ._- "
                "(set GOVERNOR_REDIS__KEY_PREFIX)"
            )

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _shared(self, *parts: str) -> str:
        """A key every writer and gateway shares: in contract 2 all of them in one slot."""
        return self._key(SHARED_TAG, *parts) if self.sharded else self._key(*parts)

    @property
    def contract_version(self) -> int:
        return SHARDED_CONTRACT_VERSION if self.sharded else CONTRACT_VERSION

    @property
    def contract(self) -> str:
        return self._shared("contract")

    @property
    def version(self) -> str:
        return self._shared("version")

    @property
    def channel(self) -> str:
        return self._key("changes")

    @property
    def written(self) -> str:
        """Contract 1's ledger, one hash (contract 2: `ledger_of`, per slot)."""
        return self._key("written")

    @property
    def decisions(self) -> str:
        """Contract 1's decision records, one hash (contract 2: `decisions_of`, per slot)."""
        return self._key("decisions")

    @property
    def tenants(self) -> str:
        return self._shared("tenants")

    @property
    def api_keys(self) -> str:
        """The gateway's API key records: key id → JSON with `tenant` and `plan`."""
        return self._shared("apikeys")

    @property
    def freeze(self) -> str:
        return self._shared("freeze")

    @property
    def journal(self) -> str:
        return self._shared("journal")

    @property
    def reload_confirmation(self) -> str:
        return self._shared("reload-confirmation")

    @property
    def catalog(self) -> str:
        """`<P>:plans`: hash plan → JSON {models, fail_mode, degrade, credits, quota_exhausted}."""
        return self._shared("plans")

    @property
    def catalog_version(self) -> str:
        """`<P>:plans:version`: the version of the policy set the catalog was published from."""
        return self._shared("plans", "version")

    @property
    def gateways(self) -> str:
        """`<P>:gateways`: a sorted set of live gateways by heartbeat (fail-open shares)."""
        return self._shared("gateways")

    @property
    def leader(self) -> str:
        """`<P>:leader`: the Redis leader lock (holder's token)."""
        return self._shared("leader")

    @property
    def leader_epoch(self) -> str:
        """`<P>:leader:epoch`: the fencing epoch, raised at each change of leader."""
        return self._shared("leader", "epoch")

    @property
    def override_index(self) -> str:
        return self._shared("overrides")

    def override(self, address: Address) -> str:
        """One string key per override, expiring with it (beside the index: one transaction
        writes both; overrides are set by people, so few)."""
        return self._shared("override", str(checked(address)))

    def tenant_tag(self, tenant: str) -> str:
        """The Cluster hash tag shared by every key of one tenant."""
        return "{t:" + escape_id(validate_id(tenant, "tenant")) + "}"

    def response(self, tenant: str, response_id: str) -> str:
        """String, expiring: the tokens a later Responses request naming `response_id` as its
        `previous_response_id` makes the model server read again, recorded for `tenant`. Under
        the tenant's tag (one tenant never reads another's record; a Cluster keeps it in the
        tenant's slot). ValueError for an id that is no safe id: it is never put in a key."""
        escaped = escape_id(validate_id(response_id, "response id"))
        return self._key(self.tenant_tag(tenant), "response", escaped)

    def conversation(self, tenant: str, conversation_id: str) -> str:
        """String, expiring: as `response`, for a Conversations API id (`conv_…`) a Responses
        answer of `tenant`'s belonged to: the tokens a request naming it as `conversation`
        makes the model server read again. Its own kind, so a conversation and a response
        that happen to share an id never meet."""
        escaped = escape_id(validate_id(conversation_id, "conversation id"))
        return self._key(self.tenant_tag(tenant), "conversation", escaped)

    def background(self, tenant: str, response_id: str) -> str:
        """String, expiring: what `tenant`'s background Responses answer `response_id` was
        charged when it was answered (its whole reservation, its usage not known yet), until
        a read or cancel through the gateway sees its usage and settles the difference.
        Under the tenant's tag, as `response`; ValueError for an id that is no safe id."""
        escaped = escape_id(validate_id(response_id, "response id"))
        return self._key(self.tenant_tag(tenant), "background", escaped)

    def ip_tag(self, ip: str) -> str:
        """The hash tag of one client address's enforcement state (contract 2)."""
        return "{ip:" + escape_id(ip) + "}"

    def owner(self, address: Address) -> str:
        """The hash that holds this address's limit (field: `limit_field(address)`)."""
        shared = f"{self.prefix}:{SHARED_TAG}" if self.sharded else self.prefix
        return _owner(self.prefix, shared, checked(address))

    def owner_and_field(self, address: Address) -> tuple[str, str]:
        return self.owner(address), limit_field(address)

    def ledger_of(self, owner: str) -> str:
        """The ledger hash that records what was written to `owner`: contract 1's one
        `<P>:written`; contract 2's per slot, beside the owner (one transaction per slot)."""
        return self._key(slot_tag(owner), "written") if self.sharded else self.written

    def decisions_of(self, owner: str) -> str:
        """The decision records of the addresses whose limits `owner` holds."""
        return self._key(slot_tag(owner), "decisions") if self.sharded else self.decisions

    def fence_of(self, owner: str) -> str:
        """Contract 2: the highest leader epoch that wrote to `owner`'s slot. A write carries
        its writer's epoch and the slot's script refuses a lower one: fencing holds in every
        slot although the leader lock sits in one."""
        return self._key(slot_tag(owner), "fence")

    def ledgers(self) -> tuple[str, ...]:
        """Every ledger hash there can be (contract 2: one per slot, most of them absent)."""
        if not self.sharded:
            return (self.written,)
        return tuple(self._key("{" + tag + "}", "written") for tag in slot_tags())


def _owner(prefix: str, shared: str, address: Address) -> str:
    if address.scope in (Scope.GLOBAL, Scope.IP):
        return f"{shared}:limits:{address.scope}"
    if address.scope is Scope.PLAN:
        assert address.plan is not None
        return f"{shared}:limits:plan:{escape_id(address.plan)}"
    assert address.tenant is not None
    tag = "{t:" + escape_id(address.tenant) + "}"
    if address.scope is Scope.TENANT:
        return f"{prefix}:{tag}:limits"
    assert address.user is not None
    return f"{prefix}:{tag}:user:{escape_id(address.user)}:limits"
