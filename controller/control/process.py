"""The process around the ticks: the cyclic garbage collector kept out of a tick, and glibc's
heap tuned once and trimmed after each tick (at 100k tenants a tick's peak is a million
objects and hundreds of MB)."""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterator
from contextlib import contextmanager

# A tick's leftovers in reference cycles wait at most this many ticks for a full collection.
FULL_COLLECTION_TICKS = 120


@contextmanager
def collections(tick: int) -> Iterator[None]:
    """Keep the cyclic garbage collector out of a tick, then freeze what the tick left.

    A tick rebuilds per-tenant state (at 100k tenants, a million objects), and the collector
    left on walks all of it several times per tick: at 20k tenants a fifth of the tick. That
    state holds no reference cycles; reference counting frees it, frozen or not. Whatever a
    tick leaves in cycles is reclaimed by a full collection every FULL_COLLECTION_TICKS.
    Then the memory freed is handed back to the system (glibc keeps it otherwise)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        if tick % FULL_COLLECTION_TICKS == 0:
            gc.unfreeze()
            gc.collect()
        gc.freeze()
        trim()


def trim() -> None:
    """glibc's malloc_trim(0): without it the freed pages of a tick's peak stay resident."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> ctypes.CDLL | None:
    # The process' own symbols include libc's on Linux: no `ldconfig` run at import time.
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # glibc only (not musl, macOS)


_LIBC = _libc()
# glibc's mallopt parameters (malloc.h) and the values tune_malloc sets.
_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES = -3, 128 * 1024
_M_ARENA_MAX, _ARENA_MAX = -8, 1


def tune_malloc() -> None:
    """Keep a tick's large buffers out of glibc's heaps, which trimming cannot shrink once
    fragmented. By default glibc raises its mmap threshold to the largest block freed (up
    to 32 MB), so a tick's big buffers (responses, per-tenant tables) are carved from the
    heap after the first tick; and each thread (the read-back, the signal queries) gets
    heaps of its own. At 100k tenants that left ~180 MB free but mapped after a few ticks
    and RSS grew from 280 to 340 MB. A fixed threshold and one arena keep it near 280 MB,
    the tick no slower within the noise (docs/operations.md, Scale). Called once, by the
    composition root, before the first tick."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        _LIBC.mallopt(_M_ARENA_MAX, _ARENA_MAX)
