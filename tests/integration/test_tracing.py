"""Tracing on a real coordinator with 2 real workers (tiny-llama): one trace per request, the child of the
caller's traceparent, with a span per stage step; nothing at all while tracing is off; and spans exported
with OTLP to a real gRPC collector when an endpoint is configured."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from shardline import tracing
from shardline.client import Client, generate_request
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

TRACE_ID, PARENT_ID = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"
NEW = 6


@pytest.fixture()
def cluster(loop, store, parameters, workers, tmp_path):
    started = []

    def start(**settings):
        config = CoordinatorConfig(store=store.root, model="tiny-llama", workers=2, port=0, jobs_dir=tmp_path,
                                   parameters_address=parameters.address, heartbeat_timeout_ms=3_600_000,
                                   **settings)
        coordinator = loop.run(start_coordinator(config))
        started.append(coordinator)
        registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
        for w in workers(2):
            registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=w.address,
                                                                          memory_budget_bytes=2**30))
        with Client(coordinator.address, timeout=120) as client:
            client.wait_ready(timeout=120)
        return coordinator

    yield start
    tracing.shutdown()
    tracing.off()
    for coordinator in started:
        loop.run(coordinator.stop())


def generate(address: str, metadata=()) -> list[int]:
    stub = coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(address))
    request = generate_request([5, 9, 13, 17], max_tokens=NEW, temperature=0, ignore_eos=True)
    return [t for r in stub.Generate(request, metadata=metadata, timeout=60) for t in r.token_ids]


def test_a_trace_per_request_with_a_span_per_stage_step(cluster):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    coordinator = cluster()
    untraced = generate(coordinator.address, [("traceparent", TRACEPARENT)])
    assert exporter.get_finished_spans() == ()  # off: the caller's context is not even read

    tracing.use(provider)
    assert generate(coordinator.address, [("traceparent", TRACEPARENT)]) == untraced
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == TRACE_ID]
    requests = [s for s in spans if s.name == "shardline.Generate"]
    assert len(requests) == 1
    request = requests[0]
    assert request.parent.span_id == PARENT_ID  # the caller's span is its parent
    assert request.attributes["completion_tokens"] == NEW and request.attributes["prompt_tokens"] == 4
    stages: dict[str, list] = {}
    for span in spans:
        if span is not request:
            assert span.parent.span_id == request.context.span_id
            assert request.start_time <= span.start_time <= span.end_time <= request.end_time
            stages.setdefault(span.name, []).append(span)
    # a prefill step and NEW - 1 decode steps, on each of the 2 stages
    assert sorted(stages) == ["stage [0, 3)", "stage [3, 6)"]
    assert [len(v) for v in stages.values()] == [NEW, NEW]
    assert sorted(s.attributes["step_tokens"] for s in stages["stage [0, 3)"]) == [1] * (NEW - 1) + [4]

    exporter.clear()  # a request without a caller's context is a trace of its own
    generate(coordinator.address)
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "shardline.Generate"]
    assert len(roots) == 1 and roots[0].parent is None and roots[0].context.trace_id != TRACE_ID
    assert len(spans) == 1 + 2 * NEW and {s.context.trace_id for s in spans} == {roots[0].context.trace_id}

    tracing.off()
    exporter.clear()
    generate(coordinator.address, [("traceparent", TRACEPARENT)])
    assert exporter.get_finished_spans() == ()


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps what it is sent."""

    def __init__(self) -> None:
        self.spans: list = []

    def Export(self, request, context):  # noqa: N802 - the gRPC method's name
        for resource in request.resource_spans:
            service = next(a.value.string_value for a in resource.resource.attributes if a.key == "service.name")
            for scope in resource.scope_spans:
                self.spans.extend((service, s) for s in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_are_exported_with_otlp_to_the_configured_collector(cluster):
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        coordinator = cluster(otlp_endpoint=f"http://127.0.0.1:{port}")
        generate(coordinator.address, [("traceparent", TRACEPARENT)])
        tracing.shutdown()  # flushes the batch exporter
        deadline = time.monotonic() + 10
        while len(collector.spans) < 1 + 2 * NEW and time.monotonic() < deadline:
            time.sleep(0.05)
        ours = [(service, s) for service, s in collector.spans if s.trace_id == TRACE_ID.to_bytes(16, "big")]
        assert sorted(s.name for _, s in ours) == ["shardline.Generate"] + ["stage [0, 3)"] * NEW + \
            ["stage [3, 6)"] * NEW
        assert {service for service, _ in ours} == {"shardline-coordinator"}  # the workers share this process
    finally:
        server.stop(0)
