"""OpenAI's Conversations API and the Responses API's calls on a stored response, as the
gateway serves them (docs/gateway.md, "The Conversations API", "A stored response's own
routes"): which calls there are, whose conversation or response each names, and what a call
that the model server accepted changes in the tenant's record of it.

No call of these is model work (the model server stores items and answers; a Responses turn
reads and bills them): none is admitted against a rate or a budget, as none of `/v1/models`
is. What they do change is the record a Responses turn naming the conversation or the
response is admitted with (`<P>:{t:<tenant>}:conversation:<id>`, `...:response:<id>`): a
create records a conversation for the tenant with its items' estimate, items added add
theirs, a delete forgets either; and every call naming one is checked against that record
first, so no tenant reads, changes or deletes another's through the gateway's one upstream
key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from controller.gateway.openai import (
    MESSAGE_OVERHEAD_TOKENS,
    EarlierKind,
    RequestError,
    item_tokens,
    read_object,
)
from controller.gateway.responses import safe_id

ROOT = "/v1/conversations"
RESPONSES = "/v1/responses"  # POST of it alone is a model call (openai.ROUTES), not one of these
Action = Literal[
    "create", "read", "update", "delete", "list_items", "add_items", "read_item", "delete_item",
    "cancel",
]  # fmt: skip
# What each shape of path serves, by method: the path past the id ("*" for an item's id);
# HEAD as GET (no body, nothing recorded).
_CONVERSATION: dict[tuple[str, str], Action] = {
    ("", "GET"): "read", ("", "HEAD"): "read", ("", "POST"): "update", ("", "DELETE"): "delete",
    ("items", "GET"): "list_items", ("items", "HEAD"): "list_items",
    ("items", "POST"): "add_items",
    ("items/*", "GET"): "read_item", ("items/*", "HEAD"): "read_item",
    ("items/*", "DELETE"): "delete_item",
}  # fmt: skip
# A stored response: read it (a background one is polled so), delete it, list its input,
# cancel a background one. GET /v1/responses (every response of the upstream key) is none.
_RESPONSE: dict[tuple[str, str], Action] = {
    ("", "GET"): "read", ("", "HEAD"): "read", ("", "DELETE"): "delete",
    ("input_items", "GET"): "list_items", ("input_items", "HEAD"): "list_items",
    ("cancel", "POST"): "cancel",
}  # fmt: skip
# Each API's root, what its ids name, and its calls.
_APIS: tuple[tuple[str, EarlierKind, dict[tuple[str, str], Action]], ...] = (
    (ROOT, "conversation", _CONVERSATION),
    (RESPONSES, "response", _RESPONSE),
)
# The calls whose body the gateway reads: the items they add count toward the record.
ADDS_ITEMS: frozenset[Action] = frozenset(("create", "add_items"))
# The calls whose answer changes the record (the others are forwarded as they are).
RECORDS: frozenset[Action] = frozenset(("create", "add_items", "delete"))


@dataclass(frozen=True)
class ConversationCall:
    """One call of the Conversations API or on a stored response: what it does, and the
    conversation or response (`what`) its path names (`id` None: a create, or a path naming
    one with an id that is no safe id: `named` says)."""

    action: Action
    id: str | None = None
    named: str | None = None  # the path's id as sent, when it is no safe id
    what: EarlierKind = "conversation"


def route(method: str, path: str) -> ConversationCall | Literal["unserved"] | None:
    """The call a request is; "unserved" for a path under the APIs that no call of them is
    (the list of every conversation or response — the upstream key's, every tenant's —, a
    method one does not take, an item id that is no safe id, an empty or dot segment); None
    for a path outside them (POST /v1/responses among them: a model call)."""
    if path == ROOT:
        return ConversationCall("create") if method == "POST" else "unserved"
    for root, what, actions in _APIS:
        if path.startswith(root + "/"):
            return _call(what, actions, method, path[len(root) + 1 :].split("/"))
    return None


def _call(
    what: EarlierKind, actions: dict[tuple[str, str], Action], method: str, parts: list[str]
) -> ConversationCall | Literal["unserved"]:
    """The call of one API that a path's segments past its root are, or "unserved"."""
    if any(part in ("", ".", "..") for part in parts):
        return "unserved"
    shape = "/".join(parts[1:2] + ["*" for _ in parts[2:]])
    action = actions.get((shape, method))
    if action is None or (len(parts) == 3 and not safe_id(parts[2])):
        return "unserved"
    if not safe_id(parts[0]):
        return ConversationCall(action, None, parts[0], what)
    return ConversationCall(action, parts[0], None, what)


def added_tokens(action: Action, raw: bytes) -> int:
    """What the items a create or an add sends make the model server read back in a later
    turn: their estimate, as a Responses request's input items are estimated (⌈characters ÷
    4⌉ of their texts, 4 for each item). RequestError for a body the gateway cannot count: no
    JSON object (the checks of every model call), or `items` that is no list (absent or null:
    none, on a create; an add without items is the model server's to refuse)."""
    body = read_object(raw)
    items: Any = body.get("items")
    if items is None:
        return 0
    if not isinstance(items, list):
        # Not quoted back: JSON encoders order and space an object differently (nginx's too).
        raise RequestError("`items` must be a list of conversation items")
    try:
        return item_tokens(items) + MESSAGE_OVERHEAD_TOKENS * len(items)
    except RecursionError:
        raise RequestError("the request body is not JSON: it nests too deep") from None


def created_id(answer: bytes) -> str | None:
    """The id of the conversation a create's answer holds (`object: conversation`), or None."""
    try:
        document = json.loads(answer)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict) or document.get("object") != "conversation":
        return None
    found = document.get("id")
    return found if isinstance(found, str) else None
