"""Worker processes leaving while 16 streams generate on SmolLM2: every stream finishes with the tokens an
undisturbed run gives. First a worker leaves on purpose (SIGTERM: its stage goes to a spare before it exits),
then one is killed (SIGKILL) with a spare to take over, then with no spare left (re-plan onto the live
workers), then with seeded sampling. The tests run in order on one cluster, which shrinks as they go.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from coordinator.api.server import start_coordinator
from coordinator.cli.launcher import spawn_worker, stop_processes
from coordinator.config import CoordinatorConfig
from shardline.client import Client
from shardline.limits import process_bound
from tests.chaos import PROMPTS, streams, wait_until_no_sessions

pytestmark = pytest.mark.chaos

GREEDY = dict(max_tokens=16, temperature=0)
SEEDED = dict(max_tokens=16, temperature=0.8, seed=7)

BOUND_MB = process_bound(1024 * 2**20) // 2**20  # each worker's process: 1 GiB for its shard, and its runtime


@pytest.fixture(scope="module")
def cluster(loop, smollm2_store, parameters):
    config = CoordinatorConfig(store=smollm2_store.root, model="smollm2", workers=3, port=0,
                               parameters_address=parameters.address, heartbeat_interval_ms=500,
                               heartbeat_timeout_ms=5000, step_timeout_ms=20_000, probe_timeout_ms=1000)
    coordinator = loop.run(start_coordinator(config))
    extra = ("--step-timeout-ms", "20000")

    async def spawn_all():
        return await asyncio.gather(*(spawn_worker("127.0.0.1", coordinator.address, BOUND_MB, extra=extra)
                                      for _ in range(5)))

    processes = loop.run(spawn_all())
    with Client(coordinator.address) as client:
        client.wait_ready(timeout=180)
    deadline = time.monotonic() + 30  # the fourth and fifth workers register as spares
    while len(coordinator.fleet.registry.live()) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    yield coordinator, processes
    loop.run(coordinator.stop())
    loop.run(stop_processes(processes))


@pytest.fixture(scope="module")
def undisturbed(cluster):
    coordinator, _ = cluster
    greedy = asyncio.run(streams(coordinator.address, PROMPTS, **GREEDY))
    seeded = asyncio.run(streams(coordinator.address, PROMPTS, **SEEDED))
    for tokens in (greedy, seeded):  # every stream runs to max_tokens: the same work in every run
        assert [len(t) for t in tokens] == [16] * len(PROMPTS)
    # the hand-over test's longer streams, every token compared (a replay error after the hand-over shows)
    long = asyncio.run(streams(coordinator.address, PROMPTS, **dict(GREEDY, max_tokens=64)))
    assert [t[:16] for t in long] == greedy
    return {"greedy": greedy, "seeded": seeded, "greedy64": long}


def kill_stage(cluster, stage: int):
    """An action for `streams`: SIGKILL the process of the worker serving `stage`."""
    coordinator, processes = cluster
    address = coordinator.fleet.first.assignment[stage].address
    process = next(p for p in processes if p.address == address)

    async def kill() -> None:
        os.kill(process.process.pid, signal.SIGKILL)

    return address, kill


def check_after(coordinator, killed: str, workers: int, recoveries_before: int) -> None:
    c = coordinator.fleet.first
    assert c.scheduler.policy.replayed > 0
    assert c.recoveries == recoveries_before + 1, c.last_recovery
    assert killed not in [w.address for w in c.assignment]
    assert len(c.assignment) == workers, c.last_recovery
    assert c.ready
    statuses = wait_until_no_sessions([w.address for w in c.assignment])
    assert all(s.sessions == 0 and s.kv_cache_bytes == 0 for s in statuses), statuses


def test_sigterm_on_a_worker_hands_its_stage_to_a_spare_then_it_exits(cluster, undisturbed):
    coordinator, processes = cluster
    assert len(coordinator.fleet.first.assignment) == 3 and len(coordinator.fleet.registry.live()) == 5
    leaving = coordinator.fleet.first.assignment[2].address
    process = next(p for p in processes if p.address == leaving)
    replayed = coordinator.fleet.first.scheduler.policy.replayed

    async def terminate() -> None:
        os.kill(process.process.pid, signal.SIGTERM)

    # longer streams: the spare loads (and measures its memory) before the handover, and the streams must
    # still be running then; every one of their 64 tokens equals the undisturbed run's
    tokens = asyncio.run(streams(coordinator.address, PROMPTS, terminate, **dict(GREEDY, max_tokens=64)))
    assert tokens == undisturbed["greedy64"]
    deadline = time.monotonic() + 30
    while process.process.returncode is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.process.returncode == 0  # it exited on its own, once handed over
    c = coordinator.fleet.first
    assert c.scheduler.policy.replayed > replayed  # it left while streams ran: they moved to the new chain
    assert c.recoveries == 0  # a handover, not a failure
    assert leaving not in [w.address for w in c.assignment] and len(c.assignment) == 3
    assert leaving not in [w.address for w in coordinator.fleet.registry.workers.values()]


def test_sigkill_of_a_worker_with_a_spare_fails_no_stream(cluster, undisturbed):
    coordinator, _ = cluster
    assert len(coordinator.fleet.first.assignment) == 3 and len(coordinator.fleet.registry.live()) == 4
    before = coordinator.fleet.recoveries
    (spare,) = [w.address for w in coordinator.fleet.registry.live() if w not in coordinator.fleet.first.assignment]
    killed, kill = kill_stage(cluster, 1)
    tokens = asyncio.run(streams(coordinator.address, PROMPTS, kill, **GREEDY))
    assert tokens == undisturbed["greedy"]
    check_after(coordinator, killed, 3, before)
    assert coordinator.fleet.first.assignment[1].address == spare  # the spare took the dead worker's layers


def test_sigkill_with_no_spare_replans_onto_the_live_workers(cluster, undisturbed):
    coordinator, _ = cluster
    before = coordinator.fleet.recoveries
    killed, kill = kill_stage(cluster, 0)
    tokens = asyncio.run(streams(coordinator.address, PROMPTS, kill, **GREEDY))
    assert tokens == undisturbed["greedy"]
    check_after(coordinator, killed, 2, before)


def test_seeded_sampling_survives_a_sigkill_identically(cluster, undisturbed):
    coordinator, _ = cluster
    before = coordinator.fleet.recoveries
    killed, kill = kill_stage(cluster, 1)
    tokens = asyncio.run(streams(coordinator.address, PROMPTS, kill, **SEEDED))
    assert tokens == undisturbed["seeded"]
    check_after(coordinator, killed, 1, before)
