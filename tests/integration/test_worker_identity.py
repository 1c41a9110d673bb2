"""Worker identities survive a coordinator's restart (issue 27.1): a worker registered with the coordinator's
previous life never passes for another that registered first in the new one. Real coordinators on port 0; the
workers' own registration loop (shard_worker/registration.py) against them."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from shard_worker.registration import Registration
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

BUDGET = 2**30


def config(store) -> CoordinatorConfig:
    return CoordinatorConfig(store=store.root, model="tiny-llama", workers=2, port=0, http=False,
                             heartbeat_timeout_ms=3_600_000)


def test_after_a_restart_a_worker_of_the_old_life_registers_again_and_never_aliases_another(loop, store):
    """The reported failure: after a restart, X registers first and gets w1; Y, which was w1 before, beats as
    w1. Its heartbeat names the old epoch and its own identity: refused, it registers again, as w2."""
    before = loop.run(start_coordinator(config(store)))
    after = loop.run(start_coordinator(config(store)))  # the coordinator's next life (another port here)
    y = Registration(before.address, "127.0.0.1:7002", BUDGET)
    x = Registration(after.address, "127.0.0.1:7001", BUDGET)

    async def beat(r: Registration, address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            await r._beat(coordinator_pb2_grpc.WorkerRegistryStub(channel))

    try:
        loop.run(beat(y, before.address))
        assert y.worker_id == "w1" and y.epoch == before.fleet.registry.epoch
        loop.run(beat(x, after.address))  # the new life: X first, as w1 too
        assert x.worker_id == "w1" and after.fleet.registry.epoch not in ("", y.epoch)
        seen = after.fleet.registry.workers["w1"].last_heartbeat
        loop.run(beat(y, after.address))  # Y's heartbeat as w1 of the old life: refused, not taken for X's
        assert y.worker_id == "" and after.fleet.registry.workers["w1"].last_heartbeat == seen
        loop.run(beat(y, after.address))  # and it registers again
        assert y.worker_id == "w2" and y.epoch == after.fleet.registry.epoch
        assert {r.address for r in after.fleet.registry.workers.values()} == {"127.0.0.1:7001", "127.0.0.1:7002"}
        loop.run(beat(x, after.address))
        loop.run(beat(y, after.address))
        assert (x.worker_id, y.worker_id) == ("w1", "w2")  # both known, each as itself
    finally:
        loop.run(before.stop())
        loop.run(after.stop())


def test_a_heartbeat_or_leave_naming_another_workers_id_is_refused_and_changes_nothing(loop, store):
    coordinator = loop.run(start_coordinator(config(store)))
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
    try:
        reply = registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(
            address="127.0.0.1:7003", memory_budget_bytes=BUDGET, identity="worker-a"), timeout=10)
        epoch = reply.coordinator_epoch
        assert epoch == coordinator.fleet.registry.epoch
        beat = registry.Heartbeat(coordinator_pb2.HeartbeatRequest(
            worker_id=reply.worker_id, identity="worker-a", coordinator_epoch=epoch), timeout=10)
        assert beat.known and beat.coordinator_epoch == epoch
        for identity, its_epoch in (("worker-b", epoch), ("worker-a", "an-old-epoch")):
            assert not registry.Heartbeat(coordinator_pb2.HeartbeatRequest(
                worker_id=reply.worker_id, identity=identity, coordinator_epoch=its_epoch), timeout=10).known
            with pytest.raises(grpc.RpcError) as err:
                registry.LeaveCluster(coordinator_pb2.LeaveClusterRequest(
                    worker_id=reply.worker_id, identity=identity, coordinator_epoch=its_epoch), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "register" in err.value.details()
        assert [r.identity for r in coordinator.fleet.registry.workers.values()] == ["worker-a"]  # still there
        again = registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(  # its first reply was lost
            address="127.0.0.1:7003", memory_budget_bytes=BUDGET, identity="worker-a"), timeout=10)
        assert again.worker_id == reply.worker_id  # the same process: its record, not a restart
        assert coordinator.fleet.metrics.reregistrations._value.get() == 0
        with pytest.raises(grpc.RpcError) as err:
            registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(
                address="127.0.0.1:7004", memory_budget_bytes=BUDGET, identity="x" * 200), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "identity" in err.value.details()
        left = registry.LeaveCluster(coordinator_pb2.LeaveClusterRequest(
            worker_id=reply.worker_id, identity="worker-a", coordinator_epoch=epoch), timeout=30)
        assert left.message and not coordinator.fleet.registry.workers
    finally:
        loop.run(coordinator.stop())


def test_each_registration_carries_an_identity_of_its_own():
    a, b = (Registration("127.0.0.1:1", f"127.0.0.1:{p}", BUDGET) for p in (2, 3))
    assert a.identity and b.identity and a.identity != b.identity
    assert asyncio.run(a.leave(1.0)) == "not registered"  # never registered: nothing to hand over
