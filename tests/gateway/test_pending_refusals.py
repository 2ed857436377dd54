"""Held store calls on a real Redis: one that Redis refuses by itself (a key of the wrong type)
keeps its place while the others go through; an outage stops the pass; a Redis that refuses
everything is not hammered call by call."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import redis
import redis.asyncio

from controller.clients.redis import aclose, refused_this_call
from controller.clients.scripts import EnforcementError
from controller.gateway.asgi import STORE_ERRORS
from controller.gateway.pending import PendingCalls, StoreCall
from tests.support.redis import RedisServer, free_port

Counter = Callable[[str], StoreCall]


def counter(client: redis.asyncio.Redis[str]) -> Counter:
    """A held call that adds 1 to `key`, wrapped as the enforcement scripts wrap errors."""

    def call(key: str) -> StoreCall:
        async def incr() -> None:
            try:
                await client.incr(key)
            except redis.RedisError as exc:
                raise EnforcementError(f"the settle script failed: {exc}") from exc

        return incr

    return call


def retried(url: str, keys: list[str], *, passes: int = 1) -> tuple[PendingCalls, list[int]]:
    """Hold one call per key, run `passes` retry passes; what each pass let through."""

    async def run() -> tuple[PendingCalls, list[int]]:
        client: redis.asyncio.Redis[str] = redis.asyncio.from_url(
            url, decode_responses=True, socket_connect_timeout=0.5
        )
        pending = PendingCalls(STORE_ERRORS, refused_alone=refused_this_call)
        add = counter(client)
        for key in keys:
            pending.hold("settle", add(key))
        through = [await pending.retry() for _ in range(passes)]
        await aclose(client)
        return pending, through

    return asyncio.run(run())


def test_a_call_redis_refuses_alone_stays_held_and_the_ones_behind_it_go_through(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    db.rpush("tenant:broken", "not a counter")  # WRONGTYPE for INCR, as a hand edit leaves it

    pending, through = retried(redis_server.url, ["tenant:broken", "a", "b", "c"])

    assert through == [3]
    assert [db.get(key) for key in "abc"] == ["1", "1", "1"]
    assert len(pending) == 1  # kept for when the key is repaired, not dropped
    assert pending.lost == 0


def test_the_refused_call_goes_through_once_its_key_is_repaired(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    db.rpush("tenant:broken", "not a counter")

    async def run() -> tuple[int, int, int]:
        client: redis.asyncio.Redis[str] = redis.asyncio.from_url(
            redis_server.url, decode_responses=True
        )
        pending = PendingCalls(STORE_ERRORS, refused_alone=refused_this_call)
        pending.hold("settle", counter(client)("tenant:broken"))
        first = await pending.retry()
        db.delete("tenant:broken")  # the repair the WRONGTYPE hint names
        second = await pending.retry()
        await aclose(client)
        return first, second, len(pending)

    assert asyncio.run(run()) == (0, 1, 0)
    assert db.get("tenant:broken") == "1"


def test_an_outage_stops_the_pass_and_keeps_every_call_in_order() -> None:
    down = f"redis://127.0.0.1:{free_port()}"  # nothing listens: connection refused

    pending, through = retried(down, ["a", "b", "c"], passes=2)

    assert through == [0, 0]
    assert len(pending) == 3
    assert pending.lost == 0


def test_a_redis_refusing_every_call_stops_the_pass_after_a_few(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    keys = [f"broken:{n}" for n in range(20)]
    for key in keys:
        db.rpush(key, "x")
    calls: list[str] = []

    def counting(client: redis.asyncio.Redis[str], key: str) -> StoreCall:
        inner = counter(client)(key)

        async def tried() -> None:
            calls.append(key)
            await inner()

        return tried

    async def run() -> list[str]:
        client: redis.asyncio.Redis[str] = redis.asyncio.from_url(
            redis_server.url, decode_responses=True
        )
        pending = PendingCalls(STORE_ERRORS, refused_alone=refused_this_call)
        for key in keys:
            pending.hold("settle", counting(client, key))
        await pending.retry()
        first = list(calls)
        calls.clear()
        await pending.retry()  # the next pass starts where the last one stopped
        await aclose(client)
        return [*first, "|", *calls]

    tried = asyncio.run(run())

    limit = PendingCalls(STORE_ERRORS).max_refusals_in_a_row
    assert tried == [*keys[:limit], "|", *keys[limit : 2 * limit]]


def test_refusals_of_the_whole_server_count_as_an_outage() -> None:
    def wrapped(reply: str) -> BaseException:
        try:
            raise EnforcementError("the settle script failed") from redis.ResponseError(reply)
        except EnforcementError as exc:
            return exc

    assert refused_this_call(wrapped("WRONGTYPE Operation against a key holding the wrong kind"))
    assert refused_this_call(wrapped("ERR user_script:12: bad argument"))
    for reply in ("OOM command not allowed", "READONLY You can't write", "LOADING Redis is"):
        assert not refused_this_call(wrapped(reply)), reply
    assert not refused_this_call(EnforcementError("down"))
    assert not refused_this_call(redis.ConnectionError("Connection refused"))


def test_a_redis_out_of_memory_or_read_only_stops_the_pass_at_the_first_call(
    redis_server: RedisServer, db: redis.Redis[str], tmp_path: Path
) -> None:
    # redis-py strips the code off the replies it knows (OOM, READONLY, NOPERM, MASTERDOWN …):
    # the message alone no longer says the whole server refuses.
    replica = RedisServer(tmp_path / "replica", replica_of=redis_server.port).start()
    try:
        db.config_set("maxmemory", "1")
        db.config_set("maxmemory-policy", "noeviction")
        try:
            for url in (redis_server.url, replica.url):
                calls: list[str] = []

                async def run(url: str = url, calls: list[str] = calls) -> tuple[int, int]:
                    client: redis.asyncio.Redis[str] = redis.asyncio.from_url(
                        url, decode_responses=True
                    )
                    pending = PendingCalls(STORE_ERRORS, refused_alone=refused_this_call)
                    add = counter(client)
                    for key in "abcd":

                        async def tried(key: str = key) -> None:
                            calls.append(key)
                            await add(key)()

                        pending.hold("settle", tried)
                    through = await pending.retry()
                    await aclose(client)
                    return through, len(pending)

                assert asyncio.run(run()) == (0, 4), url
                assert calls == ["a"], url  # an outage in all but name: the pass stops
        finally:
            db.config_set("maxmemory", "0")
    finally:
        replica.stop()


def test_an_acl_without_write_rights_stops_the_pass_at_the_first_call(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    # Inside a script an ACL refusal is no NOPERM reply but `ERR The user executing the
    # script can't run this command…`: it was read as a refusal of that call alone, so
    # every held settle was tried (eight in a row) on a Redis that refuses them all.
    calls: list[str] = []

    async def run() -> tuple[int, int]:
        client: redis.asyncio.Redis[str] = redis.asyncio.from_url(
            redis_server.url, decode_responses=True
        )
        pending = PendingCalls(STORE_ERRORS, refused_alone=refused_this_call)
        for key in "abcd":

            async def tried(key: str = key) -> None:
                calls.append(key)
                try:  # a write inside a script, as settle.lua's
                    await client.eval("return redis.call('INCR', KEYS[1])", 1, key)  # type: ignore[no-untyped-call]
                except redis.RedisError as exc:
                    raise EnforcementError(f"the settle script failed: {exc}") from exc

            pending.hold("settle", tried)
        through = await pending.retry()
        await aclose(client)
        return through, len(pending)

    db.execute_command("ACL", "SETUSER", "default", "-@write")
    try:
        assert asyncio.run(run()) == (0, 4)
    finally:
        db.execute_command("ACL", "SETUSER", "default", "+@all")
    assert calls == ["a"]  # an outage in all but name: the pass stops


def test_a_full_queue_gives_up_its_oldest_call_even_once_a_refusal_moved_it_back(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    db.rpush("tenant:broken", "not a counter")
    now = [0.0]

    async def run() -> tuple[list[str], int]:
        client: redis.asyncio.Redis[str] = redis.asyncio.from_url(
            redis_server.url, decode_responses=True
        )
        pending = PendingCalls(
            STORE_ERRORS,
            max_calls=3,
            clock=lambda: now[0],
            refused_alone=refused_this_call,
            max_refusals_in_a_row=1,  # the pass ends at the first refusal: "a", "b" untried
        )
        add = counter(client)
        for key in ("tenant:broken", "a", "b"):  # held at t = 0, 1, 2
            pending.hold(key, add(key))
            now[0] += 1
        await pending.retry()  # the broken call goes behind "a" and "b"
        pending.hold("c", add("c"))  # a fourth: the oldest must go
        kept = [held[1] for held in pending._calls]
        await aclose(client)
        return kept, pending.lost

    kept, lost = asyncio.run(run())

    assert lost == 1
    assert kept == ["a", "b", "c"]  # the broken call (held at 0) went, not "a" at the head
