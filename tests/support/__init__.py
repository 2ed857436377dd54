"""Helpers shared by tests and benchmarks: real server processes started on free ports."""
