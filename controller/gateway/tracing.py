"""OpenTelemetry spans, only when an OTLP endpoint is configured (the `otel` extra).

Without it, the W3C `traceparent`/`tracestate` headers are simply forwarded to the upstream.
With it, the gateway's span continues the caller's trace and the upstream sees the gateway's
span as its parent.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

from controller.errors import ConfigurationError


class Tracing:
    """A tracer provider of our own (never the process-global one) exporting over OTLP/HTTP."""

    def __init__(self, endpoint: str, service_name: str = "governor-gateway") -> None:
        try:
            from opentelemetry import context, trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError as exc:
            raise ConfigurationError(
                "GOVERNOR_GATEWAY__OTLP_ENDPOINT is set but OpenTelemetry is not installed: "
                "pip install 'governor[otel]' (or unset the endpoint)"
            ) from exc
        self._trace = trace
        self._context = context
        self._propagator = TraceContextTextMapPropagator()
        resource = Resource.create({"service.name": service_name})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), schedule_delay_millis=1000)
        )
        self.tracer = self.provider.get_tracer("governor.gateway")

    @contextmanager
    def server_span(self, name: str, headers: Mapping[str, str]) -> Iterator[Any]:
        """A SERVER span continuing the caller's `traceparent`, current inside the block."""
        parent = self._propagator.extract(carrier=dict(headers))
        with self.tracer.start_as_current_span(
            name, context=parent, kind=self._trace.SpanKind.SERVER
        ) as span:
            yield span

    @contextmanager
    def client_span(self, name: str, headers: MutableMapping[str, str]) -> Iterator[Any]:
        """A CLIENT span for the upstream call; its context is written into `headers`."""
        with self.tracer.start_as_current_span(name, kind=self._trace.SpanKind.CLIENT) as span:
            headers.pop("traceparent", None)
            headers.pop("tracestate", None)
            self._propagator.inject(headers)
            yield span

    def shutdown(self) -> None:
        """Export what is buffered, then stop."""
        self.provider.shutdown()
