"""Redis Cluster hash slots, computed as Redis does (CRC16 of the hash tag, mod 16384): pure."""

from __future__ import annotations

import binascii
import functools

SLOTS = 16384


def hash_part(key: str) -> bytes:
    """What Redis hashes: the text between the first '{' and the first '}' after it when
    that is not empty, else the whole key."""
    data = key.encode()
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            return data[start + 1 : end]
    return data


def slot_of(key: str) -> int:
    """The slot that serves `key` (CRC16-XMODEM, which `binascii.crc_hqx` computes)."""
    return binascii.crc_hqx(hash_part(key), 0) % SLOTS


@functools.cache
def slot_tags() -> tuple[str, ...]:
    """For each slot, a short hash tag text (`s<n>`) that hashes to it: a key written
    `<P>:{<tag>}:...` lands in that slot. Found by trying `s0`, `s1`, ... once per process
    (about 170,000 CRC16s of a few bytes: ~0.1 s), so a per-slot key needs no index."""
    tags: list[str | None] = [None] * SLOTS
    missing, n = SLOTS, 0
    while missing:
        text = f"s{n}"
        slot = binascii.crc_hqx(text.encode(), 0) % SLOTS
        if tags[slot] is None:
            tags[slot] = text
            missing -= 1
        n += 1
    return tuple(tag for tag in tags if tag is not None)


def slot_tag(key: str) -> str:
    """`{<tag>}` of `key`'s slot: a key built with it sits beside `key`."""
    return "{" + slot_tags()[slot_of(key)] + "}"
