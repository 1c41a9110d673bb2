"""Coordinator and WorkerRegistry servicers: protobuf <-> domain at the edge, nothing else."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from coordinator.admin_servicer import AdminMethods, deployment_info
from coordinator.embedding import check_batch, check_response_size, check_tokens, embed, inputs_from_tensors
from coordinator.fleet import Fleet
from coordinator.generation import MAX_MODEL_NAME_CHARS, GenerationRequest, check_parameters, prepare, run, shown
from shardline.codec import decode_tensor, fill_tensor, from_numpy
from shardline.errors import FailedPrecondition, InvalidArgument, NotFound, grpc_errors
from shardline.limits import MAX_ADDRESS_CHARS, is_host_port
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)
FINISH = {"": coordinator_pb2.FINISH_REASON_UNSPECIFIED, "length": coordinator_pb2.FINISH_REASON_LENGTH,
          "stop": coordinator_pb2.FINISH_REASON_STOP}


def request_from_proto(r: coordinator_pb2.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        model=r.model, prompt=r.prompt, messages=tuple((m.role, m.content) for m in r.messages),
        max_tokens=r.max_tokens if r.HasField("max_tokens") else None,
        temperature=r.temperature if r.HasField("temperature") else None, top_k=r.top_k,
        prompt_ids=tuple(r.prompt_token_ids),
        top_p=r.top_p if r.HasField("top_p") else None, seed=r.seed if r.HasField("seed") else None,
        stop=tuple(r.stop), min_tokens=r.min_tokens if r.HasField("min_tokens") else 0, ignore_eos=r.ignore_eos)


class CoordinatorServicer(AdminMethods, coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.active_sessions = 0

    @grpc_errors
    async def Generate(self, request: Any, context: Any) -> AsyncIterator[coordinator_pb2.GenerateResponse]:
        req = request_from_proto(request)
        config = self.fleet.config
        check_parameters(req, config)  # a malformed or oversized request fails first, whatever the state
        deployment = self.fleet.find(req.model)
        if deployment.task == "embed":
            raise FailedPrecondition(f"model {deployment.key!r} has task embed: it embeds (Infer, the SDK's "
                                     "embed()); it does not generate")
        self.fleet.serving(deployment)  # not ready: say so before the prompt is even read
        text = deployment.text
        plan = await asyncio.to_thread(prepare, req, text, config)
        _, scheduler = self.fleet.route(deployment)
        session_id = uuid.uuid4().hex
        self.active_sessions += 1
        try:
            async for piece in run(scheduler, text, plan, session_id):
                response = coordinator_pb2.GenerateResponse(text=piece.text, token_ids=piece.token_ids,
                                                            finish_reason=FINISH[piece.finish_reason])
                if piece.finish_reason:
                    response.usage.prompt_tokens = piece.prompt_tokens
                    response.usage.completion_tokens = piece.completion_tokens
                yield response
        finally:
            # also on cancellation and deadline: `run` takes the stream out of the batch, and the scheduler
            # frees its KV cache on every stage once no step of it is in flight
            self.active_sessions -= 1

    @grpc_errors
    async def Infer(self, request: Any, context: Any) -> coordinator_pb2.InferResponse:
        config = self.fleet.config
        has_ids = request.HasField("input_ids")
        if len(request.model) > MAX_MODEL_NAME_CHARS:
            raise InvalidArgument(f"model is {len(request.model)} characters; a model name has at most "
                                  f"{MAX_MODEL_NAME_CHARS}")
        if request.texts and has_ids:
            raise InvalidArgument("send either texts or input_ids, not both")
        batch = len(request.texts) or (request.input_ids.shape[0] if has_ids and request.input_ids.shape else 0)
        check_batch(batch, config.max_infer_batch)
        input_ids = decode_tensor(request.input_ids, "input_ids") if has_ids else None
        mask = decode_tensor(request.attention_mask, "attention_mask") if request.HasField("attention_mask") else None
        pooling = {coordinator_pb2.POOLING_UNSPECIFIED: "mean", coordinator_pb2.POOLING_MEAN: "mean",
                   coordinator_pb2.POOLING_CLS: "cls"}.get(request.pooling)
        if pooling is None:
            raise InvalidArgument(f"pooling {request.pooling} is not a known Pooling")
        deployment = self.fleet.find(request.model)
        if deployment.task != "embed":
            raise FailedPrecondition(f"model {deployment.key!r} has task generate: it generates (Generate), and "
                                     "Infer serves models with task embed")
        self.fleet.serving(deployment)
        text = deployment.text
        check_response_size(batch, text.hidden_size)
        positions = text.context_tokens or 512
        if input_ids is not None:
            vocab = int(text.tokenizer.vocab_size) if text.tokenizer is not None else text.vocab_size
            inputs = await asyncio.to_thread(inputs_from_tensors, input_ids, mask, vocab, positions)
        else:
            inputs = await asyncio.to_thread(text.encode_batch, list(request.texts), positions)
        check_tokens(inputs, config.max_infer_tokens)
        replica, scheduler = self.fleet.route(deployment)
        replica.infers += 1  # a drain waits for it as for a stream
        try:
            vectors = await embed(scheduler.pipeline, inputs, config.infer_micro_batch, pooling,
                                  request.normalize if request.HasField("normalize") else True)
        finally:
            replica.infers -= 1
        response = coordinator_pb2.InferResponse(tokens=sum(len(i) for i in inputs))
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
        return coordinator_pb2.GetClusterStatusResponse(
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


class RegistryServicer(coordinator_pb2_grpc.WorkerRegistryServicer):
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    @grpc_errors
    async def RegisterWorker(self, request: Any, context: Any) -> coordinator_pb2.RegisterWorkerResponse:
        if not is_host_port(request.address):
            raise InvalidArgument(f"address {shown(request.address)} is not host:port")
        if request.memory_budget_bytes <= 0:
            raise InvalidArgument(f"memory_budget_bytes must be > 0, got {request.memory_budget_bytes}")
        record = self.fleet.register(request.address, request.memory_budget_bytes)
        return coordinator_pb2.RegisterWorkerResponse(
            worker_id=record.worker_id, heartbeat_interval_ms=self.fleet.config.heartbeat_interval_ms)

    @grpc_errors
    async def Heartbeat(self, request: Any, context: Any) -> coordinator_pb2.HeartbeatResponse:
        return coordinator_pb2.HeartbeatResponse(known=self.fleet.heartbeat(request.worker_id))

    @grpc_errors
    async def LeaveCluster(self, request: Any, context: Any) -> coordinator_pb2.LeaveClusterResponse:
        record = self.fleet.registry.workers.get(request.worker_id)
        if record is None:
            raise NotFound(f"worker id {shown(request.worker_id)} is not registered here")
        message = await self.fleet.drain_worker(record.address)
        self.fleet.registry.remove(record.worker_id)
        return coordinator_pb2.LeaveClusterResponse(message=message)
