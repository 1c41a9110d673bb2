"""A whole cluster on this machine: the parameter service in-process, shard workers as child processes on
free ports, each loaded with its planned layer range. Stops every child on Ctrl-C / SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from coordinator.parameters.server import ParameterServer, start_parameter_server
from coordinator.planner import StagePlan, plan
from coordinator.store import ModelStore
from shardline.errors import from_rpc_error
from shardline.server import channel
from shardline.v1 import tensor_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
PREFIX = "shard worker listening on "


@dataclass
class WorkerProcess:
    process: asyncio.subprocess.Process
    address: str


async def spawn_worker(host: str, log_level: str = "WARNING") -> WorkerProcess:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shard_worker.cli", "serve", "--host", host, "--port", "0", "--log-level", log_level,
        "--parent-pid", str(os.getpid()), stdout=asyncio.subprocess.PIPE)
    if process.stdout is None:
        raise RuntimeError("no stdout from the worker process")
    said: list[str] = []
    while line := (await asyncio.wait_for(process.stdout.readline(), timeout=120)).decode():
        if line.startswith(PREFIX):
            return WorkerProcess(process, line.strip().removeprefix(PREFIX))
        said.append(line.strip())
    code = await process.wait()
    raise RuntimeError(f"shard worker exited with code {code} before listening (it said: {said[-3:]})")


async def load_shard(address: str, model: str, stage: StagePlan, parameters: str,
                     dtype: tensor_pb2.DType,
                     progress: dict[str, int]) -> None:
    request = worker_pb2.LoadShardRequest(model=model, start_layer=stage.start, end_layer=stage.end,
                                          parameters_address=parameters, dtype=dtype)
    async with channel(address) as ch:
        try:
            async for p in worker_pb2_grpc.ShardWorkerStub(ch).LoadShard(request):
                progress[address] = p.bytes_done
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err


@dataclass
class LocalCluster:
    store: ModelStore
    model: str
    workers: int = 3
    host: str = "127.0.0.1"
    dtype: tensor_pb2.DType = tensor_pb2.DTYPE_FLOAT32
    parameters: ParameterServer | None = None
    processes: list[WorkerProcess] = field(default_factory=list)
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [p.address for p in self.processes]

    async def start(self, say: Callable[[str], None] = log.info) -> float:
        """Start everything and load every shard, telling `say` the plan and the progress; returns the
        seconds it took."""
        began = time.perf_counter()
        manifest = self.store.manifest(self.model)
        self.stages = plan(manifest, self.workers)
        self.processes = list(await asyncio.gather(*(spawn_worker(self.host) for _ in self.stages)))
        self.parameters = await start_parameter_server(self.store, self.host, 0)
        say(format_plan(self.model, self.stages, self.addresses, self.parameters.address))
        progress: dict[str, int] = {}
        total = sum(s.weight_bytes for s in self.stages)
        loads = asyncio.gather(*(load_shard(a, self.model, s, self.parameters.address, self.dtype, progress)
                                 for a, s in zip(self.addresses, self.stages, strict=True)))
        shown = -1
        while not loads.done():
            await asyncio.wait([loads], timeout=0.5)
            percent = int(100 * sum(progress.values()) / max(total, 1))
            if percent // 10 != shown // 10:
                shown = percent
                say(f"  loading weights: {percent:3d}% of {total / 2**20:.0f} MiB")
        await loads
        return time.perf_counter() - began

    async def stop(self, timeout: float = 8.0) -> None:
        for p in self.processes:
            with contextlib.suppress(ProcessLookupError):
                p.process.terminate()
        for p in self.processes:
            try:
                await asyncio.wait_for(p.process.wait(), timeout)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    p.process.kill()
                await p.process.wait()
        if self.parameters is not None:
            await self.parameters.stop(0)


def format_plan(model: str, stages: list[StagePlan], addresses: list[str], parameters: str) -> str:
    lines = [f"plan for {model} (parameter service {parameters}):",
             f"  {'worker':<22} {'layers':<10} {'weights':>11}"]
    for address, s in zip(addresses, stages, strict=True):
        extra = ("  +embedding" if s.start == 0 else "") + ("  +head" if s is stages[-1] else "")
        lines.append(f"  {address:<22} {f'[{s.start}, {s.end})':<10} {s.weight_bytes / 2**20:>7.1f} MiB{extra}")
    return "\n".join(lines)


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
