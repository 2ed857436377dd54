"""A background Responses answer settled at its usage once that is known: what it was charged
when answered, and the usage a later read or cancel of it says (docs/gateway.md, "A stored
response's own routes").

`responses.create(background=True)` is answered at once (`queued`, no usage) and generated
afterwards, where no gateway sees it: it is charged its whole reservation when answered, and
keeps its concurrency slots (settle.lua's kept holds) while it generates. What it was charged
is kept for its tenant (`<P>:{t:<tenant>}:background:<id>`); the first read or cancel through
the gateway whose answer holds the response finished gives the slots back and, with its
usage (or cancelled without usage: at what its output holds), settles the difference, once
(charge.lua's charge record), and forgets it. A read answering it still running (`queued`,
`in_progress`) renews the slots' lease: a polled job keeps them as long as it runs. A
response nobody reads gives its slots back when its admission's lease (or the last
renewal's) ends.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, TypeGuard

from controller.gateway.openai import FINAL_STATUSES, output_tokens, whole_count

# The largest answer read for what it records (asgi._WholeAnswer): a settling read's usage (a
# response object holds its whole output), a created conversation's id.
MAX_READ_ANSWER = 32 * 1024 * 1024
REASON = "background response settled at its usage"
_COUNTS = ("input_tokens", "output_tokens", "total_tokens")


@dataclass(frozen=True)
class BackgroundCharge:
    """What a background answer was charged when answered: its admission's who and what (the
    budgets a correction charges are those in force for them), the tokens charged, the credits
    charged (None: the plan charged none) and the UTC day (days since the epoch, Redis time)
    the tokens were counted on."""

    request_id: str
    plan: str
    user: str | None
    ip: str | None  # the client address as the ip level keys it (contract.enforcement.ip_id)
    model: str
    prompt: int
    completion: int
    cost_micro: int | None
    day: int

    @property
    def tokens(self) -> int:
        return self.prompt + self.completion

    @property
    def reservation(self) -> str:
        """Its admission's reservation as `Admission.release` takes it (the ip as its id)."""
        return f"{self.request_id}/{self.user or ''}/{self.ip or ''}"

    def encoded(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decoded(cls, text: str) -> BackgroundCharge | None:
        """The charge a record holds; None for one no gateway writes (it is then left as it
        is: the reservation stays charged)."""
        try:
            fields = json.loads(text)
            charge = cls(**fields)
        except (ValueError, TypeError):
            return None
        counts = (charge.prompt, charge.completion, charge.day)
        money = charge.cost_micro
        if not all(_count(value) for value in counts) or not (money is None or _count(money)):
            return None
        texts = (charge.request_id, charge.plan, charge.model)
        optional = (charge.user, charge.ip)
        if not all(isinstance(text, str) for text in texts) or not all(
            text is None or isinstance(text, str) for text in optional
        ):
            return None
        return charge


@dataclass(frozen=True)
class FinalUsage:
    """The usage a finished response reports."""

    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


# What a cancel whose answer ended the response leaves in the charge record's place when it
# finds none (no charge decodes from it): a streamed create still settling sees it as it
# keeps its charge, and gives its slots back then (Admission.keep_background, mark_ended).
ENDED = "ended"


def ended(answer: bytes, response_id: str) -> bool:
    """Whether an answer holds response `response_id` finished (`finished`, whatever its
    usage)."""
    return _final_response(answer, response_id) is not None


# What a read answers for a response still generating: its slots stay held, renewed.
RUNNING_STATUSES = frozenset({"queued", "in_progress"})


def running(answer: bytes, response_id: str) -> bool:
    """Whether an answer holds response `response_id` still generating (`queued` or
    `in_progress`): a read so answered renews the lease of the slots it keeps."""
    document = _response(answer, response_id)
    return document is not None and document["status"] in RUNNING_STATUSES


def _final_response(answer: bytes, response_id: str) -> dict[str, Any] | None:
    """The response object `response_id` an answer holds, when its `status` is final."""
    document = _response(answer, response_id)
    return document if document is not None and document["status"] in FINAL_STATUSES else None


def _response(answer: bytes, response_id: str) -> dict[str, Any] | None:
    """The response object `response_id` an answer holds, with a `status` that is a string."""
    try:
        document: Any = json.loads(answer)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(document, dict) or document.get("object") != "response":
        return None
    status = document.get("status")  # a list or an object would not hash: checked first
    if document.get("id") != response_id or not isinstance(status, str):
        return None
    return document


def finished(
    answer: bytes, response_id: str, charged: BackgroundCharge
) -> tuple[bool, FinalUsage | None]:
    """Whether an answer holds response `response_id` finished (`status` one of
    FINAL_STATUSES: its generation holds no slot any more), and then the usage it reports
    (`usage.input_tokens`/`output_tokens` whole counts of 0 or more). Not finished for
    anything else (another object or id, still queued or running); no usage for usage that
    is none or counts that are no counts (`openai.whole_count`: `-5`, `1.5`, `"2"`, `true`):
    the charge then stands. A response `cancelled` with no usage at all (null or absent) is
    the one exception: `cancelled_usage`, from the output text it holds (`charged`: its
    charge; none without text)."""
    document = _final_response(answer, response_id)
    if document is None:
        return False, None
    if document.get("usage") is None and document["status"] == "cancelled":
        return True, cancelled_usage(document, charged)
    return True, _usage(document)


def _usage(document: dict[str, Any]) -> FinalUsage | None:
    """The usage a finished response object reports; None for none or counts that are none."""
    usage = document.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion, total = (whole_count(usage.get(name)) for name in _COUNTS)
    if prompt is None or completion is None:
        return None
    if total is not None and total > prompt + completion:
        completion = total - prompt  # reasoning tokens counted only in the total, as a settle
    return FinalUsage(prompt, completion)


def cancelled_usage(response: dict[str, Any], charged: BackgroundCharge) -> FinalUsage | None:
    """A response cancelled and answered without usage: what it generated before the cancel,
    estimated as an answer without usage is settled (the prompt charged at admission, and
    `openai.output_tokens` of the output the answer holds), never more than its reservation
    (a model server that kept going past max_output_tokens is not believed) and never less
    than its prompt. Charging it the whole reservation made a response cancelled at once pay
    for every token it never generated.

    None (the whole reservation stays charged) when its output holds no text: vLLM and
    SGLang answer a cancel with the object stored when the request was queued (`output: []`,
    `usage: null`) however much was generated, and estimating from that charged the prompt
    alone — a cancel made any generation free. Fail closed: only text seen is estimated."""
    generated = output_tokens(response)
    if generated == 0:
        return None
    return FinalUsage(charged.prompt, min(generated, charged.completion))


def _count(value: object) -> TypeGuard[int]:
    """A whole count as a record holds it: an int (no float: our own records write none)
    that `openai.whole_count` takes (0 up to 2^53, no bool)."""
    return isinstance(value, int) and whole_count(value) is not None
