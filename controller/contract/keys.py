"""The Redis key schema of docs/redis-contract.md (contract 1): pure key building, no I/O."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from controller.errors import ConfigurationError
from controller.model import Address, AddressError, Scope, validate_id

CONTRACT_VERSION = 1

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
    """Every key Governor reads or writes, under one prefix."""

    prefix: str = "governor"

    def __post_init__(self) -> None:
        if not _PREFIX_PATTERN.fullmatch(self.prefix):
            raise ConfigurationError(
                f"Redis key prefix {self.prefix!r} must be 1-64 letters, digits and ._- "
                "(set GOVERNOR_REDIS__KEY_PREFIX)"
            )

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def contract(self) -> str:
        return self._key("contract")

    @property
    def version(self) -> str:
        return self._key("version")

    @property
    def channel(self) -> str:
        return self._key("changes")

    @property
    def written(self) -> str:
        return self._key("written")

    @property
    def decisions(self) -> str:
        return self._key("decisions")

    @property
    def tenants(self) -> str:
        return self._key("tenants")

    @property
    def api_keys(self) -> str:
        """The gateway's API key records: key id → JSON with `tenant` and `plan`."""
        return self._key("apikeys")

    @property
    def freeze(self) -> str:
        return self._key("freeze")

    @property
    def journal(self) -> str:
        return self._key("journal")

    @property
    def reload_confirmation(self) -> str:
        return self._key("reload-confirmation")

    @property
    def catalog(self) -> str:
        """`<P>:plans`: hash plan → JSON {models, fail_mode, degrade, credits, quota_exhausted}."""
        return self._key("plans")

    @property
    def catalog_version(self) -> str:
        """`<P>:plans:version`: the version of the policy set the catalog was published from."""
        return self._key("plans", "version")

    @property
    def gateways(self) -> str:
        """`<P>:gateways`: a sorted set of live gateways by heartbeat (fail-open shares)."""
        return self._key("gateways")

    @property
    def leader(self) -> str:
        """`<P>:leader`: the Redis leader lock (holder's token)."""
        return self._key("leader")

    @property
    def leader_epoch(self) -> str:
        """`<P>:leader:epoch`: the fencing epoch, raised at each change of leader."""
        return self._key("leader", "epoch")

    @property
    def override_index(self) -> str:
        return self._key("overrides")

    def override(self, address: Address) -> str:
        """One string key per override, expiring with it."""
        return self._key("override", str(checked(address)))

    def tenant_tag(self, tenant: str) -> str:
        """The Cluster hash tag shared by every key of one tenant."""
        return "{t:" + escape_id(validate_id(tenant, "tenant")) + "}"

    def owner(self, address: Address) -> str:
        """The hash that holds this address's limit (field: `limit_field(address)`)."""
        return _owner(self.prefix, checked(address))

    def owner_and_field(self, address: Address) -> tuple[str, str]:
        return self.owner(address), limit_field(address)


def _owner(prefix: str, address: Address) -> str:
    if address.scope in (Scope.GLOBAL, Scope.IP):
        return f"{prefix}:limits:{address.scope}"
    if address.scope is Scope.PLAN:
        assert address.plan is not None
        return f"{prefix}:limits:plan:{escape_id(address.plan)}"
    assert address.tenant is not None
    tag = "{t:" + escape_id(address.tenant) + "}"
    if address.scope is Scope.TENANT:
        return f"{prefix}:{tag}:limits"
    assert address.user is not None
    return f"{prefix}:{tag}:user:{escape_id(address.user)}:limits"
