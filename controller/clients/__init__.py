"""Connections to the outside, one place each: Redis (sync/async, TLS, Sentinel), running the
contract's Lua scripts, Prometheus and Kubernetes. Client errors are wrapped in our own."""
