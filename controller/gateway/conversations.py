"""OpenAI's Conversations API as the gateway serves it (docs/gateway.md, "The Conversations
API"): which calls there are, whose conversation each names, and what a call that the model
server accepted changes in the tenant's record of it.

No call of this API is model work (the model server stores items; a Responses turn in the
conversation reads and bills them): none is admitted against a rate or a budget, as none of
`/v1/models` is. What they do change is the record a Responses turn naming the conversation
is admitted with (`<P>:{t:<tenant>}:conversation:<id>`): a create records it for the tenant
with its items' estimate, items added add theirs, a delete forgets it; and every call naming
a conversation is checked against that record first, so no tenant reads, changes or deletes
another's conversation through the gateway's one upstream key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from controller.gateway.openai import (
    MESSAGE_OVERHEAD_TOKENS,
    RequestError,
    item_tokens,
    read_object,
)
from controller.gateway.responses import safe_id

ROOT = "/v1/conversations"
Action = Literal[
    "create", "read", "update", "delete", "list_items", "add_items", "read_item", "delete_item"
]
# What each shape of path serves, by method (HEAD as GET: no body, nothing recorded).
_ACTIONS: dict[tuple[int, str], Action] = {
    (1, "GET"): "read", (1, "HEAD"): "read", (1, "POST"): "update", (1, "DELETE"): "delete",
    (2, "GET"): "list_items", (2, "HEAD"): "list_items", (2, "POST"): "add_items",
    (3, "GET"): "read_item", (3, "HEAD"): "read_item", (3, "DELETE"): "delete_item",
}  # fmt: skip
# The calls whose body the gateway reads: the items they add count toward the record.
ADDS_ITEMS: frozenset[Action] = frozenset(("create", "add_items"))
# The calls whose answer changes the record (the others are forwarded as they are).
RECORDS: frozenset[Action] = frozenset(("create", "add_items", "delete"))
# The largest answer read for the id of a conversation made (a conversation object is small).
MAX_CREATED_ANSWER = 1024 * 1024


@dataclass(frozen=True)
class ConversationCall:
    """One call of the Conversations API: what it does, and the conversation its path names
    (None: a create, or a path naming one with an id that is no safe id: `named` says)."""

    action: Action
    conversation: str | None = None
    named: str | None = None  # the path's id as sent, when it is no safe id


def route(method: str, path: str) -> ConversationCall | Literal["unserved"] | None:
    """The Conversations API call a request is; "unserved" for a path under the API that no
    call of it is (the list of every conversation — the upstream key's, every tenant's —, a
    method it does not take, an item id that is no safe id, an empty or dot segment); None
    for a path outside it."""
    if path == ROOT:
        return ConversationCall("create") if method == "POST" else "unserved"
    if not path.startswith(ROOT + "/"):
        return None
    parts = path[len(ROOT) + 1 :].split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "unserved"
    action = _ACTIONS.get((len(parts), method))
    if action is None or (len(parts) > 1 and parts[1] != "items"):
        return "unserved"
    if len(parts) == 3 and not safe_id(parts[2]):
        return "unserved"
    if not safe_id(parts[0]):
        return ConversationCall(action, None, parts[0])
    return ConversationCall(action, parts[0])


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
