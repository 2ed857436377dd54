"""The contract between controller and gateways: Redis key names, stored records, the plan
catalog's format and the Lua enforcement scripts. Pure: no I/O (docs/redis-contract.md)."""
