"""A cluster that is not ready answers UNAVAILABLE with the reason; a plan that does not fit names the
memory that is missing."""

from __future__ import annotations

import grpc
import pytest

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from shardline.client import Client
from shardline.errors import InvalidArgument, Unavailable
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc


@pytest.fixture()
def coordinator(loop, store, parameters):
    made = []

    def start(**fields):
        config = CoordinatorConfig(store=store.root, model="tiny-llama", port=0,
                                   parameters_address=parameters.address, **fields)
        made.append(loop.run(start_coordinator(config)))
        return made[-1]

    yield start
    for c in made:
        loop.run(c.stop())


def test_no_workers_is_unavailable(coordinator):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.integration.test_standard_services import services

    c = coordinator(workers=2)
    assert {"shardline.v1.Coordinator", "shardline.v1.WorkerRegistry"} <= services(c.address)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(c.address))
    request = health_pb2.HealthCheckRequest(service="shardline.v1.Coordinator")
    assert health.Check(request).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with Client(c.address, timeout=10) as client:
        with pytest.raises(Unavailable, match="0 of 2 workers registered"):
            client.generate("hello")
        assert not client.cluster_status().ready


def test_plan_that_does_not_fit_names_the_missing_memory(coordinator, workers):
    c = coordinator(workers=1)
    (worker,) = workers(1)
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(c.address))
    registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=worker.address,
                                                                  memory_budget_bytes=100_000))
    with Client(c.address, timeout=10) as client:
        for _ in range(50):
            status = client.cluster_status()
            if status.state == "failed":
                break
            import time

            time.sleep(0.1)
        assert status.state == "failed" and "MiB missing" in status.message
        with pytest.raises(Unavailable, match="MiB missing"):
            client.generate("hello")


def test_model_without_tokenizer_serves_no_text_and_bad_registration(coordinator, workers):
    c = coordinator(workers=1)
    (worker,) = workers(1)
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(c.address))
    with pytest.raises(grpc.RpcError) as err:
        registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address="nohost", memory_budget_bytes=1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "host:port" in err.value.details()
    registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=worker.address, memory_budget_bytes=2**30))
    with Client(c.address, timeout=30) as client:
        client.wait_ready(timeout=30)
        with pytest.raises(Exception, match="no tokenizer") as exc:
            client.generate("hello")
        assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(InvalidArgument):
            client.generate("")
