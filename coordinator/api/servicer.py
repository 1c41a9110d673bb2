"""Coordinator and WorkerRegistry servicers: protobuf <-> domain at the edge, nothing else."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from coordinator.api.admin_servicer import AdminMethods, deployment_info
from coordinator.api.job_servicer import JobMethods
from coordinator.api.quotas import Quotas, charge
from coordinator.fleet.fleet import Fleet
from coordinator.fleet.registry import LoadedShard, WorkerDevice
from coordinator.fleet.requests import generate, infer_truncating, refused_infer
from coordinator.jobs.runner import JobRunner
from coordinator.serving.generation import MAX_MODEL_NAME_CHARS, shown
from coordinator.serving.request_log import request_id_of
from coordinator.serving.result_cache import ResultCache
from coordinator.wire import embed_request, generate_response, generation_request
from shardline import tracing
from shardline.auth import ApiKeys
from shardline.codec import dtype_from_enum, dtype_to_enum, fill_tensor, from_numpy
from shardline.errors import InvalidArgument, NotFound, ShardlineError, grpc_errors
from shardline.limits import MAX_ADDRESS_CHARS, is_host_port
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc, tensor_pb2

log = logging.getLogger(__name__)
MAX_IDENTITY_CHARS = 128  # a worker's identity (shard_worker/registration.py makes 32 hex digits)


class CoordinatorServicer(AdminMethods, JobMethods, coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, fleet: Fleet, cache: ResultCache, jobs: JobRunner, api_keys: ApiKeys | None = None) -> None:
        self.fleet, self.cache, self.jobs, self.api_keys = fleet, cache, jobs, api_keys
        self.active_sessions = 0
        self.quotas = Quotas()  # per key: calls open at once, calls started per second (the keys file's)

    @grpc_errors
    async def Generate(self, request: Any, context: Any) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
        req = generation_request(request)
        self.active_sessions += 1
        try:
            with self.quotas.admitted(self.key_of(context), resumed=bool(req.resume_ids)) as usage, \
                    tracing.request_span("shardline.Generate", context, model=req.model) as span:
                async for piece in generate(self.fleet, self.cache, req, uuid.uuid4().hex,
                                            trace=tracing.traceparent(span), client_id=request_id_of(context),
                                            tenant=self.caller(context)[0]):
                    charge(usage, piece, resumed=bool(req.resume_ids))
                    response = generate_response(piece)
                    if piece.finish_reason:
                        if span is not None:
                            span.set_attributes({"prompt_tokens": piece.prompt_tokens, "cached": piece.cached,
                                                 "completion_tokens": piece.completion_tokens})
                    yield response
        finally:
            # also on cancellation and deadline: `run` takes the stream out of the batch, and the scheduler
            # frees its KV cache on every stage once no step of it is in flight
            self.active_sessions -= 1

    @grpc_errors
    async def Infer(self, request: Any, context: Any) -> coordinator_pb2.InferResponse:
        client_id = request_id_of(context)
        try:
            req = embed_request(request)
        except ShardlineError as exc:
            refused_infer(self.fleet, request.model, client_id, exc)
            raise
        with self.quotas.admitted(self.key_of(context)) as usage:
            vectors, tokens, truncated = await infer_truncating(self.fleet, req, client_id)
            usage.tokens += tokens
        response = coordinator_pb2.InferResponse(tokens=tokens, truncated=truncated)
        fill_tensor(response.embeddings, from_numpy(vectors))
        return response

    @grpc_errors
    async def ListModels(self, request: Any, context: Any) -> coordinator_pb2.ListModelsResponse:
        versions = self.fleet.versions()
        models = []
        for d in self.fleet.deployments.values():
            m, text, name = d.manifest, d.text, d.spec.name
            models.append(coordinator_pb2.ModelInfo(
                name=name, family=m.family, num_layers=m.num_layers, size_bytes=m.total_size_bytes,
                context_tokens=text.context_tokens, ready=bool(d.ready_replicas), task=d.task,
                has_tokenizer=text.tokenizer is not None, version=d.spec.version,
                is_default=self.fleet.defaults.get(name) == d.spec.version, versions=versions.get(name, []),
                replicas=len(d.live), replicas_ready=len(d.ready_replicas), state=d.state))
        return coordinator_pb2.ListModelsResponse(models=models)

    @grpc_errors
    async def GetClusterStatus(self, request: Any, context: Any) -> coordinator_pb2.GetClusterStatusResponse:
        fleet = self.fleet
        records = list(fleet.registry.workers.values())
        statuses = await asyncio.gather(*(fleet.worker_status(r) for r in records))
        now = time.monotonic()
        workers = []
        for record, status in zip(records, statuses, strict=True):
            info = coordinator_pb2.WorkerInfo(
                address=record.address, state=record.state, memory_budget_bytes=record.memory_budget_bytes,
                last_heartbeat_age_ms=int((now - record.last_heartbeat) * 1000), last_error=record.last_error,
                replica=record.owner)
            show_device(info, record.device, status)
            if record.stage is not None:
                info.start_layer, info.end_layer = record.stage.start, record.stage.end
            if status is not None:
                info.weight_bytes, info.rss_bytes = status.weight_bytes, status.rss_bytes
                info.sessions, info.kv_cache_bytes = status.sessions, status.kv_cache_bytes
                m = status.metrics
                info.busy_ms, info.idle_ms, info.queue_depth = m.busy_ms, m.idle_ms, m.queue_depth
                info.bytes_in, info.bytes_out = m.bytes_in, m.bytes_out
                info.tokens_per_second = m.tokens / (m.uptime_ms / 1000) if m.uptime_ms else 0.0
            workers.append(info)
        last_ms, last = fleet.last_recovery
        cache, jobs = self.cache, self.jobs
        unfinished, items = await jobs.counts()
        return coordinator_pb2.GetClusterStatusResponse(
            cache_entries=len(cache), cache_bytes=cache.bytes, cache_max_bytes=cache.max_bytes, cache_hits=cache.hits,
            cache_misses=cache.misses, jobs_unfinished=unfinished, job_items_running=items,
            jobs_off=jobs.off or jobs.away,
            model=fleet.primary, ready=fleet.ready, state="draining" if fleet.draining else fleet.state,
            message=fleet.message, workers=workers, active_sessions=self.active_sessions,
            recoveries=fleet.recoveries, last_recovery_ms=last_ms, last_recovery=last,
            deployments=[deployment_info(fleet, d) for d in fleet.deployments.values()])

    @grpc_errors
    async def DrainWorker(self, request: Any, context: Any) -> coordinator_pb2.DrainWorkerResponse:
        if not request.address:
            raise InvalidArgument("address is empty (give the host:port the worker registered with)")
        if len(request.address) > MAX_ADDRESS_CHARS:
            raise InvalidArgument(f"address {shown(request.address)} is not host:port")
        return coordinator_pb2.DrainWorkerResponse(message=await self.fleet.drain_worker(request.address))

    @grpc_errors
    async def Rebalance(self, request: Any, context: Any) -> coordinator_pb2.RebalanceResponse:
        return coordinator_pb2.RebalanceResponse(message=await self.fleet.rebalance())


DEVICE_PATTERN = re.compile(r"cpu|cuda:\d{1,4}")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
MAX_DEVICE_NAME_CHARS = 256


def worker_device(info: tensor_pb2.DeviceInfo) -> WorkerDevice:
    """The device a worker registers with (RegisterWorkerRequest.device), checked; an older worker sends none:
    cpu."""
    device = info.device or "cpu"
    if not DEVICE_PATTERN.fullmatch(device):
        raise InvalidArgument(f"device.device {shown(device)} is not cpu or cuda:N")
    if len(info.name) > MAX_DEVICE_NAME_CHARS:
        raise InvalidArgument(f"device.name is {len(info.name)} characters; at most {MAX_DEVICE_NAME_CHARS}")
    if info.memory_total_bytes < 0 or info.memory_free_bytes < 0:
        raise InvalidArgument("device.memory_total_bytes and device.memory_free_bytes must be >= 0")
    dtype = dtype_from_enum(info.dtype) if info.dtype else ""  # INVALID_ARGUMENT for an unknown one
    if dtype and dtype not in COMPUTE_DTYPES:
        raise InvalidArgument(f"device.dtype {dtype} is not a compute dtype ({', '.join(COMPUTE_DTYPES)})")
    if info.engine not in ("", "torch", "deepspeed"):
        raise InvalidArgument(f"device.engine {shown(info.engine)} is not torch or deepspeed")
    return WorkerDevice(device, info.name, info.memory_total_bytes, info.memory_free_bytes, dtype,
                        info.engine or "torch")


def show_device(info: coordinator_pb2.WorkerInfo, device: WorkerDevice, status: Any) -> None:
    """WorkerInfo.device: the worker's status when it answered (its memory now, the dtype its stage runs),
    else as it registered."""
    if status is not None and status.device.device:
        info.device.CopyFrom(status.device)
        if not info.device.dtype and device.dtype:
            info.device.dtype = dtype_to_enum(device.dtype)
        return
    compute = dtype_to_enum(device.dtype) if device.dtype else tensor_pb2.DTYPE_UNSPECIFIED
    info.device.CopyFrom(tensor_pb2.DeviceInfo(device=device.device, name=device.name,
                                               memory_total_bytes=device.memory_total_bytes,
                                               memory_free_bytes=device.memory_free_bytes, dtype=compute,
                                               engine=device.engine))


class RegistryServicer(coordinator_pb2_grpc.WorkerRegistryServicer):
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    @grpc_errors
    async def RegisterWorker(self, request: Any, context: Any) -> coordinator_pb2.RegisterWorkerResponse:
        if not is_host_port(request.address):
            raise InvalidArgument(f"address {shown(request.address)} is not host:port")
        if request.memory_budget_bytes <= 0:
            raise InvalidArgument(f"memory_budget_bytes must be > 0, got {request.memory_budget_bytes}")
        if len(request.identity) > MAX_IDENTITY_CHARS or not request.identity.isprintable():
            raise InvalidArgument(f"identity must be at most {MAX_IDENTITY_CHARS} printable characters "
                                  f"(got {len(request.identity)})")
        held = request.held if request.HasField("held") and request.held.model else None
        record = self.fleet.register(request.address, request.memory_budget_bytes, worker_device(request.device),
                                     request.identity, held and LoadedShard(held.model[:MAX_MODEL_NAME_CHARS],
                                                                            held.start_layer, held.end_layer,
                                                                            held.weights_digest[:64]))
        return coordinator_pb2.RegisterWorkerResponse(
            worker_id=record.worker_id, heartbeat_interval_ms=self.fleet.config.heartbeat_interval_ms,
            coordinator_epoch=self.fleet.registry.epoch)

    @grpc_errors
    async def Heartbeat(self, request: Any, context: Any) -> coordinator_pb2.HeartbeatResponse:
        known = self.fleet.heartbeat(request.worker_id, request.identity, request.coordinator_epoch)
        return coordinator_pb2.HeartbeatResponse(known=known, coordinator_epoch=self.fleet.registry.epoch)

    @grpc_errors
    async def LeaveCluster(self, request: Any, context: Any) -> coordinator_pb2.LeaveClusterResponse:
        record = self.fleet.registry.known(request.worker_id, request.identity, request.coordinator_epoch)
        if record is None:
            raise NotFound(f"worker id {shown(request.worker_id)} is not registered here as this worker (the "
                           "coordinator restarted, or the id is another's): nothing to hand over; register again "
                           "to rejoin")
        message = await self.fleet.drain_worker(record.address)
        self.fleet.registry.remove(record.worker_id)
        return coordinator_pb2.LeaveClusterResponse(message=message)
