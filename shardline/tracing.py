"""OpenTelemetry traces, optional: one trace per request, with a span per stage step.

Off unless configured (`--otlp-endpoint`, or the standard OTEL_EXPORTER_OTLP_ENDPOINT): every hook first
checks one module global and returns, so a cluster without tracing pays a None check per request and per
step, and needs no OpenTelemetry package (the `tracing` extra installs it).

Propagation is W3C trace context. A client sends `traceparent` (and `tracestate`) as gRPC metadata; the
coordinator's request span is its child. On the data plane one long-lived Forward stream carries the steps of
many requests, so per-call metadata cannot say whose step a message is: each sequence of a step carries its
request's traceparent (`SequenceSlice.traceparent`, empty, so not on the wire, when tracing is off), and every
stage that computes the step records one span per traced sequence, a child of that request's span.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)
_tracer: Any = None  # the tracer while tracing is on; None = off
_provider: Any = None  # the provider configure() made (flushed and shut down by shutdown())
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
CONTEXT_KEYS = ("traceparent", "tracestate")


def on() -> bool:
    return _tracer is not None


def configure(endpoint: str, service: str) -> bool:
    """Export spans with OTLP over gRPC to `endpoint` (or $OTEL_EXPORTER_OTLP_ENDPOINT when it is empty);
    `http://host:4317` for a collector without TLS, `https://…` with it. False when neither is set (tracing
    stays off). Once on, a second call (a second server in one process) keeps the first exporter."""
    from_env = not endpoint
    endpoint = endpoint or os.environ.get(ENDPOINT_ENV, "")
    if not endpoint or (from_env and os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true"):
        return False
    if _tracer is not None:
        return True
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        message = f"tracing to {endpoint} needs OpenTelemetry: pip install 'shardline[tracing]' ({exc})"
        if from_env:  # a variable set for the whole machine does not stop a server that was not asked to trace
            log.warning("%s; $%s is set, tracing stays off", message, ENDPOINT_ENV)
            return False
        raise RuntimeError(message) from exc
    global _provider
    _provider = TracerProvider(resource=Resource.create({"service.name": service}))
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    use(_provider)
    return True


def use(provider: Any) -> None:
    """Trace with `provider` (an opentelemetry.sdk TracerProvider); tests give one with an in-memory
    exporter."""
    global _tracer
    _tracer = provider.get_tracer("shardline")


def off() -> None:
    global _tracer
    _tracer = None


def shutdown() -> None:
    """Flush what configure()'s exporter still holds (a server's stop)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None
        off()


def _context(carrier: dict[str, str]) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(carrier)


@contextlib.contextmanager
def request_span(name: str, context: Any = None, **attributes: Any) -> Iterator[Any]:
    """A server span for one request, the child of the caller's trace context when its gRPC metadata carries
    one (`context` is the servicer's grpc context, or None); None while tracing is off. An exception that
    leaves it marks the span as an error. The span is not made current: the request's work passes
    `traceparent(span)` on explicitly, so no context needs detaching in another task."""
    if _tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind, Status, StatusCode

    carrier = {k: v for k, v in (context.invocation_metadata() or ()) if k in CONTEXT_KEYS} if context else {}
    span = _tracer.start_span(name, context=_context(carrier), kind=SpanKind.SERVER, attributes=attributes)
    try:
        yield span
    except BaseException as exc:
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"))
        raise
    finally:
        span.end()


def traceparent(span: Any) -> str:
    """The W3C traceparent of `span`; "" for None (tracing off) and for a span the sampler dropped, so that
    the stages record nothing for it."""
    if span is None or not span.is_recording():
        return ""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def step_spans(name: str, parents: Iterable[str], start_ns: int, end_ns: int, **attributes: Any) -> int:
    """One span per distinct traced request of a step (its traceparent), from `start_ns` to `end_ns` (wall
    clock); the number recorded. Nothing while tracing is off."""
    if _tracer is None:
        return 0
    recorded = 0
    for parent in dict.fromkeys(p for p in parents if p):
        span = _tracer.start_span(name, context=_context({"traceparent": parent}), start_time=start_ns,
                                  attributes=attributes)
        span.end(end_time=end_ns)
        recorded += 1
    return recorded
