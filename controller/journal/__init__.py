"""The decision journal: what changed and why, as events (pure), written to structlog and a
capped Redis Stream, and read back by `governor audit`."""
