"""OpenAI's Conversations API through both gateways, nginx (deploy/nginx/, a real nginx) and
`governor gateway`, each on its own real Redis, in front of the fake model server: the official
`openai` SDK makes a conversation, adds items, continues it with the Responses API and deletes
it; only the tenant that made a conversation reaches it; the record a turn in it is admitted
with is made, grown and forgotten as the calls succeed; no call of the API is admitted against
a rate or a budget. Every assertion holds for both gateways (test_parity.py compares their
answers byte for byte)."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from structlog.testing import capture_logs

from controller.contract.keys import KeySchema
from controller.gateway.background import MAX_READ_ANSWER
from tests.gateway.conftest import Gateway, start_gateway, write_limits
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.nginx.conftest import PREFIX, SECRET, Side, chat_body
from tests.nginx.nginx_server import NginxServer
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

DAY = 1000  # the free plan's tokens_per_day
TTL_MS = 30 * 86400 * 1000  # PREVIOUS_RESPONSE_TTL_SECONDS' default
ITEM: Any = {"type": "message", "role": "user", "content": "x" * 400}
# The gateways' estimate of ITEM, as of a Responses input item: ⌈characters ÷ 4⌉ of its texts
# but the role ("message": 2, the content: 100), and 4 for the item.
ITEM_TOKENS = 2 + 100 + 4


_OPEN: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Each SDK client's connections closed after the test (left to the garbage collector,
    their ResourceWarning would fail a later test)."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def sdk(side: Side, key: str) -> openai.OpenAI:
    _OPEN.append(openai.OpenAI(api_key=key, base_url=f"{side.url}/v1", max_retries=0))
    return _OPEN[-1]


def record(side: Side, tenant: str, conversation: str) -> str | None:
    return side.db.get(KeySchema(PREFIX).conversation(tenant, conversation))


def day_left(headers: Mapping[str, str]) -> int:
    """What the day's token budget holds after an admission (its IETF RateLimit `r`)."""
    found = re.search(r'tokens_per_day";r=(\d+)', headers["ratelimit"])
    assert found, headers["ratelimit"]
    return int(found.group(1))


def sides(python_gateway: Side, nginx: Side) -> tuple[Side, Side]:
    return python_gateway, nginx


def test_a_conversation_is_made_grown_continued_and_deleted_through_the_sdk(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        client = sdk(side, side.key("acme", "free"))

        made = client.conversations.create(items=[ITEM], metadata={"side": side.name})
        assert record(side, "acme", made.id) == str(ITEM_TOKENS), side.name
        assert side.db.pttl(KeySchema(PREFIX).conversation("acme", made.id)) > TTL_MS - 60_000
        client.conversations.items.create(made.id, items=[ITEM])
        assert record(side, "acme", made.id) == str(2 * ITEM_TOKENS), side.name

        turn = client.responses.with_raw_response.create(
            model="gpt-3.5-turbo", input="and?", max_output_tokens=16, conversation=made.id
        )
        # The reservation held both items (⌈4/4⌉ of input, the cap of 16 besides).
        assert day_left(turn.headers) == DAY - (2 * ITEM_TOKENS + 1 + 16), side.name
        answer = turn.parse()
        assert answer.usage is not None
        assert record(side, "acme", made.id) == str(answer.usage.total_tokens)  # the turn's

        assert client.conversations.retrieve(made.id).metadata == {"side": side.name}
        updated = client.conversations.update(made.id, metadata={"side": "again"})
        assert updated.metadata == {"side": "again"}
        items = client.conversations.items.list(made.id, limit=10).data
        assert len(items) == 2
        first = items[0].id
        assert first is not None
        assert client.conversations.items.retrieve(first, conversation_id=made.id).id == first
        client.conversations.items.delete(first, conversation_id=made.id)
        assert fake.seen[-1].path == f"/v1/conversations/{made.id}/items/{first}"

        assert client.conversations.delete(made.id).deleted is True
        assert record(side, "acme", made.id) is None, side.name
        before = len(fake.seen)
        with pytest.raises(openai.NotFoundError) as refused:
            client.responses.create(model="gpt-3.5-turbo", input="and?", max_output_tokens=16,
                                    conversation=made.id)  # fmt: skip
        assert refused.value.code == "conversation_not_found"
        assert len(fake.seen) == before, side.name


def test_only_the_tenant_that_made_a_conversation_reaches_it(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """Every tenant reaches the model server with the one upstream key: forwarded, globex
    would read, change or delete acme's conversation. 404 on every route, in the words an id
    never made gets, and nothing reaches the model server."""
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        made = sdk(side, side.key("acme", "free")).conversations.create(
            items=[ITEM], metadata={"side": side.name}
        )
        mine = f"/v1/conversations/{made.id}"
        item = fake.conversation_items[made.id][0]["id"]
        globex = {"authorization": f"Bearer {side.key('globex', 'free')}"}
        before = len(fake.seen)
        calls: list[tuple[str, str, Any]] = [
            ("GET", mine, None),
            ("POST", mine, {"metadata": {}}),
            ("DELETE", mine, None),
            ("GET", f"{mine}/items", None),
            ("POST", f"{mine}/items", {"items": [ITEM]}),
            ("GET", f"{mine}/items/{item}", None),
            ("DELETE", f"{mine}/items/{item}", None),
            ("GET", "/v1/conversations/conv_never_made", None),
            ("GET", "/v1/conversations/conv.never:made+at=all~", None),  # every safe character
        ]
        for method, path, body in calls:
            answer = side.http.request(method, side.url + path, json=body, headers=globex)
            assert answer.status_code == 404, (side.name, method, path, answer.text)
            named = path.split("/")[3]
            expected = f"no conversation '{named}' for this API key"
            assert answer.json()["detail"] == expected, side.name
            assert answer.json()["type"].endswith("#unknown-conversation")
        envelope = side.http.get(side.url + mine, headers={**globex, "accept": "*/*"})
        error = envelope.json()["error"]
        assert (error["code"], error["param"]) == ("conversation_not_found", None)
        assert len(fake.seen) == before, f"{side.name} forwarded another tenant's call"
        assert record(side, "globex", made.id) is None
        assert record(side, "acme", made.id) == str(ITEM_TOKENS)  # not deleted, not grown
        assert made.id in fake.conversations


def raw_request(side: Side, method: str, target: str, key: str) -> tuple[int, bytes]:
    """The status and whole answer of a request whose target goes as written (httpx would
    resolve dot segments before sending)."""
    host, _, port = side.url.removeprefix("http://").partition(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return int(answer.split(b" ")[1]), answer


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/conversations"),  # every conversation of the upstream key: every tenant's
        ("DELETE", "/v1/conversations"),
        ("PUT", "/v1/conversations/conv_0123"),
        ("PATCH", "/v1/conversations/conv_0123/items"),
        ("GET", "/v1/conversations/conv_0123/turns"),
        ("GET", "/v1/conversations/conv_0123/items/msg_1/more"),
        ("GET", "/v1/conversations/conv_0123/items/bad%20item"),
        ("GET", "/v1/conversations/conv_0123//items"),
        ("GET", "/v1/conversations/"),
    ],
)
def test_what_is_no_call_of_the_api_is_refused_not_forwarded(
    method: str,
    path: str,
    python_gateway: Side,
    nginx: Side,
    upstream: tuple[FakeUpstream, ServerThread],
) -> None:
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        key = side.key("acme", "free")
        before = len(fake.seen)
        answer = side.http.request(
            method, side.url + path, headers={"authorization": f"Bearer {key}"}
        )
        assert answer.status_code == 404, (side.name, answer.text)
        assert answer.json()["type"].endswith("#unmetered-route"), (side.name, answer.text)
        assert len(fake.seen) == before, f"{side.name} forwarded {method} {path}"


def test_a_path_written_around_the_check_is_refused(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """nginx resolves `conv_mine/../conv_theirs` to the conversation it checks, and sent the
    target as written: refused, as `governor gateway` refuses a dot segment. An id that is no
    safe id is never quoted back, and never forwarded."""
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        key = side.key("acme", "free")
        mine = sdk(side, key).conversations.create(metadata={"side": side.name}).id
        before = len(fake.seen)
        odd = side.http.get(f"{side.url}/v1/conversations/conv%20x",
                            headers={"authorization": f"Bearer {key}"})  # fmt: skip
        assert odd.status_code == 404
        assert odd.json()["detail"] == "no conversation with that id for this API key"
        assert len(fake.seen) == before, side.name
        refused_as_written(side, fake, key, f"/v1/conversations/{mine}",
                           (f"/v1/conversations/conv_other/../{mine}",
                            f"/v1/conversations/{mine}/./items",
                            f"/v1/conversations//{mine}"))  # fmt: skip


def refused_as_written(
    side: Side, fake: FakeUpstream, key: str, mine: str, targets: tuple[str, ...]
) -> None:
    """Each of `targets` (a path written around the check) is the gateway's 404, never
    forwarded; `mine`, the same path written with an escape, is served."""
    before = len(fake.seen)
    for target in targets:
        status, answer = raw_request(side, "GET", target, key)
        # The gateway's refusal (a model server that does not resolve the dot segment
        # answers 404 too, but only once the request reached it).
        assert (status, b"#unmetered-route" in answer) == (404, True), (side.name, target)
    assert len(fake.seen) == before, side.name
    escaped = mine.replace("_", "%5F")  # the same path, escaped
    served = side.http.get(side.url + escaped, headers={"authorization": f"Bearer {key}"})
    assert served.status_code == 200, (side.name, served.text)


def test_calls_of_the_api_are_admitted_against_no_rate_or_budget(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """They are no model work (as GET /v1/models): a tenant whose day is spent still makes
    and reads its conversations, and 15 in a minute on a 10-a-minute plan count nothing."""
    for side in sides(python_gateway, nginx):
        key = side.key("spender", "free")
        spent = side.chat(key, chat_body(max_tokens=990), **{"x-fake-tokens": "990"})
        assert spent.status_code == 200
        assert side.chat(key).status_code == 402  # the day is spent
        state = side.db.hgetall(f"{PREFIX}:{{t:spender}}:enforce")
        client = sdk(side, key)
        made = client.conversations.create(items=[ITEM], metadata={"spent": side.name})
        for _ in range(14):
            client.conversations.retrieve(made.id)
        assert side.db.hgetall(f"{PREFIX}:{{t:spender}}:enforce") == state, side.name
        with pytest.raises(openai.APIStatusError) as refused:  # a turn in it is model work
            client.responses.create(model="gpt-3.5-turbo", input="hi", max_output_tokens=5,
                                    conversation=made.id)  # fmt: skip
        assert refused.value.status_code == 402


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"items": {"type": "message"}}', "`items` must be a list of conversation items"),
        (b'{"items": "hi"}', "`items` must be a list of conversation items"),
        (b"[1]", "the request body must be a JSON object"),
        (b'{"items": [], "items": [1]}', "the request body names `items` twice"),
    ],
)
def test_items_the_gateway_cannot_count_are_a_bad_request(
    body: bytes,
    detail: str,
    python_gateway: Side,
    nginx: Side,
    upstream: tuple[FakeUpstream, ServerThread],
) -> None:
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        key = side.key("acme", "free")
        mine = sdk(side, key).conversations.create(metadata={"side": side.name}).id
        before = len(fake.seen)
        for path in ("/v1/conversations", f"/v1/conversations/{mine}/items"):
            answer = side.http.post(side.url + path, content=body,
                                    headers={"authorization": f"Bearer {key}"})  # fmt: skip
            assert answer.status_code == 400, (side.name, answer.text)
            assert answer.json()["detail"].startswith(detail), (side.name, answer.text)
        assert len(fake.seen) == before, side.name
        assert record(side, "acme", mine) == "0"


def test_nothing_is_recorded_when_the_model_server_refuses(
    python_gateway: Side, nginx: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    fake = upstream[0]
    for side in sides(python_gateway, nginx):
        key = side.key("acme", "free")
        auth = {"authorization": f"Bearer {key}"}
        failed = side.http.post(f"{side.url}/v1/conversations", json={"items": [ITEM]},
                                headers={**auth, "x-fake-status": "500"})  # fmt: skip
        assert failed.status_code == 500
        assert list(side.db.scan_iter(f"{PREFIX}:*:conversation:*")) == [], side.name
        mine = sdk(side, key).conversations.create(metadata={"side": side.name}).id
        del fake.conversations[mine]  # gone from the model server: it answers 404
        for method, path, body in (("POST", f"/v1/conversations/{mine}/items", {"items": [ITEM]}),
                                   ("DELETE", f"/v1/conversations/{mine}", None)):  # fmt: skip
            answer = side.http.request(method, side.url + path, json=body, headers=auth)
            assert answer.status_code == 404, (side.name, answer.text)
            assert record(side, "acme", mine) == "0", side.name  # neither grown nor forgotten


def test_a_created_answer_past_32_mib_passes_on_whole_and_records_nothing(
    python_gateway: Side, nginx: Side, nginx_session: NginxServer
) -> None:
    """A create's answer is decoded for the id it made, as a settling read's for its usage,
    up to 32 MiB (MAX_READ_ANSWER); nginx and Kong decoded whatever came, the Python gateway
    stopped at 1 MiB. Both now: an answer of exactly 32 MiB records the conversation, one
    byte more reaches the client whole, records nothing and says so once (no key)."""
    for side in sides(python_gateway, nginx):
        key = side.key("acme", "free")
        client = sdk(side, key).conversations.with_raw_response
        logged = len(nginx_session.error_log.read_text(errors="replace"))
        for size, records in ((MAX_READ_ANSWER + 1, False), (MAX_READ_ANSWER, True)):
            with capture_logs() as logs:
                made = client.create(items=[ITEM], metadata={"size": str(size)},
                                     extra_headers={"x-fake-size": str(size)})  # fmt: skip
            assert len(made.http_response.content) == size, side.name
            kept = record(side, "acme", made.parse().id)
            assert kept == (str(ITEM_TOKENS) if records else None), (side.name, size)
            said = [line for line in logs if "past the read cap" in line["event"]]
            if side.name == "python":
                assert len(said) == (0 if records else 1), (size, logs)
                assert key not in repr(logs)
        if side.name == "nginx":
            lines = nginx_session.error_log.read_text(errors="replace")[logged:].splitlines()
            said_nginx = [line for line in lines if "past the read cap" in line]
            assert len(said_nginx) == 1, lines
            assert "tenant acme, what conversation, action create" in said_nginx[0]
            assert key not in "\n".join(lines)


@pytest.fixture
def shared_sides(
    tmp_path: Path,
    redis_nginx: RedisServer,
    redis_python: RedisServer,
    upstream: tuple[FakeUpstream, ServerThread],
    export_dir: Path,
    policy_dir: Path,
) -> Iterator[tuple[Side, Side]]:
    """Both gateways with `previous_response_scope` shared, each on its flushed Redis."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "GOVERNOR_REDIS__URL": redis_nginx.url,
        "GOVERNOR_GATEWAY__API_KEY_SECRET": SECRET,
    }
    server = NginxServer(tmp_path / "nginx", export_dir, upstream[1].port, env,
                         init_options='previous_response_scope = "shared"')  # fmt: skip
    with redis_nginx.client() as nginx_db, redis_python.client() as python_db:
        for db in (nginx_db, python_db):
            db.flushall()
            write_limits(db, PREFIX, policy_dir)
        server.start()
        gateway: Gateway = start_gateway(redis_python.url, upstream[1].url,
                                         retry_after_jitter=0.0,
                                         previous_response_scope="shared")  # fmt: skip
        accept = {"accept": "application/problem+json"}
        try:
            with httpx.Client(timeout=30.0, headers=accept) as http:
                yield (Side("python", gateway.url, python_db, gateway.http),
                       Side("nginx", server.url, nginx_db, http))  # fmt: skip
        finally:
            gateway.stop()
            server.stop()


def test_shared_scope_forwards_another_tenants_conversation_and_records_nothing_for_it(
    shared_sides: tuple[Side, Side], upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """`shared` (documented: tenants can then read each other's conversations): any tenant's
    call is forwarded; a create is still recorded for its tenant; an add by another tenant
    makes it no record of its own (a turn of its then reserves the default, never the items
    alone), nor does it grow the owner's."""
    for side in shared_sides:
        made = sdk(side, side.key("acme", "free")).conversations.create(
            items=[ITEM], metadata={"shared": side.name}
        )
        assert record(side, "acme", made.id) == str(ITEM_TOKENS)
        globex = sdk(side, side.key("globex", "free"))
        assert globex.conversations.retrieve(made.id).id == made.id  # forwarded: shared
        globex.conversations.items.create(made.id, items=[ITEM])
        assert record(side, "globex", made.id) is None, side.name
        assert record(side, "acme", made.id) == str(ITEM_TOKENS), side.name
        assert upstream[0].conversations[made.id] > 0
