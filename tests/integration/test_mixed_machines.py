"""Planning for mixed machines on a real cluster: two CPU worker processes, started with 1 and 2 compute
threads, register with a coordinator; it calibrates them (one at a time) and gives more layers to the faster
one. `coordinator plan --explain` (a real CLI process) says why; the model then generates."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from coordinator.api.server import start_coordinator
from coordinator.cli.launcher import spawn_worker, stop_processes
from coordinator.config import CoordinatorConfig
from shardline.client import Client

MODEL = "calib-llama512"


@pytest.fixture(scope="module")
def calib_store(store):
    from coordinator.store.importer import import_random, random_config

    if not store.has(MODEL):  # heavy enough per layer that 2 threads beat 1 clearly: 256 tokens a step
        import_random(store, MODEL, random_config("llama", hidden=512, layers=10, heads=8, kv_heads=2, vocab=256,
                                                  intermediate=1536), seed=3)
    return store


def start(loop, calib_store, parameters):
    """A coordinator for MODEL over 2 workers, calibrating on a 512-token step (a 512-wide layer: on a 2-core
    machine 2 threads beat 1 by 1.4-1.75x there; on a 256-wide one by about 1.2x, too close)."""
    config = CoordinatorConfig(store=calib_store.root, model=MODEL, workers=2, port=0, http=False, calibrate=True,
                               parameters_address=parameters.address, heartbeat_timeout_ms=3_600_000,
                               calibration_sequences=1, calibration_tokens=512, calibration_context_tokens=0)
    return loop.run(start_coordinator(config)), []


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def worth_moving(slow_s, fast_s, layers=10, tolerance=0.1, min_gain_s=0.002):
    """Whether the measured speeds call for an uneven split: the best whole-layer split gains more than the
    planner's noise tolerance over the even one (hops and the tiny head left out: both are small here)."""
    even = layers // 2 * max(slow_s, fast_s)
    best = min(max(k * slow_s, (layers - k) * fast_s) for k in range(1, layers))
    return even - best > max(best * tolerance, min_gain_s)


def test_the_faster_worker_gets_more_layers(loop, calib_store, parameters):
    coordinator, processes = start(loop, calib_store, parameters)
    try:
        for threads in (1, 2):  # the slow one registers first: the chain keeps registration order
            processes.append(loop.run(spawn_worker("127.0.0.1", coordinator.address,
                                                   extra=("--compute-threads", str(threads)))))
            wait_until(lambda: len(coordinator.fleet.registry.workers) >= len(processes), 60, "registration")
        slow, fast = (p.address for p in processes)
        wait_until(lambda: coordinator.fleet.ready, 60, f"ready replica ({coordinator.fleet.message})")
        replica = coordinator.fleet.first
        assert replica.plan_basis.startswith("time"), replica.plan_basis
        layers = {w.address: s.end - s.start for w, s in zip(replica.assignment, replica.stages, strict=True)}
        explained = {s.worker: s for s in replica.plan}
        slow_s, fast_s = explained[slow].seconds_per_layer, explained[fast].seconds_per_layer
        print({a: (layers[a], f"{s.seconds_per_layer * 1000:.2f} ms/layer") for a, s in explained.items()})
        # the hardware fact: 2 compute threads beat 1 on a 512-token step (measured 1.4-1.75x on 2 cores)
        assert fast_s < slow_s, explained
        # the plan follows what was measured (whatever other load did to it): never fewer layers on the faster
        # worker, and more wherever the measured ratio makes an uneven split worth more than the tolerance
        assert layers[fast] >= layers[slow], (layers, explained)

        cli = subprocess.run([sys.executable, "-m", "coordinator.cli", "plan", "--explain", "--endpoint",
                              coordinator.address], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert cli.returncode == 0, cli.stderr
        print(cli.stdout)
        assert "planned by time" in cli.stdout and "s/layer" in cli.stdout
        assert f"[0, {layers[slow]})" in cli.stdout and f"[{layers[slow]}, 10)" in cli.stdout

        with Client(coordinator.address, timeout=60) as client:
            assert len(client.generate([1, 2, 3], max_tokens=4).token_ids) == 4
        if not worth_moving(slow_s, fast_s):  # said in the summary, not passed in silence
            pytest.skip(f"other load left the workers too close ({slow_s * 1000:.2f} vs {fast_s * 1000:.2f} "
                        "ms/layer) for an uneven split to be worth it: the claim cannot be shown on this run")
        assert layers[fast] > layers[slow], (layers, explained, replica.plan_basis)
    finally:
        loop.run(stop_processes(processes))
        loop.run(coordinator.stop())


@pytest.mark.slow
def test_a_faster_worker_that_joins_is_used_on_rebalance_only(loop, calib_store, parameters):
    """A 2-thread spare joins a chain of a 1-thread and a 2-thread worker: nothing moves until `Rebalance`,
    which calibrates it and replaces the slow worker (the fastest pair in registration order)."""
    coordinator, processes = start(loop, calib_store, parameters)
    try:
        for threads in (1, 2):
            processes.append(loop.run(spawn_worker("127.0.0.1", coordinator.address,
                                                   extra=("--compute-threads", str(threads)))))
            wait_until(lambda: len(coordinator.fleet.registry.workers) >= len(processes), 60, "registration")
        wait_until(lambda: coordinator.fleet.ready, 60, f"ready replica ({coordinator.fleet.message})")
        replica = coordinator.fleet.first
        before = [w.address for w in replica.assignment]
        processes.append(loop.run(spawn_worker("127.0.0.1", coordinator.address,
                                               extra=("--compute-threads", "2"))))
        wait_until(lambda: len(coordinator.fleet.registry.workers) >= 3, 60, "registration")
        time.sleep(1.0)
        assert [w.address for w in replica.assignment] == before  # no re-plan on its own
        with Client(coordinator.address, timeout=120) as client:
            said = client.rebalance()
        slow, fast, new = (p.address for p in processes)
        assert [w.address for w in replica.assignment] == [fast, new], (said, replica.plan)
        assert replica.plan_basis.startswith("time")
    finally:
        loop.run(stop_processes(processes))
        loop.run(coordinator.stop())
