"""Every server offers reflection (so grpcurl works) and health checking."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.helpers import load


def services(address):
    return set(ProtoReflectionDescriptorDatabase(grpc.insecure_channel(address)).get_services())


def test_reflection_and_health(workers, parameters):
    (worker,) = workers(1)
    assert "shardline.v1.ShardWorker" in services(worker.address)
    assert "grpc.health.v1.Health" in services(worker.address)
    assert "shardline.v1.Parameters" in services(parameters.address)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(worker.address))
    request = health_pb2.HealthCheckRequest(service="shardline.v1.ShardWorker")
    assert health.Check(request).status == health_pb2.HealthCheckResponse.NOT_SERVING
    load(worker.address, "tiny-llama", 0, 6, parameters.address)
    assert health.Check(request).status == health_pb2.HealthCheckResponse.SERVING


def test_the_coordinator_offers_every_api_it_serves_to_reflection(loop, store, parameters, tmp_path):
    """grpcurl lists and describes the coordinator's services: its own, the worker registry, and KServe v2
    (issue 34.11)."""
    from coordinator.api.server import start_coordinator
    from coordinator.config import CoordinatorConfig

    coordinator = loop.run(start_coordinator(CoordinatorConfig(
        store=store.root, model="tiny-llama", workers=1, port=0, parameters_address=parameters.address,
        jobs_dir=tmp_path, http=False)))
    try:
        found = services(coordinator.address)
        assert {"shardline.v1.Coordinator", "shardline.v1.WorkerRegistry", "inference.GRPCInferenceService",
                "grpc.health.v1.Health"} <= found, found
        # and each is described (grpcurl describe), KServe's under the specification's package
        described = descriptor_pool.DescriptorPool(
            ProtoReflectionDescriptorDatabase(grpc.insecure_channel(coordinator.address)))
        infer = described.FindServiceByName("inference.GRPCInferenceService").methods_by_name["ModelInfer"]
        assert (infer.input_type.full_name, infer.output_type.full_name) == (
            "inference.ModelInferRequest", "inference.ModelInferResponse")
        assert "inputs" in infer.input_type.fields_by_name
        generate = described.FindServiceByName("shardline.v1.Coordinator").methods_by_name["Generate"]
        assert generate.input_type.full_name == "shardline.v1.GenerateRequest"
    finally:
        loop.run(coordinator.stop())


def test_a_busy_port_is_an_error_not_a_shared_listener(loop, workers):
    from shard_worker.server import start_worker

    (worker,) = workers(1)
    import pytest

    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{worker.port}"):
        loop.run(start_worker("127.0.0.1", worker.port))


def test_coordinator_health_says_in_one_line_why_it_cannot_ask(workers, tmp_path):
    """Issue 34.1: the probe tells a closed port and TLS on one side only apart, instead of gRPC's own words."""
    import subprocess
    import sys

    from tests.e2e.test_join_and_generate import free_port

    def health(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "coordinator.cli", "health", *args], capture_output=True,
                              text=True, timeout=60)

    closed = health("--endpoint", f"127.0.0.1:{free_port()}")
    assert closed.returncode == 1 and "nothing listens there" in closed.stderr, closed.stderr
    made = subprocess.run([sys.executable, "-m", "coordinator.cli", "certs", "create-ca", "--certs-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    (worker,) = workers(1)  # plaintext
    mismatch = health("--endpoint", worker.address, "--certs-dir", str(tmp_path))
    assert mismatch.returncode == 1 and "speaks plaintext, not TLS" in mismatch.stderr, mismatch.stderr
    for result in (closed, mismatch):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
