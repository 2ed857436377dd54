"""The same requests through deploy/nginx/ (a real nginx) and through `governor gateway`'s app,
each on a fresh Redis with the same limits: the same answers (status, headers, bodies), the
same requests reaching the model server, and the same books in Redis afterwards."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from controller.contract.enforcement import EnforcementKeys
from controller.gateway.background import REASON as BACKGROUND_REASON
from controller.gateway.credits import CreditLedger
from tests.gateway.fake_upstream import (
    FakeUpstream,
    ServerThread,
    conversation_id,
    response_id,
)
from tests.nginx.conftest import PREFIX, UNKNOWN_KEY, Side, chat_body, set_limit, wait_settled

pytestmark = pytest.mark.integration

# Who calls: name → (tenant, plan). "small" gets a 30-token budget, "rich" $1 of credits.
CALLERS = {
    "free": ("acme", "free"),
    "small": ("globex", "free"),
    "paid": ("initech", "paid"),
    "broke": ("hooli", "enterprise"),
    "rich": ("umbrella", "enterprise"),
    "platinum": ("wonka", "platinum"),  # a key on a plan no `kind: Plan` defines
    "metered": ("stark", "metered"),  # a spent budget is OpenAI's 429 insufficient_quota
    "trial": ("wayne", "free"),  # sends no max_tokens
    "models": ("cyberdyne", "metered"),  # any model; one request a minute for two of them
    "converse": ("soylent", "free"),  # continues its Responses answers
    "talk": ("initrode", "free"),  # makes a conversation through the Conversations API
}
HF_MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # as vLLM serves it by default
NO_MAX_TOKENS = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]}
PROBLEM = {"accept": "application/problem+json"}  # else OpenAI's error envelope
# Headers that differ by nature: the server's own, framing, and the random reservation id.
VOLATILE = {"date", "server", "content-length", "connection", "keep-alive", "transfer-encoding",
            "x-governor-request-id"}  # fmt: skip
# Numbers that depend on when each side ran: seconds (GCRA waits, the budget's reset hint)
# and what a refilling quota has left (600/minute refills one request every 100 ms, so the
# two sides, run one after the other, may see one more or less). Compared within ±1.
TIMED = re.compile(r"(;t=|;r=|retry in )(\d+)")
DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?")


@dataclass
class Step:
    """One request: who sends it (a caller, or raw headers) and what."""

    name: str
    caller: str | None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    path: str = "/v1/chat/completions"
    method: str = "POST"


def sequence() -> list[Step]:
    steps = [
        Step("no credential", None),
        Step("unknown key", None, headers={"authorization": f"Bearer {UNKNOWN_KEY}"}),
        Step(
            "unknown key, problem+json",
            None,
            headers={"authorization": f"Bearer {UNKNOWN_KEY}", **PROBLEM},
        ),
        Step("wrong scheme", None, headers={"authorization": "Basic dXNlcjpwYXNz"}),
        Step("model outside the plan", "free", chat_body(model="gpt-4")),
        Step("model outside the plan, problem+json", "free", chat_body(model="gpt-4"), PROBLEM),
        Step("a plan not in the catalog", "platinum", chat_body(model="gpt-9")),
        Step(
            "a plan not in the catalog, not a model call",
            "platinum",
            method="GET",
            path="/v1/models",
        ),
        Step("not an object", "free", b"[1, 2]"),
        Step("no messages", "free", {"model": "gpt-3.5-turbo"}),
        Step("not a model call", "free", method="GET", path="/v1/models"),
    ]
    steps += [Step(f"request {i + 1} of 10/minute", "free") for i in range(10)]
    steps += [
        Step("the 11th in the minute", "free"),
        Step("the 12th in the minute, problem+json", "free", headers=PROBLEM),
        Step("budget 1", "small"),
        Step("budget 2", "small"),
        Step("budget spent", "small"),
        Step("budget spent, problem+json", "small", headers=PROBLEM),
        Step("metered budget", "metered"),
        Step("metered budget spent: 429 insufficient_quota", "metered"),
        Step("past 50 % of the budget: degraded", "paid", chat_body(model="gpt-4", max_tokens=600)),
        Step("degraded again", "paid", chat_body(model="gpt-4", max_tokens=600)),
        Step("streamed", "paid", chat_body(stream=True), {"x-fake-tokens": "3"}),
        Step("no usage in the answer", "paid", headers={"x-fake-usage": "none"}),
        Step("the model server fails", "paid", headers={"x-fake-status": "503"}),
        Step("no credits", "broke"),
        Step("credits", "rich", chat_body(model="gpt-4", max_tokens=50)),
        Step("larger than a minute's tokens", "rich", chat_body(max_tokens=2_000_000)),
        Step("no max_tokens on the free plan: what the day holds", "trial", NO_MAX_TOKENS,
             {"x-fake-tokens": "700"}),
        Step("no max_tokens again: what is left of the day", "trial", NO_MAX_TOKENS),
        Step("more than the day: never fits", "trial", chat_body(max_tokens=5000)),
        Step("no max_tokens: the default is written in", "rich", {
            "model": "gpt-4o", "messages": [{"role": "user", "content": "héllo wörld"}]}),
        Step("the Responses API", "rich", {"model": "gpt-4o", "input": "hi",
             "max_output_tokens": 20}, {"x-fake-tokens": "6"}, path="/v1/responses"),
        Step("the Responses API, streamed", "rich", {"model": "gpt-4o", "input": [
             {"role": "user", "content": "hi"}], "stream": True, "max_output_tokens": 20},
             {"x-fake-tokens": "5"}, path="/v1/responses"),
        Step("the Responses API, no cap: the default written in", "rich",
             {"model": "gpt-4o", "input": "hi"}, path="/v1/responses"),
        *conversation(),
        Step("a model's limit, its name in another case", "models", chat_body(model="GPT-4o")),
        Step("the same model's limit, spent", "models", chat_body(model="gpt-4o")),
        Step("a model named org/name", "models", chat_body(model=HF_MODEL)),
        Step("the same, in another case: spent", "models", chat_body(model=HF_MODEL.upper())),
        Step("another model: the plain limit", "models", chat_body(model="gpt-4")),
        *conversations_api(),
        *stored_responses(),
    ]  # fmt: skip
    return steps


LATER = {"model": "gpt-4o", "input": "later", "max_output_tokens": 16, "background": True}


def stored_responses() -> list[Step]:
    """A kept answer's own routes: read and listed by its tenant, refused to another (404,
    never forwarded), every response listed refused, deleted, then gone; a background answer
    (queued, no usage) charged its reservation, polled and cancelled."""
    kept = f"/v1/responses/{response_id(KEPT_ANSWER, 300)}"
    later = f"/v1/responses/{response_id(LATER, 5)}"
    return [
        Step("a kept answer read by its tenant", "converse", method="GET", path=kept),
        Step("its input listed", "converse", method="GET", path=f"{kept}/input_items"),
        Step("another tenant reads it: 404, never forwarded", "trial", method="GET", path=kept),
        Step("another tenant deletes it: 404, never forwarded", "trial", method="DELETE",
             path=kept),
        Step("every response listed: no call of them", "converse", method="GET",
             path="/v1/responses"),
        Step("its tenant deletes it", "converse", method="DELETE", path=kept),
        Step("read once deleted: 404, never forwarded", "converse", method="GET", path=kept),
        Step("a background answer: its reservation charged", "rich", LATER,
             path="/v1/responses"),
        Step("the background answer polled", "rich", method="GET", path=later),
        Step("the background answer cancelled", "rich", {}, path=f"{later}/cancel"),
    ]  # fmt: skip


MADE: dict[str, Any] = {"items": [{"type": "message", "role": "user", "content": "x" * 400}],
        "metadata": {"topic": "parity"}}  # fmt: skip
KEPT = {"metadata": {"topic": "kept"}}


def conversations_api() -> list[Step]:
    """The Conversations API: a conversation made with items, read, grown, continued by a
    Responses turn that reserves its items, refused to another tenant, deleted, then gone;
    what is no call of it, and items that are no list."""
    made = f"/v1/conversations/{conversation_id(MADE)}"
    turn = {"model": "gpt-3.5-turbo", "input": "and?", "max_output_tokens": 16,
            "conversation": conversation_id(MADE)}  # fmt: skip
    return [
        Step("a conversation made with items", "talk", MADE, path="/v1/conversations"),
        Step("its items, listed", "talk", method="GET", path=f"{made}/items"),
        Step("items added", "talk", {"items": MADE["items"] * 2}, path=f"{made}/items"),
        Step("a turn in it: its items reserved", "talk", turn, {"x-fake-tokens": "4"},
             path="/v1/responses"),
        Step("another tenant reads it: 404, never forwarded", "trial", method="GET", path=made),
        Step("another tenant deletes it: 404, never forwarded", "trial", method="DELETE",
             path=made),
        Step("every conversation listed: no call of the API", "talk", method="GET",
             path="/v1/conversations"),
        Step("items that are no list: 400", "talk", {"items": {"type": "message"}},
             path="/v1/conversations"),
        Step("another, made empty", "talk", KEPT, path="/v1/conversations"),
        Step("items added to that one (kept to the end)", "talk", MADE,
             path=f"/v1/conversations/{conversation_id(KEPT)}/items"),
        Step("its owner deletes the first", "talk", method="DELETE", path=made),
        Step("a turn in it, deleted: 404, never forwarded", "talk", turn, path="/v1/responses"),
    ]  # fmt: skip


KEPT_ANSWER = {"model": "gpt-3.5-turbo", "input": "hi", "max_output_tokens": 300}


def conversation() -> list[Step]:
    """Responses answers continued by `previous_response_id`: each reserves the conversation
    it continues (recorded when the last one settled, a stream's from its events), until one
    does not fit what is left of the day; one the gateways never saw for the tenant (another
    tenant's too), and a conversation never seen, are refused 404 before the model server."""
    kept = KEPT_ANSWER
    more = {
        "model": "gpt-3.5-turbo",
        "input": "and?",
        "max_output_tokens": 20,
        "previous_response_id": response_id(kept, 300),
    }
    streamed = {
        "model": "gpt-3.5-turbo",
        "input": "more",
        "max_output_tokens": 20,
        "stream": True,
        "previous_response_id": response_id(more, 4),
    }
    past = {
        "model": "gpt-3.5-turbo",
        "input": "and?",
        "max_output_tokens": 5,
        "previous_response_id": response_id(streamed, 5),
    }
    unseen = {
        "model": "gpt-3.5-turbo",
        "input": "hi",
        "max_output_tokens": 5,
        "previous_response_id": "resp_made_elsewhere",
    }
    path = "/v1/responses"
    return [
        Step("an answer the model server keeps", "converse", kept, {"x-fake-tokens": "300"},
             path=path),
        Step("continuing it: the conversation reserved", "converse", more,
             {"x-fake-tokens": "4"}, path=path),
        Step("continuing that, streamed", "converse", streamed, {"x-fake-tokens": "5"},
             path=path),
        Step("continuing the stream: more than the day has left", "converse", past, path=path),
        Step("an answer neither gateway saw: refused 404, never forwarded", "trial", unseen,
             path=path),
        Step("another tenant's answer: the same 404, never forwarded", "trial",
             {**more, "previous_response_id": response_id(kept, 300)}, path=path),
        Step("a conversation neither gateway saw: 404", "trial",
             {**unseen, "previous_response_id": None, "conversation": {"id": "conv_x"}},
             path=path),
        Step("a conversation that names no id: 400", "trial",
             {**unseen, "previous_response_id": None, "conversation": {"id": 7}}, path=path),
    ]  # fmt: skip


def prepare(side: Side) -> dict[str, str]:
    """Keys for every caller, the small budget, and $1 of credits for "rich"."""
    keys = {name: side.key(tenant, plan) for name, (tenant, plan) in CALLERS.items()}
    set_limit(side, "tenant/globex/tokens_per_day", 30)
    set_limit(side, "tenant/stark/tokens_per_day", 20)
    # Written as a policy may name them; requests meet them whatever the case they send.
    set_limit(side, "tenant/cyberdyne/requests_per_minute@GPT-4o", 1)
    set_limit(side, f"tenant/cyberdyne/requests_per_minute@{HF_MODEL}", 1)
    CreditLedger(side.db, PREFIX).top_up("umbrella", 1.0, "parity test", "test")
    return keys


def send(side: Side, keys: dict[str, str], step: Step) -> httpx.Response:
    # Each side's conversations apart at the model server (the same ids, the same answers).
    headers = {"accept": "application/json", "x-fake-space": side.name, **step.headers}
    if step.caller is not None:
        headers["authorization"] = f"Bearer {keys[step.caller]}"
    body = chat_body() if step.body is None and step.method == "POST" else step.body
    raw = body if isinstance(body, bytes) else None
    payload = None if isinstance(body, bytes) or body is None else body
    return side.http.request(
        step.method, side.url + step.path, json=payload, content=raw, headers=headers
    )


def seconds(duration: str) -> float:
    """OpenAI's reset format (`20ms`, `6m0s`, `1h2m3s`) in seconds."""
    match = DURATION.fullmatch(duration)
    assert match, duration
    h, m, s, ms = (int(part or 0) for part in match.groups())
    return h * 3600 + m * 60 + s + ms / 1000


def _timed_header(name: str, value: str) -> float | None:
    """The run-dependent number a header carries, in seconds or a count; None for others."""
    if name == "retry-after" or name == "x-ratelimit-remaining-requests":
        return float(value)
    if name == "retry-after-ms":
        return float(value) / 1000
    if name.startswith("x-ratelimit-reset-"):
        return seconds(value)
    return None


def shape(answer: httpx.Response) -> tuple[dict[str, Any], dict[str, float]]:
    """The answer with every run-dependent number taken out, and those numbers by place."""
    times: dict[str, float] = {}

    def taker(place: str) -> Callable[[re.Match[str]], str]:
        found = iter(range(1_000))

        def take(match: re.Match[str]) -> str:
            times[f"{place}#{next(found)}"] = float(match.group(2))
            return match.group(1) + "#"

        return take

    headers: dict[str, str] = {}
    for name, value in answer.headers.items():
        if name in VOLATILE:
            continue
        number = _timed_header(name, value)
        if number is None:
            headers[name] = TIMED.sub(taker(name), value)
        else:
            times[name], headers[name] = number, "#"
    body: Any = answer.content
    if answer.headers.get("content-type") == "application/problem+json":
        body = json.loads(answer.content)
        body["detail"] = TIMED.sub(taker("detail"), body["detail"])
    elif answer.headers.get("content-type") == "application/json" and answer.status_code >= 400:
        body = json.loads(answer.content)  # OpenAI's envelope
        body["error"]["message"] = TIMED.sub(taker("message"), body["error"]["message"])
    return {"status": answer.status_code, "headers": headers, "body": body}, times


@dataclass
class Outcome:
    answer: httpx.Response
    upstream_saw: Any  # the body the model server received, or None


def run(side: Side, keys: dict[str, str], step: Step, fake: FakeUpstream) -> Outcome:
    seen = len(fake.seen)
    answer = send(side, keys, step)
    request_id = answer.headers.get("x-governor-request-id")
    if request_id is not None and step.caller is not None:
        # nginx settles a stream from a timer just after its last byte: let it land before
        # the next request reads the books (Python settles before the last byte).
        wait_settled(side, CALLERS[step.caller][0], request_id)
    reached = fake.seen[seen:]
    return Outcome(answer, reached[-1].body if reached else None)


def books(side: Side) -> dict[str, Any]:
    """What settling wrote: per tenant the day's usage and holds, credits and their history."""
    keys = EnforcementKeys.for_prefix(PREFIX)
    found: dict[str, Any] = {}
    for tenant, _plan in CALLERS.values():
        state = side.db.hgetall(keys.tenant_level(tenant).state)
        found[tenant] = {
            name: value for name, value in state.items() if name[:2] in ("u|", "v|", "c|")
        }
        found[f"{tenant}:credits"] = side.db.hgetall(keys.credits(tenant))
        history = side.db.xrange(keys.credit_history(tenant))
        found[f"{tenant}:history"] = [
            {k: v for k, v in entry.items() if k not in ("request", "actor")}
            for _id, entry in history
        ]
        records = keys.schema.response(tenant, "x")[:-1] + "*"  # its Responses answers' tokens
        found[f"{tenant}:responses"] = {key: side.db.get(key) for key in side.db.scan_iter(records)}
        records = keys.schema.conversation(tenant, "x")[:-1] + "*"  # its conversations' tokens
        found[f"{tenant}:conversations"] = {
            key: (side.db.get(key), side.db.pttl(key) // 60_000)
            for key in side.db.scan_iter(records)
        }
    return found


def test_nginx_answers_as_the_python_gateway_does(
    nginx: Side, python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    fake = upstream[0]
    keys = {side.name: prepare(side) for side in (python_gateway, nginx)}
    mismatches: list[str] = []
    statuses: list[int] = []
    by_name: dict[str, Outcome] = {}

    polled: dict[str, Any] = {}
    for step in sequence():
        if step.name == "the background answer polled":
            polled = books(nginx)
            assert polled == books(python_gateway), "the books differ before the poll"
        python = run(python_gateway, keys["python"], step, fake)
        lua = run(nginx, keys["nginx"], step, fake)
        (expected, expected_times), (got, got_times) = shape(python.answer), shape(lua.answer)
        statuses.append(got["status"])
        by_name[step.name] = lua
        if got != expected:
            mismatches.append(f"{step.name}:\n  python {expected}\n  nginx  {got}")
        if expected_times.keys() != got_times.keys() or any(
            not math.isclose(expected_times[k], got_times[k], abs_tol=1.0) for k in got_times
        ):
            mismatches.append(f"{step.name}: times {expected_times} vs {got_times}")
        if python.upstream_saw != lua.upstream_saw:
            mismatches.append(f"{step.name}: upstream saw {python.upstream_saw} vs "
                              f"{lua.upstream_saw}")  # fmt: skip

    assert mismatches == [], "\n".join(mismatches)
    # The sequence covers what it claims to (a broken sequence must not compare trivially).
    api, kept = len(conversations_api()), len(stored_responses())
    statuses, kept_statuses = statuses[:-kept], statuses[-kept:]
    statuses, api_statuses = statuses[:-api], statuses[-api:]
    assert api_statuses == [200, 200, 200, 200, 404, 404, 404, 400, 200, 200, 200, 404]
    assert kept_statuses == [200, 200, 404, 404, 404, 200, 404, 200, 200, 200]
    for name in ("another tenant reads it: 404, never forwarded",
                 "another tenant deletes it: 404, never forwarded",
                 "every conversation listed: no call of the API",
                 "a turn in it, deleted: 404, never forwarded",
                 "every response listed: no call of them",
                 "read once deleted: 404, never forwarded"):  # fmt: skip
        assert by_name[name].upstream_saw is None, name
    queued = by_name["a background answer: its reservation charged"].answer.json()
    assert (queued["status"], queued["usage"]) == ("queued", None)
    # Recorded (and so settled) at the reservation until polled: the cap of 16 and the
    # prompt's estimate.
    record = EnforcementKeys.for_prefix(PREFIX).schema.response("umbrella", queued["id"])
    assert int(polled["umbrella:responses"][record]) > 16
    turn = by_name["a turn in it: its items reserved"].answer
    assert (
        'tokens_per_day";r=' + str(1000 - (3 * (2 + 100 + 4) + 1 + 16)) in turn.headers["ratelimit"]
    )  # the three items the conversation holds, ⌈4/4⌉ of input and the cap
    conversations = books(nginx)["initrode:conversations"]
    # Only the one kept: its item's estimate, for the 30 days of a record (in whole minutes).
    assert list(conversations.values()) == [(str(2 + 100 + 4), 30 * 1440 - 1)], conversations
    assert statuses.count(401) == 4
    assert [s for s in statuses if s in (402, 403, 429, 503)] == [403, 403, 403, 403, 429, 429,
                                                                  402, 402, 429, 503,
                                                                  402, 402, 429, 429]  # fmt: skip
    assert statuses[-5:] == [200, 429, 200, 429, 200]  # a model's limit, whatever its case
    # Continued until the day is spent; ids and a conversation not the tenant's: 404.
    assert statuses[-13:-5] == [200, 200, 200, 402, 404, 404, 404, 400]
    assert statuses.count(400) == 5
    for name in ("an answer neither gateway saw: refused 404, never forwarded",
                 "another tenant's answer: the same 404, never forwarded",
                 "a conversation neither gateway saw: 404"):  # fmt: skip
        assert by_name[name].upstream_saw is None  # nothing reached the model server
    assert statuses.count(200) >= 21
    assert books(nginx) == books(python_gateway)
    # Polled finished, the background answer is settled at its usage by both (docs/gateway.md,
    # "A stored response's own routes"): its record holds its true total, the rest of its
    # reservation given back, once (the cancel after the poll changes nothing).
    settled_books = books(nginx)
    refunds = [e for e in settled_books["umbrella:history"] if e["kind"] == "refund"]
    assert [e["reason"] for e in refunds] == [BACKGROUND_REASON]
    assert int(settled_books["umbrella:credits"]["balance"]) == int(
        polled["umbrella:credits"]["balance"]
    ) + int(refunds[0]["amount_micro_usd"])
    assert int(settled_books["umbrella:responses"][record]) < int(
        polled["umbrella:responses"][record]
    )
    # The Responses API is metered: served, its usage read (a stream's from response.completed)
    # and its cap written in when absent, as max_output_tokens.
    responses = [outcome for name, outcome in by_name.items() if "Responses" in name]
    assert [outcome.answer.status_code for outcome in responses] == [200] * 3
    assert responses[0].answer.json()["usage"]["output_tokens"] == 6
    assert "response.completed" in responses[1].answer.text
    assert responses[2].upstream_saw["max_output_tokens"] > 0
    assert books(nginx)["umbrella:credits"]["balance"] != "1000000"  # the call was charged
    # Each answer kept is recorded with its tokens, the conversation before it included.
    # The first deleted through its own route.
    assert sorted(books(nginx)["soylent:responses"].values()) == ["318", "330"]
