"""ASGI middleware any Starlette/FastAPI gateway can mount: authenticate, check the plan's
models, admit (reserve worst-case tokens), degrade, pass on, settle from the response's usage.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import anyio
import redis
import redis.asyncio.retry
import structlog
from redis.exceptions import RedisClusterException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.clients.redis import connection_hint, refused_this_call, write_retry_async
from controller.contract.catalog import PlanInfo
from controller.contract.enforcement import ForwardedForError, forwarded_client
from controller.errors import SinkError
from controller.gateway.admission import (
    Admission,
    AdmissionRequest,
    AdmissionResult,
    Degradation,
    TokensUsed,
    UnansweredAdmissionError,
)
from controller.gateway.auth import Authenticator, AuthError, Principal
from controller.gateway.background import (
    MAX_READ_ANSWER,
    BackgroundCharge,
    ended,
    finished,
    running,
)
from controller.gateway.catalog import PlanCatalog
from controller.gateway.conversations import (
    ADDS_ITEMS,
    RECORDS,
    ConversationCall,
    added_tokens,
    created_id,
)
from controller.gateway.conversations import route as conversation_route
from controller.gateway.failmode import FailMode
from controller.gateway.metrics import GatewayMetrics
from controller.gateway.openai import (
    ROUTES,
    EarlierKind,
    ModelRequest,
    RequestError,
    RequestKind,
    Usage,
    UsageChunkFilter,
    UsageMeter,
)
from controller.gateway.pending import PendingCalls, StoreCall
from controller.gateway.prices import PriceTable, to_micro
from controller.gateway.responses import Answers, degrade_headers, rate_limit_headers
from controller.gateway.tracing import Tracing
from controller.gateway.waits import RecordWaits
from controller.model import model_key
from controller.settings import GatewaySettings, RedisSettings

# Outcomes where one limit said no: `gateway_refusals_total` counts which level and kind.
_LIMIT_REFUSALS = ("rate_limited", "budget_exhausted", "too_large")
# What an unreachable or failing limit store raises, whoever wraps it (redis-py's cluster
# client raises some of its own refusals outside RedisError).
STORE_ERRORS = (redis.RedisError, RedisClusterException, SinkError, OSError)
STATE_KEY = "governor"  # scope["state"]["governor"]: the Principal, for the app behind us


@dataclass
class Enforcement:
    """Everything the middleware consults; built once per gateway."""

    settings: GatewaySettings
    authenticator: Authenticator
    admission: Admission
    catalog: PlanCatalog
    failmode: FailMode
    prices: PriceTable
    metrics: GatewayMetrics
    answers: Answers
    tracing: Tracing | None = None
    routes: Mapping[str, RequestKind] = field(default_factory=lambda: dict(ROUTES))
    open_paths: tuple[str, ...] = ("/metrics", "/healthz")
    # Authenticated, forwarded as they are and counted nowhere: GET (or HEAD) of these paths
    # and below them. Any other route that is not a model call is refused (404): an upstream
    # serves model work on routes Governor does not meter.
    pass_paths: tuple[str, ...] = ("/v1/models",)
    # Settles and releases that met a Redis outage, repeated once it answers.
    pending: PendingCalls = field(
        default_factory=lambda: PendingCalls(STORE_ERRORS, refused_alone=refused_this_call)
    )
    # How a record of a Responses answer's tokens is tried again when its write fails (a
    # dropped connection, a pause, a failover): GOVERNOR_REDIS__RETRIES more tries with
    # GOVERNOR_REDIS__RETRY_BACKOFF_SECONDS doubled between them, as the controller's writes.
    record_retry: redis.asyncio.retry.Retry = field(
        default_factory=lambda: write_retry_async(RedisSettings(), STORE_ERRORS)
    )

    # Lookups waiting for a record a settle may still be writing (`_await_record`).
    record_waits: RecordWaits = field(init=False)

    def __post_init__(self) -> None:
        self.record_waits = RecordWaits(
            self.settings.previous_response_wait_seconds, self.settings.previous_response_waiters
        )
        self.pending.on_lost = lambda operation: self.metrics.store_calls_lost.labels(
            operation
        ).inc()
        self.metrics.held_store_calls.set_function(lambda: len(self.pending))


@dataclass
class _Call:
    """One admitted request on its way through: what to settle, and against whom."""

    principal: Principal
    plan: str
    request: ModelRequest
    request_id: str
    reservation: str | None
    meter: UsageMeter
    headers: dict[str, str]
    outcome: str = "allow"  # or "degraded", "fail_open": the metric's outcome label
    status: int | None = None
    settled: bool = False
    unreserved: AdmissionRequest | None = None  # served fail-open: charged afterwards
    paid: bool = False  # its plan charged credits when it was admitted
    strip: UsageChunkFilter | None = None  # the usage event the client did not ask for
    admitted: float = 0.0  # GatewayMetrics.clock() at its admission: its lease began then


class _WholeAnswer:
    """An answer read whole for what it records (a settling read's usage, a conversation's
    id) up to MAX_READ_ANSWER bytes. Past that it is passed on as it is and nothing is
    recorded: decoding it would hold the gateway's memory and time for as large an answer as
    the model server cares to send."""

    def __init__(self) -> None:
        self._body = bytearray()
        self.size = 0

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size <= MAX_READ_ANSWER:
            self._body.extend(chunk)
        else:
            self._body.clear()  # never decoded: its memory is given back at once

    def read(
        self, log: Any, tenant: str, call: ConversationCall, status: int = 200
    ) -> bytes | None:
        """The answer, or None (said in a log line) when it was past the cap; an answer the
        model server refused records nothing anyway, so it is never said too large."""
        if self.size <= MAX_READ_ANSWER:
            return bytes(self._body)
        if 200 <= status < 300:
            log.warning("answer past the read cap passed on whole; nothing recorded",
                        tenant=tenant, what=call.what, action=call.action, size=self.size,
                        cap=MAX_READ_ANSWER)  # fmt: skip
        return None


class GovernorMiddleware:
    """Enforces Governor's limits in front of `app` (pure ASGI: streaming passes untouched)."""

    def __init__(self, app: ASGIApp, enforcement: Enforcement) -> None:
        self.app = app
        self.e = enforcement
        self._log = structlog.get_logger("governor.gateway")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.e.open_paths:
            await self.app(scope, receive, send)
            return
        if self.e.tracing is None:
            await self._enforce(scope, receive, send)
            return
        with self.e.tracing.server_span(
            f"{scope['method']} {scope['path']}", _headers(scope)
        ) as span:

            async def traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", int(message["status"]))
                await send(message)

            await self._enforce(scope, receive, traced)
            principal = scope.get("state", {}).get(STATE_KEY)
            if isinstance(principal, Principal):
                span.set_attribute("governor.tenant", principal.tenant)
                span.set_attribute("governor.plan", principal.plan)

    async def _enforce(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers = _headers(scope)
        try:
            principal = await self.e.authenticator.authenticate(headers)
        except AuthError as exc:
            self.e.metrics.request(None, None, None, "unauthenticated")
            await self.e.answers.unauthenticated(exc.detail)(scope, receive, send)
            return
        except STORE_ERRORS as exc:
            self.e.metrics.store_errors.labels("authenticate").inc()
            self._log.warning("limit store unreachable during authentication", error=_said(exc))
            await self.e.answers.enforcement_unavailable(None)(scope, receive, send)
            return
        scope.setdefault("state", {})[STATE_KEY] = principal
        plan = await self._plan(principal)
        if isinstance(plan, Response):
            await plan(scope, receive, send)
            return
        conversation = conversation_route(scope["method"], scope["path"])
        if conversation is not None:
            await self._conversation(scope, receive, send, principal, conversation)
            return
        kind = self.e.routes.get(scope["path"]) if scope["method"] == "POST" else None
        if kind is None:
            if passes(scope["method"], scope["path"], self.e.pass_paths):
                await self.app(scope, receive, send)  # nothing to count: forwarded as is
                return
            self.e.metrics.request(principal.tenant, principal.plan, None, "bad_request")
            await self.e.answers.unmetered_route()(scope, receive, send)
            return
        await self._model_call(scope, receive, send, principal, plan, kind, started)

    async def _conversation(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        principal: Principal,
        call: ConversationCall | str,
    ) -> None:
        """A call of the Conversations API or on a stored response: no model work, so
        admitted against no rate or budget (as /v1/models); only the tenant's own conversation
        or response (`tenant` scope), and a call the model server accepts changes the record a
        later turn in it reserves."""
        refusal = await self._conversation_refusal(principal, call)
        if refusal is None and isinstance(call, ConversationCall):
            if call.action not in RECORDS:  # a read, or new metadata: as it is
                await self._forward_read(scope, receive, send, principal, call)
                return
            raw = await _read_body(receive, self.e.settings.max_body_bytes)
            added, refusal = self._added(call, raw)
            if refusal is None and raw is not None:
                replay = _replay(raw, receive, passes_disconnect=False)
                await self._conversation_forward(scope, replay, send, principal, call, added)
                return
        if refusal is not None:
            self.e.metrics.request(principal.tenant, principal.plan, None, "bad_request")
            await refusal(scope, receive, send)

    async def _forward_read(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        principal: Principal,
        call: ConversationCall,
    ) -> None:
        """A call that changes no record, forwarded as it is. A read or cancel of a background
        response still charged its whole reservation settles it, once its answer is whole and
        before its last byte goes on, at the usage the answer says it finished with."""
        charged = await self._background_charge(scope, principal.tenant, call)
        if call.id is None or (charged is None and call.action != "cancel"):
            await self.app(scope, receive, send)
            return
        named = call.id
        status: int | None = None
        whole = _WholeAnswer()

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                whole.feed(message.get("body", b""))
                done = not message.get("more_body", False)
                if done and status is not None and 200 <= status < 300:
                    answer = whole.read(self._log, principal.tenant, call)
                    if answer is not None:
                        with anyio.CancelScope(shield=True):
                            await self._settle_ended(principal.tenant, named, charged, answer)
            await send(message)

        await self.app(scope, receive, observe)

    async def _background_charge(
        self, scope: Scope, tenant: str, call: ConversationCall
    ) -> BackgroundCharge | None:
        """What the background response a read or cancel names was charged, while it is not
        settled at its usage; None for any other call. Redis away: None (the charge stands,
        and a later read settles it)."""
        # A read that streams the response's events (`?stream=true`) passes as it is (nginx
        # would hold it whole until the response is done); it names no usage to settle at.
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        reads = call.action == "read" and scope["method"] == "GET" and "stream" not in query
        if call.what != "response" or call.id is None or not (reads or call.action == "cancel"):
            return None
        try:
            return await self.e.admission.background_charge(tenant, call.id)
        except STORE_ERRORS as exc:
            self.e.metrics.store_errors.labels("lookup").inc()
            self._log.warning("limit store unreachable reading what a background response was "
                              "charged; a later read settles it", error=_said(exc))  # fmt: skip
            return None

    async def _settle_ended(
        self, tenant: str, named: str, charged: BackgroundCharge | None, answer: bytes
    ) -> None:
        """Settle a read's or cancel's answer: at the charge found before it was forwarded,
        or, a cancel that found none and ended the response, the charge a streamed create
        settling meanwhile kept (else ENDED is left for that create to find: it then gives
        its slots back as it keeps its charge, instead of holding them for its lease)."""
        if charged is None:
            if not ended(answer, named):
                return
            lease = self.e.admission.lease_seconds  # a create settles within its lease
            try:
                charged = await self.e.admission.mark_ended(tenant, named, lease)
            except STORE_ERRORS as exc:
                self.e.metrics.store_errors.labels("record").inc()
                self._log.warning("cannot mark a cancelled response ended; a create still "
                                  "settling keeps its slots until their lease ends",
                                  tenant=tenant, response_id=named, error=_said(exc))  # fmt: skip
                return
            if charged is None:
                return
        await self._settle_background(tenant, named, charged, answer)

    async def _settle_background(
        self, tenant: str, named: str, charged: BackgroundCharge, answer: bytes
    ) -> None:
        """Settle a background response its answer says is finished: its slots given back,
        and charged at the usage it finished with (one cancelled without usage: at what its
        output holds, `cancelled_usage`); an answer that says no usage (no usage, counts
        that are none) leaves it charged its reservation, and one still running changes
        nothing. Held when Redis fails (a repeat changes nothing)."""
        done, used = finished(answer, named, charged)
        if not done:
            if running(answer, named):
                await self._renew_background(tenant, named, charged)
            return
        self.e.metrics.given_back(tenant, named)  # its slots: now, or held until Redis answers
        tokens = None if used is None else TokensUsed(used.prompt, used.completion)
        ttl = self.e.settings.previous_response_ttl_seconds
        admission = self.e.admission
        await self._store(
            "charge", lambda: admission.settle_background(tenant, named, charged, tokens, ttl)
        )

    async def _renew_background(self, tenant: str, named: str, charged: BackgroundCharge) -> None:
        """A read found the background response still running: its kept slots' lease starts
        again (a polled job holds them while it runs; an unpolled one loses them at its
        lease's end). Redis away: said and counted, not held nor repeated — the lease ends as
        before, and the answer goes on unchanged (delayed at most the store's timeout, as a
        settle before the last byte is)."""
        admission = self.e.admission
        try:
            renewed = await admission.renew(charged.reservation, tenant)
        except STORE_ERRORS as exc:
            self.e.metrics.store_errors.labels("renew").inc()
            self._log.warning("cannot renew the lease of a running background response's "
                              "slots; they are freed when it ends", tenant=tenant,
                              response_id=named, error=_said(exc))  # fmt: skip
            return
        if renewed:
            self.e.metrics.renewed(tenant, named, admission.lease_seconds)

    async def _conversation_refusal(
        self, principal: Principal, call: ConversationCall | str
    ) -> Response | None:
        """Why a call of the Conversations API or on a stored response is not forwarded: no
        call of them (404 unmetered-route), a conversation or response not recorded for the
        tenant (404, in `tenant` scope, after the wait a missing record gets:
        `_await_record`; an id that is no safe id in any), Redis away (503); None: it goes on."""
        if not isinstance(call, ConversationCall):
            return self.e.answers.unmetered_route()
        if call.action == "create":
            return None
        if call.id is None:
            return self.e.answers.unknown_earlier(call.what, call.named or "", in_path=True)
        strict = self.e.settings.previous_response_scope == "tenant"
        try:
            tokens = await self._recorded(principal.tenant, call.id, call.what)
        except STORE_ERRORS as exc:
            self.e.metrics.store_errors.labels("lookup").inc()
            self._log.warning("limit store unreachable reading whose conversation or response "
                              "it is; refused", what=call.what, error=_said(exc))  # fmt: skip
            return self.e.answers.enforcement_unavailable(principal.plan)
        if tokens is None and strict:
            return self.e.answers.unknown_earlier(call.what, call.id, in_path=True)
        return None

    def _added(self, call: ConversationCall, raw: bytes | None) -> tuple[int, Response | None]:
        """What the items a create or an add sends will add to the conversation's record."""
        if raw is None:
            return 0, self.e.answers.bad_request("request body too large", status=413)
        if call.action not in ADDS_ITEMS:
            return 0, None
        try:
            return added_tokens(call.action, raw), None
        except RequestError as exc:
            return 0, self.e.answers.bad_request(str(exc))

    async def _conversation_forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        principal: Principal,
        call: ConversationCall,
        added: int,
    ) -> None:
        """Forward a create, an add or a delete; once the model server's answer is whole, and
        before its last byte goes on (a client that sends its next request at once finds the
        record), change the tenant's record of the conversation or response as it says."""
        status: int | None = None
        whole = _WholeAnswer()

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                if call.action == "create":  # the one answer read: for the id it made
                    whole.feed(message.get("body", b""))
                if not message.get("more_body", False) and status is not None:
                    answer = whole.read(self._log, principal.tenant, call, status)
                    if answer is not None:
                        with anyio.CancelScope(shield=True):
                            await self._record_conversation(principal, call, status, answer,
                                                            added)  # fmt: skip
            await send(message)

        await self.app(scope, receive, observe)

    async def _record_conversation(
        self, principal: Principal, call: ConversationCall, status: int, answer: bytes, added: int
    ) -> None:
        """A create records the conversation for the tenant (its items' estimate, for the
        TTL of a response's record); an add grows the record by its items' estimate; a
        delete forgets the conversation's or the response's. Nothing when the model server
        refused. A record that cannot be written is said: that conversation is then refused
        404 (`shared`: the default); a response whose record a delete could not forget stays
        the tenant's to name (the model server answers 404 for it)."""
        if not 200 <= status < 300:
            return
        admission, tenant = self.e.admission, principal.tenant
        ttl = self.e.settings.previous_response_ttl_seconds
        try:
            if call.action == "create":
                made = created_id(answer)
                if made is not None:
                    await admission.remember_response(tenant, made, added, ttl, "conversation")
            elif call.id is not None and call.action == "add_items":
                await admission.grow_conversation(tenant, call.id, added, ttl)
            elif call.id is not None:
                await admission.forget(tenant, call.id, call.what)
        except STORE_ERRORS as exc:
            self.e.metrics.store_errors.labels("record").inc()
            self._log.warning("cannot record a conversation or response call; a turn in it is "
                              "refused (or, shared, reserves the default)", action=call.action,
                              what=call.what, error=_said(exc))  # fmt: skip

    async def _plan(self, principal: Principal) -> PlanInfo | Response:
        """The caller's plan from the catalog, or the refusal: a plan the catalog does not
        hold is never served (it would have no models list, no rate, no budget)."""
        catalog = self.e.catalog
        plan = await catalog.current(principal.plan)
        if plan is not None:
            self.e.failmode.memory.plans_seen.add(principal.plan)
            return plan
        known = catalog.plans
        if known is None:  # never read: Redis has been away since start, no plan is known
            outcome, answer = "fail_closed", self.e.answers.enforcement_unavailable(principal.plan)
        elif not known:
            outcome, answer = "not_configured", self.e.answers.not_configured()
        else:
            claimed = principal.method == "jwt"
            outcome, answer = "unknown_plan", self.e.answers.unknown_plan(principal.plan, claimed)
        self.e.metrics.request(principal.tenant, principal.plan, None, outcome)
        return answer

    async def _model_call(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        principal: Principal,
        plan: PlanInfo,
        kind: RequestKind,
        started: float,
    ) -> None:
        raw = await _read_body(receive, self.e.settings.max_body_bytes)
        refusal: Response | None = None
        if raw is None:
            refusal = self.e.answers.bad_request("request body too large", status=413)
        else:
            try:
                request = ModelRequest.parse(kind, raw, self.e.settings.default_max_tokens)
            except RequestError as exc:
                refusal = self.e.answers.bad_request(str(exc))
        if refusal is not None:
            self.e.metrics.request(principal.tenant, principal.plan, None, "bad_request")
            await refusal(scope, receive, send)
            return
        if not plan.allows(request.model):
            self.e.metrics.request(
                principal.tenant, principal.plan, request.model, "model_not_allowed"
            )
            answer = self.e.answers.model_not_allowed(principal.plan, request.model, plan.models)
            await answer(scope, receive, send)
            return
        try:
            ip = _client_ip(scope, self.e.settings.trust_forwarded_for)
        except ForwardedForError as exc:
            self.e.metrics.request(principal.tenant, principal.plan, request.model, "bad_request")
            await self.e.answers.bad_request(str(exc))(scope, receive, send)
            return
        unknown = await self._add_earlier(principal, request)
        if unknown is not None:
            self.e.metrics.request(principal.tenant, principal.plan, request.model, "bad_request")
            await unknown(scope, receive, send)
            return
        call = await self._admit(principal, plan, request, ip)
        self.e.metrics.admission_seconds.observe(time.perf_counter() - started)
        if isinstance(call, Response):
            await call(scope, receive, send)
            return
        await self._forward(scope, receive, send, call)

    async def _add_earlier(self, principal: Principal, request: ModelRequest) -> Response | None:
        """A Responses request continuing an earlier response or a conversation: the model
        server reads it back and bills it as input, so the reservation holds what was recorded
        when it settled. Every tenant reaches the model server with the one upstream key, so
        an id without a record of this tenant's (unknown, expired, another tenant's, no safe
        id) would let it read another tenant's conversation: refused 404 (`tenant` scope),
        before anything is forwarded. `shared` reserves the model's context window or the
        configured default instead, never nothing. In `tenant` scope a lookup that misses
        waits briefly for the record first (`_await_record`): the answer it names may still be
        settling. Redis away: 503, as nothing can be checked (the plan's fail mode cannot
        vouch for whose id it is)."""
        strict = self.e.settings.previous_response_scope == "tenant"
        for what, named in request.earlier:
            try:
                tokens = await self._recorded(principal.tenant, named, what)
            except STORE_ERRORS as exc:
                self.e.metrics.store_errors.labels("lookup").inc()
                self._log.warning("limit store unreachable reading an earlier response's "
                                  "tokens; refused", error=_said(exc))  # fmt: skip
                return self.e.answers.enforcement_unavailable(principal.plan)
            if tokens is None and strict:
                return self.e.answers.unknown_earlier(what, named)
            if tokens is None:
                tokens = unknown_earlier_tokens(self.e.settings, request.model)
            request.add_earlier(tokens)
        return None

    async def _recorded(self, tenant: str, named: str, what: EarlierKind) -> int | None:
        """The tokens recorded for `tenant`'s response or conversation `named`; in `tenant`
        scope a miss waits for the record first (`_await_record`). None: no record."""
        tokens = await self.e.admission.earlier_tokens(tenant, named, what)
        if tokens is None and self.e.settings.previous_response_scope == "tenant":
            return await self._await_record(tenant, named, what)
        return tokens

    async def _await_record(self, tenant: str, named: str, what: EarlierKind) -> int | None:
        """The record of `tenant`'s response or conversation `named`, asked again a few times
        over `previous_response_wait_seconds` (controller/gateway/waits.py): a client may name
        an answer the instant its last event reached it, while the settle (here, on another
        replica, or in nginx's timer after the last byte) is still writing the record. None
        when it never came, or when this process already holds as many waits as it lets
        (in all, or for this tenant): then at once. Counted in
        `gateway_record_waits_total` by outcome."""
        waits = self.e.record_waits
        if waits.seconds <= 0 or not self.e.admission.can_record(tenant, named, what):
            return None  # no wait set; or no safe id, under which no record can ever come
        with waits.slot(tenant) as granted:
            if not granted:
                self.e.metrics.record_waits.labels("not_waited").inc()
                return None
            for pause in waits.pauses:
                await anyio.sleep(pause)
                tokens = await self.e.admission.earlier_tokens(tenant, named, what)
                if tokens is not None:
                    self.e.metrics.record_waits.labels("found").inc()
                    return tokens
        self.e.metrics.record_waits.labels("missing").inc()
        return None

    async def _remember(self, call: _Call, tokens: int) -> None:
        """A Responses answer the model server keeps: record what a later request naming it
        (or its conversation) will read back (its input, which holds its own earlier turns,
        and its output), and so that this tenant may name it.

        A write that fails is tried again (`record_retry`, each failed try counted in
        `gateway_limit_store_errors_total{operation="record"}`), so a Redis blip loses no
        record; it delays the answer's last byte by the backoff (0.7 s at most by default)
        and the tries. Given up, the record is missing: logged once with the tenant and the
        ids, counted in `gateway_response_records_lost_total`, and a request continuing it
        gets what any id without a record of the tenant's gets (404 in `tenant` scope: no
        gateway can tell it from another tenant's id; `shared`: the default reserved), as
        in the nginx module. Records after a given-up one are not tried (Redis is away)."""
        ttl = self.e.settings.previous_response_ttl_seconds
        kept = _kept(call)
        for done, (what, named) in enumerate(kept):
            try:
                await self.e.record_retry.call_with_retry(
                    self._record_call(call.principal.tenant, what, named, tokens, ttl),
                    self._record_failed,
                )
            except STORE_ERRORS as exc:
                self._records_lost(call.principal.tenant, kept[done:], exc)
                return

    def _record_call(
        self, tenant: str, what: EarlierKind, named: str, tokens: int, ttl: float
    ) -> StoreCall:
        return lambda: self.e.admission.remember_response(tenant, named, tokens, ttl, what)

    async def _record_failed(self, _error: BaseException) -> None:
        self.e.metrics.store_errors.labels("record").inc()

    def _records_lost(
        self, tenant: str, lost: list[tuple[EarlierKind, str]], error: BaseException
    ) -> None:
        for what, _named in lost:
            self.e.metrics.records_lost.labels(what).inc()
        self._log.error(
            "cannot record a response's tokens: Redis failed every try; a request continuing "
            "it is refused 404 (or, shared, reserves the default)",
            tenant=tenant,
            **{f"{what}_id": named for what, named in lost},
            error=_said(error),
        )

    async def _admit(
        self, principal: Principal, plan: PlanInfo, request: ModelRequest, ip: str | None
    ) -> _Call | Response:
        """Admit or refuse; an admitted request comes back rewritten as the plan degrades it."""
        request_id = uuid.uuid4().hex
        tokens = request.worst_case_tokens
        metrics = self.e.metrics
        model = request.model
        wanted = AdmissionRequest(
            tenant=principal.tenant,
            plan=principal.plan,
            user=principal.user,
            ip=ip,
            model=model,
            tokens=tokens,
            request_id=request_id,
            least_tokens=request.least_tokens,
        )
        try:
            result = await self.e.admission.admit(wanted)
        except STORE_ERRORS as exc:
            metrics.store_errors.labels("admit").inc()
            return self._fail_mode(principal, plan, request, wanted, exc)
        if len(self.e.pending):  # Redis answers again: charge what an outage held back
            self.e.pending.retry_soon()
        if result.outcome == "not_configured" and plan.fail_mode == "open":
            return self._fail_mode(principal, plan, request, wanted, None)
        if result.budget is not None and result.budget.kind == "tokens":
            metrics.budget(
                principal.tenant,
                result.budget.address,
                result.budget.limit,
                result.budget.remaining,
            )
        if result.outcome == "corrupt_state":  # the operator must repair it: said loudly
            self._log.error("limit state damaged", damage=result.damage)
        if result.outcome != "allow":
            metrics.request(principal.tenant, principal.plan, model, result.outcome)
            if result.outcome in _LIMIT_REFUSALS and result.denied_by:
                metrics.refused_by(result.denied_by)
            return self.e.answers.refused(result, plan.insufficient_quota)
        self.e.failmode.memory.remember(principal.tenant, principal.user, result)
        headers = rate_limit_headers(result)
        if result.reserved is not None and request.fit(result.reserved):
            # No max_tokens from the client: the default is lowered to what is left, and said.
            headers["x-governor-max-tokens"] = str(request.max_tokens)
        outcome = "allow"
        if result.degrade is not None and _degrade(request, result.degrade):
            headers.update(degrade_headers(result.degrade))
            outcome = "degraded"
        call = self._call(principal, request, request_id, result, headers, outcome)
        call.paid = plan.credits is not None
        return call

    def _release_unanswered(self, reservation: str, tenant: str) -> None:
        """An admission that went out unanswered may have reserved all the same (a stalled
        Redis runs it once it wakes): its release is held, so the slot, tokens and credits it
        may hold come back once Redis answers, not at the end of its lease minutes later. A
        release of a reservation never made changes nothing."""
        self.e.pending.hold(
            "release", lambda: self.e.admission.release(reservation, tenant), spare=True
        )
        self._log.warning(
            "admission unanswered; its release is held until Redis answers",
            reservation=reservation,
            held=len(self.e.pending),
        )

    def _call(
        self,
        principal: Principal,
        request: ModelRequest,
        request_id: str,
        result: AdmissionResult | None,
        headers: dict[str, str],
        outcome: str,
    ) -> _Call:
        strip = None
        if request.streaming and request.ask_for_stream_usage():
            strip = UsageChunkFilter()
        headers["x-governor-request-id"] = request_id
        meter = UsageMeter(request.streaming, request.prompt_tokens, request.worst_case_tokens,
                           request.background)  # fmt: skip
        reservation = result.reservation if result is not None else None
        call = _Call(
            principal, principal.plan, request, request_id, reservation, meter, headers, outcome
        )
        call.strip = strip
        # In flight from here until `_settle` (which `_forward` always reaches) gives its
        # slots back, or hands a background response's to `_leaves`' held part.
        call.admitted = self.e.metrics.clock()
        self.e.metrics.started(principal.tenant, principal.plan, request.model)
        return call

    def _fail_mode(
        self,
        principal: Principal,
        plan: PlanInfo,
        request: ModelRequest,
        wanted: AdmissionRequest,
        error: BaseException | None,
    ) -> _Call | Response:
        """Redis unreachable (`error`), or reachable with no limits written yet (None): the
        plan's fail mode decides, through the local limiter."""
        if isinstance(error, UnansweredAdmissionError):
            self._release_unanswered(error.reservation, principal.tenant)
        decision = self.e.failmode.decide(
            principal.tenant, principal.user, principal.plan, plan.fail_mode,
            request.worst_case_tokens,
        )  # fmt: skip
        self._log.warning(
            "limit store unreachable" if error is not None else "no limits written yet",
            plan=principal.plan,
            fail_mode=plan.fail_mode,
            decision=decision.outcome,
            error=_said(error) if error is not None else None,
        )
        metrics = self.e.metrics
        if decision.outcome == "closed" and error is None:
            metrics.request(principal.tenant, principal.plan, request.model, "not_configured")
            return self.e.answers.not_configured()
        if decision.outcome == "closed":
            metrics.request(principal.tenant, principal.plan, request.model, "fail_closed")
            return self.e.answers.enforcement_unavailable(principal.plan)
        if decision.outcome == "limited":
            metrics.request(principal.tenant, principal.plan, request.model, "rate_limited")
            return self.e.answers.locally_limited(decision.address or "local", decision.wait)
        gateways = self.e.failmode.presence.live if self.e.failmode.presence else 1
        headers = {"x-governor-fail-open": f"local limiter, 1/{gateways} of each limit"}
        call = self._call(principal, request, wanted.request_id, None, headers, "fail_open")
        call.unreserved = wanted  # charged when Redis answers again
        return call

    async def _forward(self, scope: Scope, receive: Receive, send: Send, call: _Call) -> None:
        body = call.request.encoded()
        inner_scope = _with_body_length(scope, body) if call.request.changed else scope
        replay = _replay(body, receive, passes_disconnect=call.request.streaming)

        async def observe(message: Message) -> None:
            if message["type"] == "http.response.start":
                call.status = int(message["status"])
                message = {**message, "headers": _merged(message, call.headers, call.strip)}
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk and call.status is not None and call.status < 400:
                    call.meter.feed(chunk)
                if call.strip is not None:  # metered above from the bytes as they came
                    last = not message.get("more_body", False)
                    message = {**message, "body": call.strip.feed(chunk, last)}
                if not message.get("more_body", False):
                    # Charge before the last byte: a client that sends its next request when
                    # this one ends always finds this one's usage on the books.
                    with anyio.CancelScope(shield=True):
                        await self._settle(call)
            await send(message)

        try:
            await self.app(inner_scope, replay, observe)
        finally:
            with anyio.CancelScope(shield=True):
                await self._settle(call)  # a response cut short: charge what was seen

    async def _settle(self, call: _Call) -> None:
        """Charge what was used; refund all when the upstream refused or never answered.
        Runs once per call, whichever of the end of the body or the end of the app comes first."""
        if call.settled:
            return
        call.settled = True
        principal = call.principal
        model = call.request.model
        failed = call.status is None or call.status >= 400
        usage = None if failed else call.meter.finish()
        self._leaves(call, usage)
        self.e.metrics.request(
            principal.tenant, call.plan, model, "upstream_error" if failed else call.outcome
        )
        reservation = call.reservation
        if usage is None:
            if reservation is not None:
                await self._store(
                    "release", lambda: self.e.admission.release(reservation, principal.tenant)
                )
            return
        if usage.estimated:
            self.e.metrics.estimated.labels(self.e.metrics.plan(call.plan)).inc()
            self._log.info(
                "upstream sent no usage; settled from an estimate",
                request_id=call.request_id,
                tokens=usage.total_tokens,
            )
        cost = self.e.prices.cost(model, usage.prompt_tokens, usage.completion_tokens)
        self.e.metrics.usage(
            principal.tenant, call.plan, model, usage.prompt_tokens, usage.completion_tokens, cost
        )
        if call.unreserved is not None:
            # Held at once, not tried now: Redis was unreachable a moment ago, and a try could
            # hold the answer's last byte for a whole socket timeout. The heartbeat, or the
            # next admission that reaches Redis, charges it.
            served, used = call.unreserved, TokensUsed(usage.prompt_tokens, usage.completion_tokens)
            self.e.pending.hold("charge", lambda: self.e.admission.charge(served, used))
        if reservation is not None:
            # Recorded before the settle (as nginx does): a settle seen means the record that
            # the next turn reads is in place.
            await self._remember(call, usage.total_tokens)

            # A background answer's generation goes on after it: its slots stay held.
            running = _runs_on(call, usage)

            async def settle() -> None:
                known = await self.e.admission.settle(
                    reservation,
                    principal.tenant,
                    usage.total_tokens,
                    model,
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    keep_slots=running,
                )
                # Kept only once its charge is on the books (a settle held until Redis
                # answers keeps it then): a settle that never landed must refund nothing.
                if known and running:
                    await self._keep_background(call, reservation, usage, cost)

            await self._store("settle", settle)

    def _leaves(self, call: _Call, usage: Usage | None) -> None:
        """The call leaves the in-flight gauge as its slots are given back: at once, or, a
        background answer whose generation goes on (its slots kept by the settle), when a
        read gives them back or its admission's lease ends."""
        metrics, tenant, model = self.e.metrics, call.principal.tenant, call.request.model
        named = call.meter.response_id
        if usage is None or call.reservation is None or named is None or not _runs_on(call, usage):
            metrics.finished(tenant, call.plan, model)
            return
        until = call.admitted + self.e.admission.lease_seconds
        metrics.held(tenant, call.plan, model, named, until)

    async def _keep_background(
        self, call: _Call, reservation: str, usage: Usage, cost: float
    ) -> None:
        """A background answer settled at its whole reservation (its usage comes later),
        its slots kept: keep what it is charged, so a read or cancel that sees it finished
        gives the slots back and settles the difference. Not kept (a Redis failure,
        logged): it stays charged its reservation, its slots held until their lease ends."""
        named = call.meter.response_id
        if named is None:
            return
        # The credits settle.lua took: only a plan that held credits at admission is charged.
        money = (to_micro(cost) if usage.total_tokens > 0 else 0) if call.paid else None
        charged = BackgroundCharge(
            call.request_id, call.plan, call.principal.user, None, call.request.model or "",
            usage.prompt_tokens, usage.completion_tokens, money, 0,
        )  # fmt: skip
        ttl = self.e.settings.previous_response_ttl_seconds
        tenant = call.principal.tenant
        try:
            if await self.e.admission.keep_background(tenant, named, reservation, charged, ttl):
                # A cancel ended it before this settle (a streamed create's client has the
                # id from its first event): nothing generates; the charge is kept for a read.
                self.e.metrics.given_back(tenant, named)
                await self.e.admission.release(reservation, tenant)
        except STORE_ERRORS as exc:
            self.e.metrics.store_errors.labels("record").inc()
            self._log.warning("cannot keep what a background response is charged; it stays "
                              "charged its reservation", tenant=call.principal.tenant,
                              response_id=named, error=_said(exc))  # fmt: skip

    async def _store(self, operation: str, action: StoreCall) -> None:
        try:
            await action()
        except STORE_ERRORS as exc:
            # Held and repeated once Redis answers: the settle record outlives the lease by
            # the record grace, so the usage is still charged (and a release still frees).
            self.e.metrics.store_errors.labels(operation).inc()
            self.e.pending.hold(operation, action)
            self._log.warning(
                "limit store call failed; held until Redis answers",
                operation=operation,
                error=str(exc),
                held=len(self.e.pending),
            )


def _runs_on(call: _Call, usage: Usage) -> bool:
    """Whether the model server goes on generating after this answer: a background response
    answered unfinished (no usage yet, and a `status` not final) that a later read can
    settle (kept, with an id). One answered already ended without usage (`failed`,
    `cancelled`… with `usage: null`) is charged its reservation and gives its slots back
    now: no later read is sure to come, and they were held for the whole lease."""
    request = call.request
    return (
        request.background
        and request.stored
        and usage.estimated
        and not call.meter.ended
        and call.meter.response_id is not None
    )


def _kept(call: _Call) -> list[tuple[EarlierKind, str]]:
    """What a settled Responses answer lets a later request name: its id, when the model
    server keeps it (`store` not false), and the conversation it belongs to (its items are
    kept in the conversation whatever `store` says); each holds the answer's tokens."""
    kept: list[tuple[EarlierKind, str]] = []
    if call.meter.response_id is not None and call.request.stored:
        kept.append(("response", call.meter.response_id))
    if call.meter.conversation_id is not None:
        kept.append(("conversation", call.meter.conversation_id))
    return kept


def unknown_earlier_tokens(settings: GatewaySettings, model: str) -> int:
    """What a `previous_response_id` without a record reserves: the model's context window
    when the settings name it (the most the model server can read back), else the default."""
    windows = {model_key(name): tokens for name, tokens in settings.context_windows.items()}
    return windows.get(model_key(model), settings.unknown_previous_response_tokens)


def passes(method: str, path: str, pass_paths: tuple[str, ...]) -> bool:
    """May a request that is no model call go upstream uncounted? Only a read (GET, HEAD) of
    a pass path or below it, with no '..' segment (an upstream would resolve it elsewhere)."""
    if method not in ("GET", "HEAD") or ".." in path.split("/"):
        return False
    return any(path == root or path.startswith(root + "/") for root in pass_paths)


def _said(error: BaseException) -> str:
    """A store error for the log: its type and message (the message names the server and
    what to do, e.g. the Cluster URL to set, the CA file a certificate needs; a bare type
    name helps no operator)."""
    return f"{type(error).__name__}: {error}{connection_hint(error)}"


def _degrade(request: ModelRequest, degrade: Degradation) -> bool:
    """Apply the plan's degradation to the request; False when it changed nothing."""
    changed = False
    if degrade.max_tokens is not None and (request.max_tokens or 0) > degrade.max_tokens:
        request.set_max_tokens(degrade.max_tokens)
        changed = True
    if degrade.model is not None and request.model != degrade.model:
        request.set_model(degrade.model)
        changed = True
    return changed


def _headers(scope: Scope) -> dict[str, str]:
    """Header names lower-cased; a repeated header's lines joined by ',' in order (RFC 9110
    §5.3), so no line is silently dropped (the authenticator refuses two credentials)."""
    joined: dict[str, str] = {}
    for key, value in scope["headers"]:
        name, text = key.decode("latin-1").lower(), value.decode("latin-1")
        joined[name] = f"{joined[name]},{text}" if name in joined else text
    return joined


def _client_ip(scope: Scope, trust_forwarded_for: bool) -> str | None:
    """The client address the ip level counts: the last X-Forwarded-For entry when the proxy
    in front is trusted (ForwardedForError when it is no address), else the peer's."""
    if trust_forwarded_for:
        lines = [
            v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"x-forwarded-for"
        ]
        forwarded = forwarded_client(lines)
        if forwarded is not None:
            return forwarded
    client = scope.get("client")
    return str(client[0]) if client else None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None when it is larger than `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive, passes_disconnect: bool) -> Receive:
    """A receive that hands the app the (possibly rewritten) body once, then waits for the
    client's disconnect like the real one (`passes_disconnect`), or for nothing.

    A stream's disconnect is passed on: the app stops reading the upstream, and the model
    server stops generating. A non-streamed answer is generated whole before its first byte:
    a client gone by then must not cut the app's relaying of it (Starlette's response stops
    at the disconnect), or the gateway meters no byte of an answer the model server produced
    in full, and settles it as the prompt alone (or nothing). Unaware, the app relays it all
    into a closed connection (the server drops the writes) and the usage is charged."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if passes_disconnect:
            return await receive()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    return replay


def _with_body_length(scope: Scope, body: bytes) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    return {**scope, "headers": headers}


def _merged(
    message: MutableMapping[str, Any], extra: Mapping[str, str], strip: object = None
) -> list[Any]:
    names = {name.lower().encode("latin-1") for name in extra}
    if strip is not None:  # the body will be shorter than the upstream said
        names.add(b"content-length")
    kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
    kept.extend((k.encode("latin-1"), _ascii(v)) for k, v in extra.items())
    return kept


def _ascii(value: str) -> bytes:
    # Header values must be latin-1; a reason written in any language is made ASCII-safe.
    return value.encode("ascii", "replace")
