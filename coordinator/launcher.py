"""A whole cluster on this machine: the coordinator (with the parameter service in-process) and shard
workers as child processes on free ports, which register with the coordinator exactly as workers on other
hosts do. Stops every child on Ctrl-C / SIGTERM."""

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

from coordinator.config import CoordinatorConfig
from coordinator.planner import StagePlan
from coordinator.registry import WorkerRecord
from coordinator.server import Coordinator, start_coordinator

log = logging.getLogger(__name__)
PREFIX = "shard worker listening on "


@dataclass
class WorkerProcess:
    process: asyncio.subprocess.Process
    address: str


async def spawn_worker(host: str, coordinator: str = "", memory_budget_mb: int = 0,
                       log_level: str = "WARNING") -> WorkerProcess:
    args = ["--host", host, "--port", "0", "--log-level", log_level, "--parent-pid", str(os.getpid())]
    if coordinator:
        args += ["--coordinator", coordinator]
    if memory_budget_mb:
        args += ["--memory-budget-mb", str(memory_budget_mb)]
    # several workers share this machine's cores: OpenMP threads that spin while waiting would steal them
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "shard_worker.cli", "serve", *args,
                                                   stdout=asyncio.subprocess.PIPE, env=env)
    if process.stdout is None:
        raise RuntimeError("no stdout from the worker process")
    said: list[str] = []
    while line := (await asyncio.wait_for(process.stdout.readline(), timeout=120)).decode():
        if line.startswith(PREFIX):
            return WorkerProcess(process, line.strip().removeprefix(PREFIX))
        said.append(line.strip())
    code = await process.wait()
    raise RuntimeError(f"shard worker exited with code {code} before listening (it said: {said[-3:]})")


async def stop_processes(processes: list[WorkerProcess], timeout: float = 8.0) -> None:
    for p in processes:
        with contextlib.suppress(ProcessLookupError):
            p.process.terminate()
    for p in processes:
        try:
            await asyncio.wait_for(p.process.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                p.process.kill()
            await p.process.wait()


@dataclass
class LocalCluster:
    config: CoordinatorConfig
    worker_memory_mb: int = 0
    coordinator: Coordinator | None = None
    processes: list[WorkerProcess] = field(default_factory=list)

    async def start(self, say: Callable[[str], None] = log.info) -> float:
        """Start everything and wait until every shard is loaded and verified; returns the seconds it took.
        Raises RuntimeError with the coordinator's reason when deployment fails (a plan that does not fit)."""
        began = time.perf_counter()
        endpoint = f"{self.config.host}:{self.config.port}"
        if self.config.port == 0:
            raise ValueError("launch needs a fixed coordinator port for its workers to register with")
        # the coordinator and the workers start side by side; workers retry until the coordinator listens
        spawning = [spawn_worker(self.config.host, endpoint, self.worker_memory_mb) for _ in range(self.config.workers)]
        coordinator, *processes = await asyncio.gather(start_coordinator(self.config, say), *spawning,
                                                       return_exceptions=True)
        self.processes = [p for p in processes if isinstance(p, WorkerProcess)]
        if isinstance(coordinator, BaseException):
            raise coordinator
        if not isinstance(coordinator, Coordinator):
            raise TypeError("start_coordinator returned no coordinator")
        self.coordinator = coordinator
        failed = [p for p in processes if isinstance(p, BaseException)]
        if failed:
            raise failed[0]
        cluster = coordinator.cluster
        shown = -1
        while cluster.state not in ("ready", "failed"):
            waiting = asyncio.ensure_future(cluster.changed.wait())
            await asyncio.wait([waiting], timeout=0.5)
            waiting.cancel()
            total = cluster.loading_bytes
            if cluster.state == "deploying" and total:
                percent = int(100 * sum(cluster.progress.values()) / total)
                if percent // 25 != shown // 25:
                    shown = percent
                    say(f"  loading weights: {percent:3d}% of {total / 2**20:.0f} MiB")
            if any(p.process.returncode is not None for p in self.processes):
                raise RuntimeError("a shard worker exited during start-up")
        if cluster.state == "failed":
            raise RuntimeError(cluster.message)
        return time.perf_counter() - began

    async def stop(self) -> None:
        if self.coordinator is not None:
            await self.coordinator.stop()
        await stop_processes(self.processes)


def format_plan(model: str, workers: list[WorkerRecord], stages: list[StagePlan]) -> str:
    lines = [f"plan for {model}:",
             f"  {'worker':<22} {'layers':<10} {'weights':>11} {'offered':>11}"]
    for worker, s in zip(workers, stages, strict=True):
        extra = ("  +embedding" if s.start == 0 else "") + ("  +head" if s is stages[-1] else "")
        lines.append(f"  {worker.address:<22} {f'[{s.start}, {s.end})':<10} {s.weight_bytes / 2**20:>7.1f} MiB "
                     f"{worker.memory_budget_bytes / 2**20:>7.0f} MiB{extra}")
    return "\n".join(lines)


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
