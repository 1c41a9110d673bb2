"""When the live workers cannot hold the model after a failure, the requests in flight fail with
UNAVAILABLE naming the missing memory, status says the same, and a worker that joins brings the cluster
back. Workers offer 300 MiB each: SmolLM2 needs three of them."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from shard_worker.server import start_worker
from shardline.client import AsyncClient, Client
from shardline.errors import Unavailable
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.chaos import PROMPTS

pytestmark = pytest.mark.chaos
BUDGET = 300 * 2**20


def register(address: str, coordinator: str) -> None:
    stub = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator))
    stub.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=address, memory_budget_bytes=BUDGET), timeout=10)


def test_too_little_memory_left_fails_in_flight_requests_clearly_and_a_joining_worker_heals(loop, smollm2_store,
                                                                                              parameters):
    config = CoordinatorConfig(store=smollm2_store.root, model="smollm2", workers=3, port=0,
                               parameters_address=parameters.address, heartbeat_timeout_ms=3_600_000,
                               probe_timeout_ms=1000)
    coordinator = loop.run(start_coordinator(config))
    servers = [loop.run(start_worker()) for _ in range(3)]
    try:
        for server in servers:
            register(server.address, coordinator.address)
        with Client(coordinator.address, timeout=120) as client:
            client.wait_ready(timeout=120)

        async def in_flight():
            counts = [0] * 4
            async with AsyncClient(coordinator.address, timeout=120) as client:
                async def one(i):
                    try:
                        async for chunk in await client.generate(PROMPTS[i], stream=True, max_tokens=200,
                                                                 temperature=0):
                            counts[i] += len(chunk.token_ids)
                    except Unavailable as exc:
                        return exc.message
                    return "finished"

                async def stop_a_worker():
                    while min(counts) < 3:
                        await asyncio.sleep(0.01)
                    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(servers[1].stop(0), loop.loop))

                *outcomes, _ = await asyncio.gather(*(one(i) for i in range(4)), stop_a_worker())
                return outcomes

        outcomes = asyncio.run(in_flight())
        assert all("MiB missing" in o for o in outcomes), outcomes
        with Client(coordinator.address, timeout=30) as client:
            status = client.cluster_status()
            assert status.state == "failed" and "MiB missing" in status.message, status
            with pytest.raises(Unavailable, match="MiB missing"):
                client.generate("Hello", max_tokens=2)
            joined = loop.run(start_worker())
            servers.append(joined)
            register(joined.address, coordinator.address)
            deadline = time.monotonic() + 60
            while client.cluster_status().state != "ready" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.generate("The capital of France is", max_tokens=4, temperature=0).completion_tokens == 4
    finally:
        for server in servers:
            loop.run(server.stop(0))
        loop.run(coordinator.stop())
