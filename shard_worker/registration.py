"""Joining a coordinator: register the worker's address and memory budget, then heartbeat; register again
whenever the coordinator has forgotten it (it restarted) or cannot be reached for a while."""

from __future__ import annotations

import asyncio
import logging

import grpc
import psutil

from shardline.server import channel
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)


def default_memory_budget() -> int:
    """What a worker offers by default: 80% of the memory available now."""
    return int(psutil.virtual_memory().available * 0.8)


async def stay_registered(coordinator: str, address: str, memory_budget_bytes: int) -> None:
    async with channel(coordinator) as ch:
        stub = coordinator_pb2_grpc.WorkerRegistryStub(ch)
        worker_id, interval, failures = "", 0.2, 0
        while True:
            try:
                if not worker_id:
                    reply = await stub.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(
                        address=address, memory_budget_bytes=memory_budget_bytes), timeout=10)
                    worker_id, interval = reply.worker_id, reply.heartbeat_interval_ms / 1000
                    log.info("registered with %s as %s", coordinator, worker_id)
                else:
                    beat = await stub.Heartbeat(coordinator_pb2.HeartbeatRequest(worker_id=worker_id), timeout=10)
                    if not beat.known:
                        worker_id = ""
                        continue
                failures = 0
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    log.error("coordinator %s refused this worker: %s", coordinator, err.details())
                    raise
                failures += 1
                if failures % 100 == 0:  # a coordinator still starting is normal; one that stays away is not
                    log.warning("coordinator %s unreachable (%d tries): %s", coordinator, failures, err.details())
            await asyncio.sleep(interval)
