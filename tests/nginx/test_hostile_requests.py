"""Hostile inputs through the nginx module and `governor gateway` alike: numbers a double
cannot count, nesting past any parser's depth, and plan catalog entries the controller never
writes are refused and never reach the model server."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from controller.gateway.keys import digest
from controller.gateway.openai import BAD_MODEL, ModelRequest
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.nginx.conftest import (
    PREFIX,
    SECRET,
    Side,
    chat_body,
    set_limit,
    tenant_state,
    wait_settled,
)

PLAN_REFRESH_SECONDS = 5.0  # PlanCatalog's and the exported module's default

pytestmark = pytest.mark.integration

MESSAGES = b'"messages":[{"role":"user","content":"hi"}]'
# On the free plan (1,000 tokens a day) each of these asks for far more than the budget.
OVER_THE_BUDGET = {
    "max_tokens 1e30": b'{"model":"gpt-3.5-turbo",' + MESSAGES + b',"max_tokens":1e30}',
    "max_tokens 10^30": b'{"model":"gpt-3.5-turbo",'
    + MESSAGES
    + b',"max_tokens":'
    + b"1"
    + b"0" * 30
    + b"}",
    "max_tokens Infinity": b'{"model":"gpt-3.5-turbo",' + MESSAGES + b',"max_tokens":Infinity}',
    "max_tokens NaN": b'{"model":"gpt-3.5-turbo",' + MESSAGES + b',"max_tokens":NaN}',
    "n 10^30": b'{"model":"gpt-3.5-turbo",'
    + MESSAGES
    + b',"max_tokens":5,"n":'
    + b"1"
    + b"0" * 30
    + b"}",
    "max_completion_tokens 1e300": b'{"model":"gpt-3.5-turbo",'
    + MESSAGES
    + b',"max_completion_tokens":1e300,"n":1e300}',
}


@pytest.mark.parametrize("name", sorted(OVER_THE_BUDGET))
def test_a_count_past_what_a_double_holds_is_refused_by_the_budget(
    name: str, nginx: Side, python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    fake = upstream[0]
    for index, side in enumerate((python_gateway, nginx)):
        seen = len(fake.seen)
        key = side.key(f"hostile{index}", "free")
        answer = side.chat(key, OVER_THE_BUDGET[name])
        # Python refuses a count that is no positive integer (400, as OpenAI does) or one that
        # can never fit the day (400); nginx holds it at 2^53 and the budget refuses (402).
        # Either way it is refused and never reaches the model server.
        assert answer.status_code in (400, 402), (side.name, answer.status_code, answer.text)
        assert answer.headers["content-type"] == "application/problem+json", side.name
        assert len(fake.seen) == seen, f"{side.name} sent {name} on to the model server"


def test_nesting_past_the_parsers_depth_is_a_bad_request(
    nginx: Side, python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    fake = upstream[0]
    deep = b'{"model":"gpt-3.5-turbo","messages":' + b"[" * 5000 + b"]" * 5000 + b"}"
    for side in (python_gateway, nginx):
        seen = len(fake.seen)
        answer = side.chat(side.key("nested", "free"), deep)
        assert answer.status_code == 400, (side.name, answer.status_code, answer.text[:300])
        assert "nest" in answer.json()["detail"], (side.name, answer.text[:300])
        assert len(fake.seen) == seen


def test_content_nested_deeper_than_python_counts_is_a_bad_request(
    python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """JSON Python decodes but cannot count (900 levels of content) is a 400, not a 500."""
    fake = upstream[0]
    content = b"[" * 900 + b"]" * 900
    body = b'{"model":"gpt-3.5-turbo","messages":[{"role":"user","content":' + content + b"}]}"
    seen = len(fake.seen)
    answer = python_gateway.chat(python_gateway.key("nested", "free"), body)
    assert answer.status_code == 400, answer.text[:300]
    assert answer.json()["detail"] == "the request body is not JSON: it nests too deep"
    assert len(fake.seen) == seen


# Entries the controller never writes (PlanInfo.to_json writes all four fields): each must
# name no plan, never one whose empty models list lets any model through.
BROKEN_ENTRIES: dict[str, object] = {
    "models-text": {"models": "gpt-3.5-turbo", "fail_mode": "closed"},
    "models-null": {"models": None, "fail_mode": "closed"},
    "models-object": {"models": {"gpt-3.5-turbo": 1}, "fail_mode": "closed"},
    "models-numbers": {"models": [1, 2], "fail_mode": "closed"},
    "models-left-out": {"fail_mode": "closed", "degrade": None, "credits": None},
    "fail-mode-left-out": {"models": [], "degrade": None, "credits": None},
    "fail-mode-odd": {"models": [], "fail_mode": "OPEN"},
    "empty": {},
    "a-list": [],
    "degrade-text": {"models": [], "fail_mode": "closed", "degrade": {"max_tokens": "abc"}},
    "degrade-list": {"models": [], "fail_mode": "closed", "degrade": [1]},
    "credits-text": {"models": [], "fail_mode": "closed", "credits": "lots"},
    "a-number": 5,
}


def test_a_catalog_entry_the_controller_never_writes_names_no_plan(
    nginx: Side, python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    fake = upstream[0]
    for side in (python_gateway, nginx):
        entries: dict[str | bytes, bytes | float | int | str] = {
            plan: json.dumps(entry) for plan, entry in BROKEN_ENTRIES.items()
        }
        side.db.hset(f"{PREFIX}:plans", mapping=entries)
    time.sleep(PLAN_REFRESH_SECONDS + 0.5)  # both gateways reread the catalog by then
    for side in (python_gateway, nginx):
        for plan in BROKEN_ENTRIES:
            seen = len(fake.seen)
            answer = side.chat(side.key("acme", plan), chat_body(model="gpt-4"))
            assert answer.status_code == 403, (side.name, plan, answer.text[:300])
            assert answer.json()["type"].endswith("#unknown-plan"), (side.name, plan)
            assert len(fake.seen) == seen, f"{side.name} served plan {plan} unrestricted"


@pytest.mark.parametrize("stored", ["abc", "", "nan", "inf", "-1", "1e400", "0x10"])
def test_a_limit_value_governor_never_writes_sheds_instead_of_lifting_the_limit(
    stored: str, nginx: Side, python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """Ignored, such a value served the plan with no budget (and no rate) at all."""
    fake = upstream[0]
    answers = {}
    for side in (python_gateway, nginx):
        side.db.hset(f"{PREFIX}:limits:plan:free", "tokens_per_day", stored)
        side.db.incr(f"{PREFIX}:version")  # gateways read the limits again at once
        seen = len(fake.seen)
        answers[side.name] = side.chat(side.key("acme", "free"), chat_body(max_tokens=5000))
        assert len(fake.seen) == seen, f"{side.name} served past a broken limit"
    for name, answer in answers.items():
        assert answer.status_code == 503, (name, answer.text[:300])
        problem = answer.json()
        assert problem["type"].endswith("#temporary-reduced-capacity"), (name, problem)
        assert problem["violated-policies"] == ["plan/free/tokens_per_day"], (name, problem)


ONE_CREDENTIAL = (
    "send one credential: {} holds several (a repeated header, or a list); the gateway will "
    "not pick one of them"
)


TWO_HEADERS = (
    "send one credential: Authorization and x-api-key hold different ones; the gateway will "
    "not pick one of them"
)

# nginx's Lua read only the first 100 header lines: a second credential after 100 others
# went unseen, and nginx picked the first where the Python gateway refused both.
FILLER = [(f"x-filler-{i}", "f") for i in range(100)]


@pytest.mark.parametrize(
    "how",
    [
        "two x-api-key lines",
        "a list in x-api-key",
        "a list in Bearer",
        "after 100 lines",
        "Bearer and x-api-key",
    ],
)
def test_two_credentials_in_one_request_are_refused_not_picked_from(
    how: str, nginx: Side, python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """The Python gateway took the last x-api-key line, nginx the first: one request spent
    another tenant's limits depending on the gateway it met (paid may call gpt-4, free not)."""
    fake = upstream[0]
    for side in (python_gateway, nginx):
        free, paid = side.key("payer-free", "free"), side.key("payer-paid", "paid")
        headers = {
            "two x-api-key lines": [("x-api-key", free), ("x-api-key", paid)],
            "a list in x-api-key": [("x-api-key", f"{free}, {paid}")],
            "a list in Bearer": [("authorization", f"Bearer {paid},{free}")],
            "after 100 lines": [("x-api-key", free), *FILLER, ("x-api-key", paid)],
            # Both gateways took Authorization and left x-api-key unread.
            "Bearer and x-api-key": [("authorization", f"Bearer {paid}"), ("x-api-key", free)],
        }[how]
        seen = len(fake.seen)
        answer = side.http.post(
            f"{side.url}/v1/chat/completions", json=chat_body(model="gpt-4"), headers=headers
        )
        header = "Authorization" if how == "a list in Bearer" else "x-api-key"
        expected = TWO_HEADERS if how == "Bearer and x-api-key" else ONE_CREDENTIAL.format(header)
        assert answer.status_code == 401, (side.name, answer.status_code, answer.text[:300])
        assert answer.json()["detail"] == expected, side.name
        assert len(fake.seen) == seen, f"{side.name} served a request carrying two keys"
        assert not side.db.keys(f"{PREFIX}:{{t:payer-*}}:*"), side.name  # nothing counted


def test_the_same_key_in_authorization_and_x_api_key_is_one_credential(
    nginx: Side, python_gateway: Side
) -> None:
    for side in (python_gateway, nginx):
        key = side.key("twice", "free")
        answer = side.chat(key, **{"x-api-key": key})
        assert answer.status_code == 200, (side.name, answer.text[:300])


# Bytes around a valid key that HTTP does not trim (only spaces and tabs are optional white
# space, RFC 9110 §5.6.3). Python's str.strip() took these for white space and served the
# key, where nginx refused it: the same request was served by one gateway alone.
ODD_BYTES = {"NBSP": b"\xa0", "NEL": b"\x85", "FS": b"\x1c", "US": b"\x1f"}


@pytest.mark.parametrize("name", sorted(ODD_BYTES))
@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_a_key_with_bytes_http_does_not_trim_is_refused_by_both(
    name: str, header: str, nginx: Side, python_gateway: Side,
    upstream: tuple[FakeUpstream, ServerThread],
) -> None:  # fmt: skip
    fake = upstream[0]
    for side in (python_gateway, nginx):
        key = side.key("oddbytes", "free").encode()
        for sent in (key + ODD_BYTES[name], ODD_BYTES[name] + key):
            value = b"Bearer " + sent if header == "authorization" else sent
            seen = len(fake.seen)
            answer = side.http.post(
                f"{side.url}/v1/chat/completions",
                json=chat_body(),
                headers={header.encode(): value},
            )
            assert answer.status_code == 401, (side.name, sent, answer.text[:300])
            assert answer.json()["detail"] in {
                "unknown or revoked API key",
                "not a Governor API key (gov_…); JWT auth is not configured",
            }, (side.name, sent)
            assert len(fake.seen) == seen, f"{side.name} served {sent!r}"


# Key records written by hand (a migration script, an edit), each with the right digest.
UNUSABLE_RECORDS: dict[str, dict[str, object]] = {
    "tenant opening a hash tag": {"tenant": "acme}x", "plan": "free"},
    "tenant with ':' and '*'": {"tenant": "a:*", "plan": "free"},
    "tenant of 300 characters": {"tenant": "a" * 300, "plan": "free"},
    "user with '/'": {"tenant": "acme", "plan": "free", "user": "a/b"},
    "user that is a number": {"tenant": "acme", "plan": "free", "user": 5},
    "user that is empty": {"tenant": "acme", "plan": "free", "user": ""},
}


@pytest.mark.parametrize("name", sorted(UNUSABLE_RECORDS))
def test_a_key_record_with_an_unsafe_id_authenticates_nobody(
    name: str, nginx: Side, python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """The Python gateway answered 500 for most of these, and served an empty user with no
    user level; nginx served a user that is a number with no user level."""
    fake = upstream[0]
    key_id = "00000000000000ff"
    key = f"gov_{key_id}_" + "A" * 43
    record = {"key_id": key_id, "digest": digest(key, SECRET), "created_at": 1.0, "name": None}
    record.update({"user": None, **UNUSABLE_RECORDS[name]})
    for side in (python_gateway, nginx):
        side.db.hset(f"{PREFIX}:apikeys", key_id, json.dumps(record))
        seen = len(fake.seen)
        answer = side.chat(key)
        assert answer.status_code == 401, (side.name, answer.status_code, answer.text[:300])
        assert answer.json()["detail"] == "unknown or revoked API key", side.name
        assert len(fake.seen) == seen, f"{side.name} served a key record with {name}"


# Model names a caller on a plan that lists no models (any model) could send: each became a
# key of the gateways' limit caches and a label of the Python gateway's metrics, so three
# requests of a megabyte of name made /metrics 15 MB (a scrape Prometheus gives up on: the
# controller's signals go blind); a newline or NUL reached both as it was.
HOSTILE_MODELS = {
    "a megabyte": "m" + "x" * 1_000_000,
    "257 characters": "x" * 257,
    "a line break": 'gpt-4\r\n{"event":"limit.changed"}',
    "NUL": "gpt-4\u0000",
    "ESC": "\x1b[2Jgpt-4",
    "C1 NEL": "gpt-4\u0085x",
}


@pytest.mark.parametrize("name", list(HOSTILE_MODELS))
def test_a_model_name_no_limit_or_label_can_hold_is_a_bad_request(
    name: str, nginx: Side, python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    fake = upstream[0]
    model = HOSTILE_MODELS[name]
    for side in (python_gateway, nginx):
        seen = len(fake.seen)
        answer = side.chat(side.key("anymodel", "metered"), chat_body(model))
        assert answer.status_code == 400, (side.name, answer.status_code, answer.text[:300])
        assert answer.json()["detail"] == BAD_MODEL, side.name
        assert len(fake.seen) == seen, f"{side.name} sent a model named by {name} on"
    exposition = python_gateway.http.get(f"{python_gateway.url}/metrics").text
    assert len(exposition) < 200_000
    assert model not in exposition


def test_a_model_name_of_256_characters_of_any_script_is_served(
    nginx: Side, python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    model = "é" * 255 + "✓"  # 256 characters, 513 bytes of UTF-8
    for side in (python_gateway, nginx):
        answer = side.chat(side.key("anymodel", "metered"), chat_body(model))
        assert answer.status_code == 200, (side.name, answer.status_code, answer.text[:300])


UNMETERED_ROUTE = (
    "this gateway serves POST /v1/chat/completions, /v1/completions, /v1/embeddings and "
    "/v1/responses (metered), GET /v1/models, the Conversations API (a tenant's own "
    "/v1/conversations) and a tenant's own stored responses (/v1/responses/{id}); any other "
    "route could spend model work that no limit counts, so it is not forwarded"
)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/rerank"),
        ("POST", "/v1/score"),
        ("GET", "/v1/responses"),
        ("POST", "/v1/audio/transcriptions"),
        ("GET", "/v1/chat/completions"),
        ("DELETE", "/v1/models/gpt-3.5-turbo"),
        ("POST", "/v1/models"),
    ],
)
def test_a_route_neither_metered_nor_passed_is_refused_not_forwarded_uncounted(
    method: str,
    path: str,
    nginx: Side,
    python_gateway: Side,
    upstream: tuple[FakeUpstream, ServerThread],
) -> None:
    """Both gateways forwarded every route but the ones they meter, uncounted: a tenant
    whose budget was spent (402 on chat) still had the model server answer POST /v1/score or
    /v1/responses (vLLM serves them; /v1/responses is metered now), with no limit, budget or
    credit counting it."""
    fake = upstream[0]
    body = b'{"model":"gpt-3.5-turbo","input":"hi","max_tokens":5000}'
    for side in (python_gateway, nginx):
        key = side.key("spent", "free")
        used = side.chat(key, chat_body(max_tokens=990), **{"x-fake-tokens": "990"})
        assert used.status_code == 200, (side.name, used.text[:300])  # most of the 1,000
        spent = side.chat(key)
        assert spent.status_code == 402, (side.name, spent.text[:300])
        seen = len(fake.seen)
        answer = side.http.request(
            method, f"{side.url}{path}", content=body, headers={"authorization": f"Bearer {key}"}
        )
        assert answer.status_code == 404, (side.name, answer.status_code, answer.text[:300])
        assert answer.headers["content-type"] == "application/problem+json", side.name
        problem = answer.json()
        assert problem["type"].endswith("#unmetered-route"), (side.name, problem)
        assert problem["detail"] == UNMETERED_ROUTE, side.name
        assert len(fake.seen) == seen, f"{side.name} forwarded {method} {path} uncounted"
        models = side.http.get(f"{side.url}/v1/models", headers={"authorization": f"Bearer {key}"})
        assert models.status_code == 200, (side.name, models.text[:300])  # still passed


@pytest.mark.parametrize("stream", ["1", '"true"', '"yes"', "{}"])
def test_a_stream_flag_that_is_no_boolean_is_a_bad_request(
    stream: str, nginx: Side, python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """`"stream": 1` streamed from a model server that reads it as true (vLLM's pydantic
    does), while both gateways read it as false: no usage event asked for, the SSE answer
    read as a broken JSON document, the completion settled as 0 tokens. A free-plan tenant
    was charged ~10 tokens a request for up to 900 generated."""
    fake = upstream[0]
    body = (
        b'{"model":"gpt-3.5-turbo",' + MESSAGES + b',"max_tokens":900,"stream":' + stream.encode()
    )
    for side in (python_gateway, nginx):
        key = side.key("streamer", "free")
        seen = len(fake.seen)
        answer = side.chat(key, body + b"}", **{"x-fake-tokens": "900"})
        assert answer.status_code == 400, (side.name, answer.status_code, answer.text[:300])
        assert answer.json()["detail"] == f"`stream` must be true or false, not {stream}", side.name
        assert len(fake.seen) == seen, f"{side.name} sent stream={stream} on to the model server"
    for side in (python_gateway, nginx):  # a real boolean, or none, still passes
        for flag in (b"true", b"false", b"null"):
            plain = b'{"model":"gpt-3.5-turbo",' + MESSAGES + b',"max_tokens":5,"stream":' + flag
            answer = side.chat(side.key("streamer", "free"), plain + b"}")
            assert answer.status_code == 200, (side.name, flag, answer.text[:300])


def _send_raw(side: Side, key: str, body: bytes, headers: dict[str, str]) -> socket.socket:
    """Send a request on a raw connection, reading nothing; the caller closes it."""
    host, _, port = side.url.removeprefix("http://").partition(":")
    lines = [
        "POST /v1/chat/completions HTTP/1.1", f"Host: {host}", f"Authorization: Bearer {key}",
        "Content-Type: application/json", f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]  # fmt: skip
    connection = socket.create_connection((host, int(port)))
    connection.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
    return connection


def test_a_client_gone_before_a_whole_answer_still_pays_for_it(
    nginx: Side, python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """The Python gateway read no byte of a non-streamed answer whose client had closed the
    connection while the model generated it (Starlette's response stops at the disconnect)
    and settled it as the prompt alone: 900 tokens generated, 5 charged. nginx fetches the
    whole answer first, so it charged it all."""
    fake = upstream[0]
    body = json.dumps(chat_body(max_tokens=900)).encode()
    fake_headers = {"x-fake-tokens": "900", "x-fake-delay": "0.2"}
    for side in (python_gateway, nginx):
        set_limit(side, "tenant/leaver/tokens_per_day", 100_000)
        key = side.key("leaver", "paid")
        stayed = side.chat(key, body, **fake_headers)
        assert stayed.status_code == 200, (side.name, stayed.text[:300])
        cost = stayed.json()["usage"]["total_tokens"]
        assert tenant_state(side, "leaver")["u|tokens_per_day"] == str(cost), side.name
        seen = len(fake.seen)
        for _ in range(20):  # the client leaves at once, before any answer
            _send_raw(side, key, body, fake_headers).close()
            time.sleep(0.1)
        deadline = time.monotonic() + 10.0
        while tenant_state(side, "leaver").get("v|tokens_per_day") != "0":
            assert time.monotonic() < deadline, f"{side.name} never settled the requests"
            time.sleep(0.05)
        answered = len(fake.seen) - seen  # a request whose body was not read is not sent on
        assert answered > 0, side.name
        state = tenant_state(side, "leaver")
        assert state["u|tokens_per_day"] == str((1 + answered) * cost), (side.name, answered, cost)


COMPLETION = b'{"model":"gpt-3.5-turbo","prompt":"hi"'


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", COMPLETION + b',"max_completion_tokens":1,"max_tokens":5000}'),
        ("/v1/chat/completions", b'{"model":"gpt-3.5-turbo",' + MESSAGES
         + b',"max_completion_tokens":1,"max_tokens":5000}'),
    ],
    ids=["completion", "chat"],
)  # fmt: skip
def test_the_larger_output_cap_is_reserved_not_the_one_the_model_server_ignores(
    path: str,
    body: bytes,
    nginx: Side,
    python_gateway: Side,
    upstream: tuple[FakeUpstream, ServerThread],
) -> None:
    """Both gateways reserved `max_completion_tokens: 1`, which a completions request does not
    have (vLLM generates up to its `max_tokens`): 3,000 tokens served on a 1,000-token day.
    A chat server may honour either name, so the larger one is the worst case."""
    fake = upstream[0]
    for side in (python_gateway, nginx):
        seen = len(fake.seen)
        answer = side.http.post(
            f"{side.url}{path}",
            content=body,
            headers={
                "authorization": f"Bearer {side.key('capper', 'free')}",
                "x-fake-tokens": "3000",
            },
        )
        assert answer.status_code == 400, (side.name, answer.status_code, answer.text[:300])
        assert answer.json()["type"].endswith("#request-too-large"), side.name
        assert len(fake.seen) == seen, f"{side.name} reserved the cap the model server ignores"


def test_a_completion_capped_only_by_max_completion_tokens_gets_max_tokens_written_in(
    nginx: Side, python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """Without `max_tokens`, a completions model server generates to its own default (the
    context's end on some): the gateway's default, lowered to what the day holds, goes in."""
    fake = upstream[0]
    for side in (python_gateway, nginx):
        answer = side.http.post(
            f"{side.url}/v1/completions",
            content=COMPLETION + b',"max_completion_tokens":1}',
            headers={
                "authorization": f"Bearer {side.key('capper', 'free')}",
                "x-fake-tokens": "3000",
            },
        )
        assert answer.status_code == 200, (side.name, answer.status_code, answer.text[:300])
        forwarded = fake.last().body or {}
        assert forwarded["max_tokens"] == int(answer.headers["x-governor-max-tokens"]), side.name
        # Generation stopped at the day's tokens, not at the 3,000 the model server would give.
        assert answer.json()["usage"]["completion_tokens"] == forwarded["max_tokens"] < 1000


def test_a_completions_batch_reserves_max_tokens_for_every_prompt(
    nginx: Side, python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """A list of prompts is answered prompt by prompt (OpenAI's legacy API, vLLM), yet both
    gateways reserved max_tokens × n once: 50 prompts × 100 tokens were served on a
    1,000-token day for a reservation of 150."""
    fake = upstream[0]
    batch = json.dumps({"model": "gpt-3.5-turbo", "prompt": ["a"] * 50, "max_tokens": 100})
    for side in (python_gateway, nginx):
        key = side.key("batcher", "free")
        seen = len(fake.seen)
        answer = side.http.post(
            f"{side.url}/v1/completions",
            content=batch.encode(),
            headers={"authorization": f"Bearer {key}", "x-fake-tokens": "100"},
        )
        assert answer.status_code == 400, (side.name, answer.status_code, answer.text[:300])
        assert answer.json()["type"].endswith("#request-too-large"), side.name
        assert len(fake.seen) == seen, f"{side.name} served a batch past the day's tokens"
        # Without max_tokens, the default is lowered so that every prompt's answer fits.
        answer = side.http.post(
            f"{side.url}/v1/completions",
            json={"model": "gpt-3.5-turbo", "prompt": ["a", "b", "c", "d"]},
            headers={"authorization": f"Bearer {key}", "x-fake-tokens": "5000"},
        )
        assert answer.status_code == 200, (side.name, answer.status_code, answer.text[:300])
        each = int(answer.headers["x-governor-max-tokens"])
        assert (fake.last().body or {})["max_tokens"] == each, side.name
        assert answer.json()["usage"]["completion_tokens"] == 4 * each < 1000, side.name


def test_an_answer_too_big_to_read_is_charged_its_reservation_not_its_prompt(
    nginx: Side, python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """Past 32 MiB both gateways stop reading a non-streamed answer and settled the prompt
    estimate alone: asking for logprobs (about 1 KiB a token) made 900 generated tokens cost
    a handful. Its usage unread, it is charged what it was admitted for."""
    body = json.dumps(chat_body(max_tokens=900)).encode()
    fake_headers = {"x-fake-tokens": "900", "x-fake-pad": str(33 * 1024 * 1024)}
    for side in (python_gateway, nginx):
        set_limit(side, "tenant/verbose/tokens_per_day", 100_000)
        key = side.key("verbose", "paid")
        answer = side.chat(key, body, **fake_headers)
        assert answer.status_code == 200, (side.name, answer.status_code, answer.text[:300])
        assert answer.json()["usage"]["completion_tokens"] == 900
        wait_settled(side, "verbose", answer.headers["x-governor-request-id"])
        charged = int(tenant_state(side, "verbose")["u|tokens_per_day"])
        assert charged >= 900, (side.name, charged)


@pytest.mark.parametrize(
    ("case", "extra", "fake_headers"),
    [
        ("cut off mid-body", {}, {"x-fake-cut": "60"}),
        ("garbled", {}, {"x-fake-cut": "0"}),
        ("a stream answered as one document", {"stream": True}, {"x-fake-ignore-stream": "1"}),
    ],
)
def test_an_answer_whose_usage_cannot_be_read_is_not_charged_the_prompt_alone(
    nginx: Side, python_gateway: Side, case: str, extra: dict[str, Any],
    fake_headers: dict[str, str],
) -> None:  # fmt: skip
    """Both gateways settled an unreadable 200 (a body the model server broke off, or one
    JSON document sent for a stream request, whose meter looked for `data:` lines) as the
    prompt estimate alone. A cut or garbled answer now costs its reservation; a document
    sent for a stream is read as the document it is (its `usage`)."""
    body = json.dumps(chat_body(max_tokens=300, **extra)).encode()
    for side in (python_gateway, nginx):
        tenant = f"unread{len(case)}"
        set_limit(side, f"tenant/{tenant}/tokens_per_day", 100_000)
        key = side.key(tenant, "paid")
        answer = side.chat(key, body, **{"x-fake-tokens": "200", **fake_headers})
        assert answer.status_code == 200, (side.name, case, answer.status_code)
        wait_settled(side, tenant, answer.headers["x-governor-request-id"])
        charged = int(tenant_state(side, tenant)["u|tokens_per_day"])
        if "stream" in extra:
            assert charged == answer.json()["usage"]["total_tokens"], (side.name, charged)
        else:
            assert charged >= 300, (side.name, case, charged)  # the reservation, at least


def test_ids_that_meet_once_joined_never_share_a_limit_or_a_key(
    nginx: Side, python_gateway: Side
) -> None:
    """Tenant `a` with user `b:c` and tenant `a:b` with user `c` join to the same text with
    ':' between them; the key schema escapes ':' (`%3A`) and keeps each tenant under its own
    hash tag, so one's user limit, once spent, leaves the other's untouched."""
    for side in (python_gateway, nginx):
        set_limit(side, "user/a/b:c/requests_per_minute", 1)
        set_limit(side, "user/a:b/c/requests_per_minute", 1)
        first, second = side.key("a", "free", "b:c"), side.key("a:b", "free", "c")
        assert side.chat(first).status_code == 200, side.name
        spent = side.chat(first)
        assert spent.status_code == 429, (side.name, spent.text[:300])
        assert spent.json()["detail"].startswith("user/a/b:c/requests_per_minute "), side.name
        assert side.chat(second).status_code == 200, side.name  # its own limit, still whole
        assert side.chat(second).status_code == 429, side.name
        users = sorted(side.db.scan_iter(f"{PREFIX}:*user*:enforce"))
        assert users == [f"{PREFIX}:{{t:a%3Ab}}:user:c:enforce",
                         f"{PREFIX}:{{t:a}}:user:b%3Ac:enforce"], side.name  # fmt: skip


def test_a_prompt_the_estimate_undercounts_overruns_the_day_only_by_that_much(
    nginx: Side, python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    """The reservation's prompt is an estimate (⌈characters ÷ 4⌉ + 4 a message): a prompt the
    model server counts higher is settled above what was reserved, so requests racing the end
    of a day can together spend past it — by what their prompts were under-counted, not more:
    the next request is refused 402 (docs/enforcement.md, "Budgets"). Here the fake counts
    "hi" as 10 tokens where both gateways reserve 5."""
    chat = json.dumps(chat_body(max_tokens=30)).encode()
    reserved = ModelRequest.parse("chat", chat, 1024).worst_case_tokens
    for side in (python_gateway, nginx):
        key = side.key("racer", "free")
        first = side.chat(key, chat_body(max_tokens=850), **{"x-fake-tokens": "850"})
        assert first.status_code == 200, (side.name, first.text)
        spent = first.json()["usage"]["total_tokens"]
        left = 1000 - spent
        knobs = {"x-fake-tokens": "30", "x-fake-delay": "0.3"}
        with ThreadPoolExecutor(16) as pool:
            sent = [pool.submit(side.chat, key, chat, **knobs) for _ in range(16)]
            answers = [each.result() for each in sent]
        served = [a.json()["usage"]["total_tokens"] for a in answers if a.status_code == 200]
        assert len(served) == left // reserved, side.name  # every hold fitted the day
        assert sorted({a.status_code for a in answers}) == [200, 402], [
            (side.name, a.status_code, a.text) for a in answers if a.status_code not in (200, 402)
        ]  # nginx answered some 503 not-configured here (the catalog race, test_catalog_race)
        settled = int(tenant_state(side, "racer")["u|tokens_per_day"])
        assert settled == spent + sum(served), side.name
        overrun = settled - 1000
        assert 0 < overrun <= sum(used - reserved for used in served), (side.name, overrun)
        assert side.chat(key, chat_body(max_tokens=1)).status_code == 402, side.name
