"""A default cluster (keepalive every 20 s, gRPC's ping policy replaced by ours) idles for 4 minutes, then
serves at once on the same streams: before the fix, servers closed every link after ~2.5 idle minutes
(GOAWAY too_many_pings) and the next request hung."""

from __future__ import annotations

import time

import pytest

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from shard_worker.server import start_worker
from shardline.client import Client
from tests.integration.test_resilience import register

pytestmark = pytest.mark.slow


def test_a_default_cluster_idle_for_four_minutes_serves_the_next_request_on_the_same_streams(
        loop, smollm2_store, parameters, capfd):
    # default keepalive; the workers are registered by hand and send no heartbeats, so none may be expected
    config = CoordinatorConfig(store=smollm2_store.root, model="smollm2", workers=2, port=0,
                               parameters_address=parameters.address, heartbeat_timeout_ms=3_600_000)
    coordinator = loop.run(start_coordinator(config))
    servers = [loop.run(start_worker()) for _ in range(2)]
    try:
        for server in servers:
            register(coordinator, server.address)
        with Client(coordinator.address, timeout=120) as client:
            client.wait_ready(timeout=120)
            first = client.generate("The capital of France is", max_tokens=8, temperature=0)
            chain = coordinator.fleet.first.pipeline.chain
            time.sleep(240)
            began = time.perf_counter()
            again = client.generate("The capital of France is", max_tokens=8, temperature=0)
            assert time.perf_counter() - began < 10
        assert again.token_ids == first.token_ids
        assert coordinator.fleet.first.pipeline.chain is chain and chain.first.connections == 1
        assert [s.servicer.links.reconnects for s in servers] == [0, 0]
        assert coordinator.fleet.recoveries == 0
        assert "too_many_pings" not in capfd.readouterr().err
    finally:
        for server in servers:
            loop.run(server.stop(0))
        loop.run(coordinator.stop())
