"""The cluster as the coordinator sees it: registered workers, the plan, deployment of the model onto
them, and whether it can serve."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import grpc

from coordinator.chain import ChainClient
from coordinator.config import CoordinatorConfig
from coordinator.planner import PlanDoesNotFit, StagePlan, plan
from coordinator.registry import Registry, WorkerRecord
from coordinator.scheduler import Scheduler
from coordinator.store import ModelStore
from coordinator.textmodel import TextModel
from shardline.codec import dtype_to_enum
from shardline.errors import FailedPrecondition, NotFound, Unavailable, from_rpc_error
from shardline.server import channel
from shardline.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


async def load_shard(address: str, model: str, stage: StagePlan, parameters: str, dtype: str,
                     progress: dict[str, int]) -> None:
    request = worker_pb2.LoadShardRequest(model=model, start_layer=stage.start, end_layer=stage.end,
                                          parameters_address=parameters, dtype=dtype_to_enum(dtype))
    async with channel(address) as ch:
        try:
            async for p in worker_pb2_grpc.ShardWorkerStub(ch).LoadShard(request):
                progress[address] = p.bytes_done
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err


class Cluster:
    def __init__(self, config: CoordinatorConfig, store: ModelStore, parameters_address: str,
                 set_serving: Callable[[bool], Awaitable[None]], say: Callable[[str], None] = log.info) -> None:
        self.config, self.store, self.parameters_address = config, store, parameters_address
        self.manifest = store.manifest(config.model)
        self.registry = Registry(config.heartbeat_timeout_ms / 1000)
        self._set_serving, self.say = set_serving, say
        self.state, self.message = "waiting for workers", f"0 of {config.workers} workers registered"
        self.stages: list[StagePlan] = []
        self.deployed: list[WorkerRecord] = []
        self.chain: ChainClient | None = None
        self.scheduler: Scheduler | None = None
        self.text: TextModel | None = None
        self.progress: dict[str, int] = {}
        self.changed = asyncio.Event()  # set on every state change (the launcher waits on it)
        self._deploy_task: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def start(self) -> None:
        path = self.store.path(self.config.model)
        if (path / "tokenizer_config.json").is_file():
            self.text = await asyncio.to_thread(TextModel, path)
        self._monitor = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        for task in (self._monitor, self._deploy_task):
            if task is not None:
                task.cancel()
        if self.scheduler is not None:
            await self.scheduler.close()
        if self.chain is not None:
            await self.chain.close()

    def _set_state(self, state: str, message: str = "") -> None:
        self.state, self.message = state, message
        self.changed.set()
        self.changed = asyncio.Event()

    def serving(self, model: str) -> tuple[Scheduler, TextModel]:
        """The scheduler and text model for a request, or why there are none."""
        if model and model != self.config.model:
            raise NotFound(f"model {model!r} is not served here (this cluster serves {self.config.model!r})")
        if not self.ready or self.scheduler is None:
            detail = f" ({self.message})" if self.message else ""
            raise Unavailable(f"the cluster is not ready: {self.state}{detail}")
        if self.text is None:
            raise FailedPrecondition(f"model {self.config.model!r} has no tokenizer in the store: it cannot serve text")
        return self.scheduler, self.text

    @property
    def is_encoder(self) -> bool:
        return self.manifest.family == "bert"

    # -- registration and deployment -----------------------------------------------------------------
    def register(self, address: str, memory_budget_bytes: int) -> WorkerRecord:
        record = self.registry.register(address, memory_budget_bytes)
        self.say(f"worker {address} registered ({memory_budget_bytes / 2**20:.0f} MiB offered)")
        self._maybe_deploy()
        return record

    def heartbeat(self, worker_id: str) -> bool:
        """A registered worker's sign of life; False if this coordinator does not know it."""
        known = self.registry.heartbeat(worker_id)
        if known:
            self._maybe_deploy()  # a worker that came back may complete the set
        return known

    def _maybe_deploy(self) -> None:
        live = self.registry.live()
        if self._deploy_task is not None and not self._deploy_task.done():
            return
        if len(live) < self.config.workers:
            if not self.ready:
                self._set_state("waiting for workers", f"{len(live)} of {self.config.workers} workers registered")
            return
        if self.ready and [w.worker_id for w in live] == [w.worker_id for w in self.deployed]:
            return
        self._deploy_task = asyncio.create_task(self._deploy(live))

    async def _deploy(self, workers: list[WorkerRecord]) -> None:
        await self._set_serving(False)
        old_chain, self.chain = self.chain, None
        old_scheduler, self.scheduler = self.scheduler, None
        if old_scheduler is not None:
            await old_scheduler.close()
        if old_chain is not None:
            await old_chain.close()
        try:
            self.stages = plan(self.manifest, len(workers), [w.memory_budget_bytes for w in workers])
        except PlanDoesNotFit as exc:
            self._set_state("failed", f"the plan does not fit: {exc}")
            self.say(f"error: the plan does not fit: {exc}")
            return
        self._set_state("deploying", f"loading {self.config.model} onto {len(workers)} workers")
        for worker, stage in zip(workers, self.stages, strict=True):
            worker.stage, worker.state, worker.last_error = stage, "loading", ""
        self.progress = {}
        results = await asyncio.gather(*(
            load_shard(w.address, self.config.model, s, self.parameters_address, self.config.dtype, self.progress)
            for w, s in zip(workers, self.stages, strict=True)), return_exceptions=True)
        failed = []
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, BaseException):
                worker.state, worker.last_error = "failed", str(result)
                failed.append(f"{worker.address}: {result}")
            else:
                worker.state = "ready"
        if failed:
            self._set_state("failed", "; ".join(failed))
            self.say(f"error: deployment failed: {'; '.join(failed)}")
            return
        self.deployed = workers
        self.chain = ChainClient([w.address for w in workers])
        c = self.config
        self.scheduler = Scheduler(self.chain, groups=c.micro_batch_groups or len(workers),
                                   max_active=c.max_active_streams,
                                   max_queued=c.max_queued_streams, prefill_chunk=c.prefill_chunk_tokens)
        self._set_state("ready")
        await self._set_serving(True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_ms / 1000)
            lost = self.registry.mark_lost()
            gone = [w for w in lost if w in self.deployed]
            if gone:
                self.say(f"worker {gone[0].address} lost (no heartbeat)")
                await self._set_serving(False)
                self._set_state("degraded", f"worker {gone[0].address} stopped sending heartbeats")
                self.deployed = []
            if lost or not self.ready:
                self._maybe_deploy()

    # -- status ----------------------------------------------------------------------------------------
    async def worker_status(self, record: WorkerRecord) -> worker_pb2.GetStatusResponse | None:
        if record.state == "lost":
            return None
        with contextlib.suppress(grpc.RpcError, asyncio.TimeoutError):
            async with channel(record.address) as ch:
                status: worker_pb2.GetStatusResponse = await worker_pb2_grpc.ShardWorkerStub(ch).GetStatus(
                    worker_pb2.GetStatusRequest(), timeout=2)
                return status
        return None
