"""A shard worker's gRPC server: the ShardWorker service, health (SERVING once a shard is loaded and
verified) and reflection, on exactly the address it is given."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from shard_worker.registration import default_memory_budget, stay_registered
from shard_worker.servicer import WorkerServicer
from shardline.server import RunningServer, add_standard_services, bind, new_server, set_serving
from shardline.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = worker_pb2.DESCRIPTOR.services_by_name["ShardWorker"].full_name


WorkerServer = RunningServer[WorkerServicer]


async def start_worker(host: str = "127.0.0.1", port: int = 0) -> WorkerServer:
    server = new_server()
    health = add_standard_services(server, [SERVICE])

    async def serving(on: bool) -> None:
        await set_serving(health, [SERVICE], on)

    servicer = WorkerServicer(serving)
    worker_pb2_grpc.add_ShardWorkerServicer_to_server(servicer, server)
    bound = bind(server, host, port)
    await server.start()
    await serving(False)
    log.info("shard worker listening on %s:%d", host, bound)
    return WorkerServer(server, servicer, bound, host)


async def serve_forever(host: str, port: int, parent_pid: int = 0, coordinator: str = "", advertise: str = "",
                        memory_budget_bytes: int = 0) -> None:
    worker = await start_worker(host, port)
    print(f"shard worker listening on {worker.address}", flush=True)  # noqa: T201 - the CLI's one line
    if coordinator:
        address = f"{advertise or host}:{worker.port}"
        budget = memory_budget_bytes or default_memory_budget()
        asyncio.create_task(stay_registered(coordinator, address, budget))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if parent_pid:
        asyncio.create_task(_watch_parent(parent_pid, stop))
    try:
        await stop.wait()
    finally:
        await worker.stop(0.5)


async def _watch_parent(pid: int, stop: asyncio.Event) -> None:
    """A child of a launcher ends with it, even when the launcher was killed without a chance to clean up."""
    while os.getppid() == pid:
        await asyncio.sleep(1.0)
    log.warning("parent process %d is gone; stopping", pid)
    stop.set()


if __name__ == "__main__":  # pragma: no cover
    asyncio.run(serve_forever("127.0.0.1", 0))
