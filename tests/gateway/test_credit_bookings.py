"""A top-up sent while Redis stalls past the socket timeout: the client's retries send it
again, and the stalled server, once awake, runs every try it had read. Each try used to add
the amount once more (one `governor credits top-up acme 50` booked $100 or more and said
+50); the booking's record now makes every repeat a no-op."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from controller.clients.redis import close, connect
from controller.clients.scripts import EnforcementError
from controller.gateway.credits import CreditLedger
from controller.settings import RedisSettings
from tests.support.redis import RedisServer

STALL_SECONDS = 2.5  # past the socket timeout (1 s) and one retry (0.05 s back-off)


@pytest.fixture
def stalling(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", debug_command=True).start()
    yield server
    server.stop()


def test_a_top_up_during_a_stall_is_booked_once(stalling: RedisServer) -> None:
    settings = RedisSettings(url=SecretStr(stalling.url), socket_timeout_seconds=1.0)
    client = connect(stalling.url, settings)  # the CLI's client: retries on timeouts
    try:
        ledger = CreditLedger(client, "governor")
        ledger.top_up("acme", 1.0, reason="before", actor="pytest")  # script loaded

        def sleep() -> None:
            with stalling.client() as direct:
                direct.execute_command("DEBUG", "SLEEP", str(STALL_SECONDS))

        stall = threading.Thread(target=sleep)
        stall.start()
        time.sleep(0.3)  # asleep by now: every try of the top-up waits in its socket
        # Every try may time out (then it failed, as far as the client knows): booked once.
        with contextlib.suppress(EnforcementError):
            ledger.top_up("acme", 50.0, reason="invoice 1234", actor="pytest")
        stall.join()
    finally:
        close(client)
    with stalling.client() as direct:
        assert direct.hget("governor:{t:acme}:credits", "balance") == "51000000"
        entries = direct.xrange("governor:{t:acme}:credits:history")
    assert [fields["reason"] for _, fields in entries] == ["before", "invoice 1234"]
