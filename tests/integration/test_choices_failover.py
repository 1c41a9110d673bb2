"""Four seeded choices of one prompt (issue 30.2's must-show) while the worker of a stage is SIGKILLed mid-
generation: each choice replays (on a spare) and writes exactly what the undisturbed run wrote, none failing.
Real worker processes on SmolLM2; slow and chaos (it kills a process): `make test-slow`."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from coordinator.api.server import start_coordinator
from coordinator.cli.launcher import spawn_worker, stop_processes
from coordinator.config import CoordinatorConfig
from shardline.client import AsyncClient, Client
from tests.integration.test_failover import BOUND_MB

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

PROMPT = "The old lighthouse keeper looked out over the stormy sea and"
PARAMS = dict(n=4, max_tokens=24, temperature=0.8, seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(loop, smollm2_store, parameters):
    config = CoordinatorConfig(store=smollm2_store.root, model="smollm2", workers=3, port=0,
                               parameters_address=parameters.address, heartbeat_interval_ms=500,
                               heartbeat_timeout_ms=5000, step_timeout_ms=20_000, probe_timeout_ms=1000)
    coordinator = loop.run(start_coordinator(config))

    async def spawn_all():
        return await asyncio.gather(*(spawn_worker("127.0.0.1", coordinator.address, BOUND_MB,
                                                   extra=("--step-timeout-ms", "20000")) for _ in range(4)))

    processes = loop.run(spawn_all())
    with Client(coordinator.address) as client:
        client.wait_ready(timeout=180)
    deadline = time.monotonic() + 30
    while len(coordinator.fleet.registry.live()) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    yield coordinator, processes
    loop.run(coordinator.stop())
    loop.run(stop_processes(processes))


async def choices(address: str, kill=None) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(4)]
    async with AsyncClient(address, timeout=300) as client:
        async for chunk in await client.generate(PROMPT, stream=True, **PARAMS):
            out[chunk.index] += chunk.token_ids
            if kill is not None and min(len(o) for o in out) >= 5:
                kill()
                kill = None
    return out


def test_four_seeded_choices_survive_a_sigkilled_worker_unchanged(cluster):
    coordinator, processes = cluster
    undisturbed = asyncio.run(choices(coordinator.address))
    assert [len(t) for t in undisturbed] == [24] * 4 and len({tuple(t) for t in undisturbed}) == 4
    recoveries = coordinator.fleet.recoveries
    victim = coordinator.fleet.first.assignment[1].address
    process = next(p for p in processes if p.address == victim)
    disturbed = asyncio.run(choices(coordinator.address, lambda: os.kill(process.process.pid, signal.SIGKILL)))
    assert coordinator.fleet.recoveries == recoveries + 1  # the kill happened mid-generation and was healed
    assert disturbed == undisturbed
