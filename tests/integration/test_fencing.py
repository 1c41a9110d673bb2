"""Fencing (issue 27.1): a worker takes control calls only from the coordinator life it registered in, and
only those meant for it. A real coordinator, a real worker and the worker's own registration loop; the
"replaced coordinator" is the coordinator's own call code with another epoch."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
import pytest

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from coordinator.fleet.planner import StagePlan
from coordinator.fleet.worker_calls import load_shard, set_peers, unload_shard
from coordinator.serving.chain import end_sessions
from shard_worker.registration import Registration
from shard_worker.server import start_worker
from shardline.errors import FailedPrecondition
from shardline.fencing import Fence, control_metadata
from shardline.v1 import worker_pb2
from tests.helpers import worker_stub

MODEL = "tiny-llama"


def test_a_registered_worker_refuses_control_calls_of_another_epoch_or_meant_for_another_worker(
        loop, store, parameters):
    # workers=2 with one joined: the coordinator waits, so the test's calls are the only ones the worker gets
    coordinator = loop.run(start_coordinator(CoordinatorConfig(store=store.root, model=MODEL, workers=2, port=0,
                                                               http=False, heartbeat_timeout_ms=3_600_000)))
    worker = loop.run(start_worker())
    registration = Registration(coordinator.address, worker.address, 2**30, fence=worker.servicer.fence)
    running = asyncio.run_coroutine_threadsafe(registration.run(), loop.loop)
    try:
        loop.run(_until(lambda: bool(registration.worker_id)))
        fence = worker.servicer.fence
        assert fence.epoch == coordinator.fleet.registry.epoch and fence.identity == registration.identity
        record = coordinator.fleet.registry.workers[registration.worker_id]
        links = coordinator.fleet.shared.links
        assert links.epoch == fence.epoch
        stage = StagePlan(0, 3, 0)

        zombie = replace(links, epoch="a-replaced-coordinator")
        with pytest.raises(FailedPrecondition, match="came from epoch a-replaced-coordinator"):
            loop.run(load_shard(record, MODEL, stage, parameters.address, 0, 30, zombie, {}))
        with pytest.raises(FailedPrecondition, match="replaced"):
            loop.run(unload_shard(record, "", 30, zombie))
        assert loop.run(set_peers([worker.address], 10, zombie)) == [worker.address]  # not told
        assert worker.servicer.lifecycle.state == "empty"  # nothing was loaded

        other = replace(record, identity="the-worker-this-address-had-before")
        with pytest.raises(FailedPrecondition, match="meant for worker the-worker-this-address-had-before"):
            loop.run(load_shard(other, MODEL, stage, parameters.address, 0, 30, links, {}))

        loop.run(load_shard(record, MODEL, stage, parameters.address, 0, 60, links, {}))  # its own life: taken
        assert worker.servicer.lifecycle.state == "ready"
        assert loop.run(set_peers([worker.address], 10, links)) == []
        stub = worker_stub(worker.address)  # EndSession and Calibrate, called as the coordinator calls them
        for metadata, refused in ((control_metadata((), "a-replaced-coordinator"), True),
                                  (control_metadata((), links.epoch), False)):
            calls = (lambda m=metadata: stub.EndSession(worker_pb2.EndSessionRequest(session_ids=["s1"]),
                                                        metadata=m, timeout=10),
                     lambda m=metadata: stub.Calibrate(worker_pb2.CalibrateRequest(payload=b"x"), metadata=m,
                                                       timeout=10))
            for call in calls:
                if refused:
                    with pytest.raises(grpc.RpcError) as err:
                        call()
                    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "replaced" in \
                        err.value.details()
                else:
                    call()
        loop.run(end_sessions([worker.address], ["s1"], links))
        assert loop.run(unload_shard(record, MODEL, 30, links)).freed_weight_bytes > 0
        # every refusal counted, by RPC (shardline:worker_fenced_calls_total on the worker's /metrics)
        counted = {s.labels["rpc"]: s.value for m in worker.servicer.metrics.registry.collect()
                   for s in m.samples if s.name == "shardline:worker_fenced_calls_total"}
        assert counted == {"LoadShard": 2, "UnloadShard": 1, "SetPeers": 1, "EndSession": 1, "Calibrate": 1}
    finally:
        running.cancel()
        loop.run(worker.stop(0))
        loop.run(coordinator.stop())


def test_a_worker_between_registrations_or_never_registered_takes_calls_without_fencing():
    fence = Fence()
    fence.check({"shardline-coordinator-epoch": "any"})  # no epoch yet: a static worker, or re-registering
    fence.check({})  # an older coordinator names nothing
    fence.check({"shardline-worker-identity": "another"})  # not registered: no coordinator knows it by a name
    fence.epoch = "e1"
    fence.check({"shardline-coordinator-epoch": "e1", "shardline-worker-identity": fence.identity})
    with pytest.raises(FailedPrecondition, match="epoch e1; the call came from epoch e2"):
        fence.check({"shardline-coordinator-epoch": "e2"})
    with pytest.raises(FailedPrecondition, match=f"meant for worker {'x' * 128}, but") as err:
        fence.check({"shardline-worker-identity": "x" * 500})
    assert "x" * 129 not in str(err.value)  # a long header is named cut short
    assert Fence().identity != fence.identity
    fence.retire()  # the coordinator of e1 was replaced: between registrations, e1's calls are refused
    with pytest.raises(FailedPrecondition, match=r"epoch \(none yet\); the call came from epoch e1"):
        fence.check({"shardline-coordinator-epoch": "e1"})
    fence.check({"shardline-coordinator-epoch": "e2"})  # the next coordinator's, before the reply arrived
    fence.joined("e2")
    fence.check({"shardline-coordinator-epoch": "e2"})
    fence.joined("e1")  # registered with e1 again after all (a coordinator that came back): taken again
    fence.check({"shardline-coordinator-epoch": "e1"})


async def _until(done, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not done():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)
