"""Continuous batching never changes results, frees what a cancelled stream held, and refuses the excess."""

from __future__ import annotations

import asyncio
import time

from shardline.client import AsyncClient, Client
from shardline.errors import ResourceExhausted
from shardline.v1 import worker_pb2
from tests.helpers import worker_stub

CITIES = ["Paris", "Rome", "Cairo", "Lima", "Oslo", "Delhi", "Tokyo", "Madrid", "Berlin", "Vienna", "Lagos",
          "Quito", "Seoul", "Dublin", "Athens"]
PROMPTS = [f"The history of the city of {city} began" for city in CITIES] + ["The capital of France is"]


def test_greedy_tokens_are_the_same_alone_and_among_15_streams_joining_at_different_times(smollm2_cluster):
    coordinator, _ = smollm2_cluster
    with Client(coordinator.address, timeout=300) as client:
        client.wait_ready(timeout=120)
        alone = {p: client.generate(p, max_tokens=20, temperature=0).token_ids for p in PROMPTS}

    async def together():
        async with AsyncClient(coordinator.address, timeout=300) as client:
            async def one(i, prompt):
                await asyncio.sleep(0.15 * i)  # join while the others are running
                return prompt, (await client.generate(prompt, max_tokens=20, temperature=0)).token_ids

            return dict(await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS))))

    batched = asyncio.run(together())
    assert batched == alone
    assert sum(len(t) for t in alone.values()) > 15 * 5  # real generations, not empty ones


def sessions_everywhere(servers):
    return [worker_stub(s.address).GetStatus(worker_pb2.GetStatusRequest()) for s in servers]


def test_cancelling_a_stream_frees_its_kv_cache_on_every_stage(smollm2_cluster):
    coordinator, servers = smollm2_cluster
    with Client(coordinator.address, timeout=300) as client:
        client.wait_ready(timeout=120)
        chunks = client.generate("Write a long story about a dragon.", max_tokens=500, temperature=0.8, seed=3,
                                 stream=True)
        for _, _ in zip(range(5), chunks, strict=False):
            pass
        assert all(s.sessions == 1 and s.kv_cache_bytes > 0 for s in sessions_everywhere(servers))
        chunks.close()  # the client cancels the call
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(s.sessions for s in sessions_everywhere(servers)):
            time.sleep(0.1)
        statuses = sessions_everywhere(servers)
        assert all(s.sessions == 0 and s.kv_cache_bytes == 0 for s in statuses), statuses
        assert client.cluster_status().active_sessions == 0


def test_requests_beyond_the_admission_queue_are_refused_while_admitted_ones_complete(smollm2_cluster):
    coordinator, _ = smollm2_cluster
    scheduler = coordinator.fleet.first.scheduler.policy
    limits = scheduler.max_active, scheduler.max_queued
    scheduler.max_active, scheduler.max_queued = 2, 1  # configuration, as `max_active_streams` would set it
    try:
        async def burst():
            async with AsyncClient(coordinator.address, timeout=300) as client:
                async def one(i):
                    try:
                        return (await client.generate(f"Count to {i}:", max_tokens=12, temperature=0)).finish_reason
                    except ResourceExhausted as exc:
                        assert "try again later" in exc.message
                        return "refused"

                return await asyncio.gather(*(one(i) for i in range(6)))

        outcomes = asyncio.run(burst())
    finally:
        scheduler.max_active, scheduler.max_queued = limits
    assert outcomes.count("refused") == 3
    assert all(o in ("length", "stop") for o in outcomes if o != "refused")


def test_per_stage_metrics_count_the_work(smollm2_cluster):
    coordinator, _ = smollm2_cluster
    with Client(coordinator.address, timeout=300) as client:
        client.wait_ready(timeout=120)
        before = {w.address: w for w in client.cluster_status().workers}
        client.generate("The capital of France is", max_tokens=8, temperature=0)
        after = client.cluster_status().workers
    for w in after:
        b = before[w.address]
        assert w.busy_ms > b.busy_ms and w.bytes_in > b.bytes_in and w.bytes_out > b.bytes_out
        assert w.idle_ms >= 0 and w.queue_depth == 0 and w.tokens_per_second > 0
    first, middle = after[0], after[1]
    assert middle.bytes_in - before[middle.address].bytes_in > 576 * 4 * 6  # hidden states, not token ids
    assert first.bytes_in - before[first.address].bytes_in < 2000  # token ids only
