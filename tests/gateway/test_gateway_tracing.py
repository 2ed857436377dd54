"""With an OTLP endpoint set, the gateway emits spans that continue the caller's trace and
hands the upstream its own span as parent; the export goes to a local OTLP/HTTP receiver."""

from __future__ import annotations

from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.gateway.conftest import MakeGateway
from tests.gateway.fake_upstream import FakeUpstream, ServerThread

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def collector(received: list[Any]) -> Starlette:
    """The OTLP/HTTP traces endpoint: protobuf ExportTraceServiceRequest bodies."""

    async def traces(request: Request) -> Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.body())
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                received.extend(scope_spans.spans)
        return Response(b"", media_type="application/x-protobuf")

    return Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])


def test_spans_continue_the_callers_trace_and_parent_the_upstream_call(
    make_gateway: MakeGateway, upstream: tuple[FakeUpstream, str]
) -> None:
    spans: list[Any] = []
    receiver = ServerThread(collector(spans)).start()
    gateway = make_gateway(otlp_endpoint=f"{receiver.url}/v1/traces")
    try:
        key = gateway.key("acme", "free")
        answer = gateway.chat(key, headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"})
    finally:
        gateway.stop()  # the shutdown flushes the span batch
        receiver.stop()

    assert answer.status_code == 200
    by_kind = {span.kind: span for span in spans}
    server = by_kind[2]  # SPAN_KIND_SERVER
    client = by_kind[3]  # SPAN_KIND_CLIENT
    assert server.trace_id.hex() == TRACE_ID
    assert server.parent_span_id.hex() == CALLER_SPAN
    assert client.trace_id.hex() == TRACE_ID
    assert client.parent_span_id == server.span_id
    attributes = {a.key: a.value.string_value for a in server.attributes}
    assert (attributes["governor.tenant"], attributes["governor.plan"]) == ("acme", "free")
    seen = upstream[0].last().headers["traceparent"]
    assert seen == f"00-{TRACE_ID}-{client.span_id.hex()}-01"
