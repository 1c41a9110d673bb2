"""A shard worker's gRPC server: the ShardWorker service, health (SERVING once a shard is loaded and
verified) and reflection, on exactly the address it is given."""

from __future__ import annotations

import asyncio
import logging
import os

import psutil

from shard_worker.device import DeviceSettings, default_cuda_budget
from shard_worker.registration import Registration
from shard_worker.servicer import WorkerServicer, add_to_server
from shard_worker.transformers_adapter import check_version
from shardline.auth import Access, Guard, Rules, describe
from shardline.errors import ShardlineError, Unavailable
from shardline.limits import MemoryBoundTooSmall, default_memory_budget, shard_budget
from shardline.metrics import start_metrics_server
from shardline.server import RunningServer, Signals, add_standard_services, bind, new_server, set_serving
from shardline.stream import LinkSettings
from shardline.v1 import worker_pb2

log = logging.getLogger(__name__)

SERVICE = worker_pb2.DESCRIPTOR.services_by_name["ShardWorker"].full_name
METRICS_PREFIX = "shard worker metrics at "  # the line `coordinator launch` reads a worker's metrics URL from


WorkerServer = RunningServer[WorkerServicer]


async def start_worker(host: str = "127.0.0.1", port: int = 0, links: LinkSettings | None = None,
                       memory_budget_bytes: int = 0, metrics_port: int | None = None,
                       device: DeviceSettings | None = None) -> WorkerServer:
    """A worker serving on exactly host:port; `memory_budget_bytes` (default: 80% of the memory available)
    bounds weights + activations + KV cache; with `metrics_port` (0 = a free one), Prometheus metrics at
    http://host:port/metrics (`servicer.metrics.server` says where), stopped with the worker; `device`: where
    and in what dtype its stages run (shard_worker/device.py; default CPU)."""
    links = links or LinkSettings()
    check_version()  # one WARNING when transformers is outside the tested range
    server = new_server(Guard(Rules({SERVICE: Access.CLUSTER}), links.identity))
    health = add_standard_services(server, [SERVICE])

    async def serving(on: bool) -> None:
        await set_serving(health, [SERVICE], on)

    servicer = WorkerServicer(serving, links, memory_budget_bytes, device)
    add_to_server(servicer, server)  # the generated registration, with Forward's zero-copy (de)serializers
    bound = bind(server, host, port, links.identity.server_credentials())
    await server.start()
    if metrics_port is not None:
        try:
            servicer.metrics.server = start_metrics_server(host, metrics_port, servicer.metrics.registry)
        except OSError:
            await WorkerServer(server, servicer, bound, host).stop(0)
            raise
    await serving(False)
    log.info("shard worker listening on %s:%d (%s)", host, bound, describe(links.identity))
    return WorkerServer(server, servicer, bound, host)


async def serve_forever(host: str, port: int, parent_pid: int = 0, coordinator: str = "", advertise: str = "",
                        memory_budget_bytes: int = 0, links: LinkSettings | None = None,
                        leave_timeout_s: float = 120.0, metrics_port: int | None = None,
                        device: DeviceSettings | None = None) -> None:
    """Serve until SIGINT/SIGTERM. A worker registered with a coordinator first leaves the cluster (its stage
    is handed over, so no request fails); a second signal stops at once."""
    device = device or DeviceSettings()
    if memory_budget_bytes:
        budget = memory_budget_bytes
    else:  # a CUDA worker offers its device's memory, a CPU worker the host's
        budget = default_cuda_budget(device.device) if device.device.type == "cuda" else default_memory_budget()
    worker = await start_worker(host, port, links, budget, metrics_port, device)
    if memory_budget_bytes and device.device.type == "cpu":  # the flag bounds the whole process (shardline/limits.py)
        runtime = psutil.Process().memory_info().rss
        try:
            budget = shard_budget(memory_budget_bytes, runtime)
        except MemoryBoundTooSmall:
            await worker.stop(0)
            raise
        worker.servicer.lifecycle.memory_budget_bytes = budget
        worker.servicer.memory_limit_bytes, worker.servicer.runtime_bytes = memory_budget_bytes, runtime
        log.info("memory: --worker-memory-mb %d bounds this process; its runtime takes %.0f MiB, a reserve %.0f "
                 "MiB, its shard may use %.0f MiB", memory_budget_bytes >> 20, runtime / 2**20,
                 (memory_budget_bytes - runtime - budget) / 2**20, budget / 2**20)
    if worker.servicer.metrics.server is not None:  # before the line the launcher waits for, which it reads last
        print(f"{METRICS_PREFIX}{worker.servicer.metrics.server.url}", flush=True)  # noqa: T201
    print(f"shard worker listening on {worker.address}", flush=True)  # noqa: T201 - the CLI's one line
    registration: Registration | None = None
    registering: asyncio.Task[None] | None = None
    if coordinator:
        address = f"{advertise or host}:{worker.port}"
        registration = Registration(coordinator, address, budget, links, device,
                                    forgotten=worker.servicer.lifecycle.end_all_sessions,
                                    held=worker.servicer.lifecycle.held, fence=worker.servicer.fence)
        registering = asyncio.create_task(registration.run())
    signals = Signals()
    if parent_pid:
        asyncio.create_task(_watch_parent(parent_pid, signals))
    try:
        await signals.first.wait()
        if registration is not None and not signals.second.is_set():
            log.info("leaving the cluster: handing this worker's stage over (a second signal stops at once)")
            leaving = asyncio.ensure_future(registration.leave(leave_timeout_s))
            stop_now = asyncio.ensure_future(signals.second.wait())
            await asyncio.wait({leaving, stop_now}, return_when=asyncio.FIRST_COMPLETED)
            stop_now.cancel()
            if leaving.done():
                try:
                    log.info("left the cluster: %s", leaving.result())
                except Unavailable:
                    log.info("the coordinator is gone (it stopped first): nothing to hand over")
                except (ShardlineError, OSError) as exc:
                    log.warning("could not leave the cluster cleanly: %s", exc)
            else:
                leaving.cancel()
    finally:
        if registering is not None:
            registering.cancel()
        await worker.stop(0.5)


async def _watch_parent(pid: int, signals: Signals) -> None:
    """A child of a launcher ends with it, even when the launcher was killed without a chance to clean up."""
    while os.getppid() == pid:
        await asyncio.sleep(1.0)
    log.warning("parent process %d is gone; stopping", pid)
    signals.stop_now()


if __name__ == "__main__":  # pragma: no cover
    asyncio.run(serve_forever("127.0.0.1", 0))
