"""Contract 1 → contract 2: where each key of one Redis goes on a Cluster (pure, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from controller.contract.keys import SHARED_TAG, KeySchema

# Written again by the controller or the gateways on the Cluster, never copied: the version
# and contract (contract 2's are set by the migration), the leader lock and its epoch (a
# new deployment elects afresh), the live gateways (heartbeats).
_NOT_COPIED = {"version", "contract", "leader", "leader:epoch", "gateways"}
# Shared keys of contract 1 that contract 2 keeps in the shared slot under the same name.
_SHARED = {"tenants", "apikeys", "freeze", "journal", "overrides", "plans", "plans:version",
           "reload-confirmation"}  # fmt: skip
_IP_STATE = "enforce:ip:"

Action = Literal["copy", "split", "skip", "unknown"]


@dataclass(frozen=True, slots=True)
class Move:
    """What happens to one key: `copy` to `target` (DUMP/RESTORE, TTL kept), `split` (a hash
    whose fields go to the per-slot hashes of contract 2: the ledger, the decision records),
    `skip` (rewritten on the Cluster), `unknown` (not a key Governor writes: left alone)."""

    action: Action
    target: str = ""


def move_of(key: str, schema: KeySchema) -> Move:
    """Where contract 1's `key` goes under `schema` (a sharded KeySchema, same prefix)."""
    prefix = schema.prefix + ":"
    if not key.startswith(prefix):
        return Move("unknown")
    rest = key[len(prefix) :]
    if rest.startswith("{t:"):  # a tenant's keys: the same names in both contracts
        return Move("copy", key)
    if rest in _NOT_COPIED:
        return Move("skip")
    if rest in ("written", "decisions"):
        return Move("split")
    if rest in _SHARED or rest.startswith(("limits:", "override:", "enforce:global")):
        return Move("copy", f"{prefix}{SHARED_TAG}:{rest}")
    if rest.startswith(_IP_STATE):
        ip, leases, _ = rest[len(_IP_STATE) :].partition(":leases")
        if ":" in ip or not ip:  # escaped ids hold no ':'
            return Move("unknown")
        return Move("copy", f"{prefix}{{ip:{ip}}}:enforce{':leases' if leases else ''}")
    return Move("unknown")
