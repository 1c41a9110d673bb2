"""ShardWorker servicer: protobuf <-> domain types at the edge, nothing else: requests become calls on the
shard's lifecycle (shard_worker/lifecycle.py) and relay (shard_worker/relay.py), their results replies, and
errors gRPC statuses. Compute runs on the compute thread, weight loading on a loader thread; the event loop
only moves bytes."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import grpc
import psutil
from google.protobuf import message_factory

from shard_worker import calibration
from shard_worker.device import COMPUTE_DTYPES, DeviceError, DeviceSettings, check_dtype, device_proto
from shard_worker.lifecycle import Shard, ShardLifecycle
from shard_worker.quantize import quantization_from_enum, quantization_to_enum
from shard_worker.relay import Relay
from shard_worker.runtime import KVSettings, Slice, StageRuntime, Step, StepResult
from shard_worker.sampling import Sampling
from shard_worker.scoring import SequenceScores
from shard_worker.step_flow import Pending, StepFlow
from shard_worker.weights import Progress, ShardSpec
from shardline import tracing
from shardline.codec import decode_tensor, dtype_from_enum, dtype_to_enum, fill_tensor
from shardline.errors import FailedPrecondition, InvalidArgument, ShardlineError, status_of
from shardline.errors import grpc_errors as rpc_errors
from shardline.fencing import Fence
from shardline.limits import is_host_port
from shardline.scores import TokenScore
from shardline.stream import LinkSettings
from shardline.tensor_wire import Beside, Parsed, TensorParser, serialize
from shardline.v1 import tensor_pb2, worker_pb2, worker_pb2_grpc
from shardline.wire_dtype import wire_dtype_from_enum

log = logging.getLogger(__name__)
OUTPUTS = {worker_pb2.OUTPUT_KIND_UNSPECIFIED: "tokens", worker_pb2.OUTPUT_KIND_TOKENS: "tokens",
           worker_pb2.OUTPUT_KIND_LOGITS: "logits", worker_pb2.OUTPUT_KIND_LAST_LOGITS: "last_logits",
           worker_pb2.OUTPUT_KIND_HIDDEN: "hidden"}
PHASES = {"manifest": worker_pb2.LOAD_PHASE_MANIFEST, "fetching": worker_pb2.LOAD_PHASE_FETCHING,
          "building": worker_pb2.LOAD_PHASE_BUILDING, "ready": worker_pb2.LOAD_PHASE_READY}
STATES = {"empty": worker_pb2.WORKER_STATE_EMPTY, "loading": worker_pb2.WORKER_STATE_LOADING,
          "ready": worker_pb2.WORKER_STATE_READY, "failed": worker_pb2.WORKER_STATE_FAILED}


def step_from_proto(req: worker_pb2.ForwardRequest, hidden_data: memoryview | None = None) -> Step:
    """`hidden_data`: the hidden tensor's payload when it was received beside the message (FORWARD_PARSER)."""
    if req.output not in OUTPUTS:
        raise InvalidArgument(f"output {req.output} is not a known OutputKind")
    sequences = [Slice(s.session_id, s.start_position, s.num_tokens, sampling_from_proto(s.sampling),
                       tuple(s.prefix_blocks), s.prefix_tokens, tuple(s.token_ids) if s.token_ids else None,
                       s.allowed_tokens, s.fork_from)
                 for s in req.sequences]
    hidden = decode_tensor(req.hidden, "hidden", hidden_data) if req.HasField("hidden") else None
    scale = decode_tensor(req.hidden_scale, "hidden_scale") if req.HasField("hidden_scale") else None
    return Step(sequences, list(req.token_ids) if req.token_ids else None, hidden, OUTPUTS[req.output],
                hidden_scale=scale, send_on=bool(req.route))


def sampling_from_proto(p: worker_pb2.SamplingParams) -> Sampling:
    return Sampling(p.temperature, p.top_k, p.top_p or 1.0, p.seed, min_p=p.min_p,
                    repetition_penalty=p.repetition_penalty or 1.0, frequency_penalty=p.frequency_penalty,
                    presence_penalty=p.presence_penalty, logit_bias=tuple(sorted(p.logit_bias.items())),
                    logprobs=p.logprobs if p.HasField("logprobs") else None,
                    prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None,
                    prompt_tokens=p.prompt_tokens)


def scored_token(t: TokenScore) -> worker_pb2.ScoredToken:
    return worker_pb2.ScoredToken(position=t.position, token_id=t.token_id, logprob=t.logprob,
                                   top_ids=[i for i, _ in t.top], top_logprobs=[v for _, v in t.top])


def sequence_logprobs(s: SequenceScores) -> worker_pb2.SequenceLogprobs:
    out = worker_pb2.SequenceLogprobs(prompt=[scored_token(t) for t in s.prompt])
    if s.sampled is not None:
        out.sampled.CopyFrom(scored_token(s.sampled))
    return out


def sequence_errors(errors: list[tuple[str, ShardlineError]]) -> list[worker_pb2.SequenceError]:
    out = []
    for session_id, exc in errors:
        code, message = status_of(exc)
        out.append(worker_pb2.SequenceError(session_id=session_id,
                                            error=tensor_pb2.ErrorStatus(code=code.value[0], message=message)))
    return out


def response_from_result(step_id: int, result: StepResult,
                         failed: list[worker_pb2.SequenceError]) -> Beside[worker_pb2.ForwardResponse]:
    """The response, its tensor (logits, hidden states) kept beside it until it goes on the wire."""
    response = worker_pb2.ForwardResponse(step_id=step_id, token_ids=result.token_ids or [],
                                          sequence_errors=[*failed, *sequence_errors(result.errors)],
                                          logprobs=[sequence_logprobs(s) for s in result.scores or ()])
    return Beside(response, RESPONSE_TENSOR, result.tensor)


def onward_request(req: worker_pb2.ForwardRequest, result: StepResult,
                   next_layer: int) -> worker_pb2.ForwardRequest:
    """The step as the route's next stage gets it: the sequences that went through, the failures so far."""
    kept = req.sequences if not result.errors else [req.sequences[i] for i in result.kept]
    onward = worker_pb2.ForwardRequest(sequences=kept, start_layer=next_layer, route=req.route[1:],
                                       output=req.output, failed=[*req.failed, *sequence_errors(result.errors)])
    if result.scale is not None:  # int8 hidden states: their per-row scale
        fill_tensor(onward.hidden_scale, result.scale)
    return onward


def kv_settings(request: worker_pb2.LoadShardRequest) -> KVSettings:
    """The KV settings a LoadShard asks for (0 = the default); errors name the field."""
    defaults = KVSettings()
    for name in ("max_step_tokens", "max_step_sequences", "prefill_chunk_tokens", "kv_block_tokens",
                 "session_ttl_ms"):
        if getattr(request, name) < 0:
            raise InvalidArgument(f"{name} must be >= 0 (0 = the default), got {getattr(request, name)}")
    settings = KVSettings(max_step_tokens=request.max_step_tokens or defaults.max_step_tokens,
                          max_step_sequences=request.max_step_sequences or defaults.max_step_sequences,
                          prefill_chunk_tokens=request.prefill_chunk_tokens or defaults.prefill_chunk_tokens,
                          block_tokens=request.kv_block_tokens or defaults.block_tokens,
                          session_ttl_s=request.session_ttl_ms / 1000 if request.session_ttl_ms
                          else defaults.session_ttl_s)
    if settings.max_step_tokens > MAX_STEP_TOKENS_LIMIT:
        raise InvalidArgument(f"max_step_tokens {settings.max_step_tokens} is above {MAX_STEP_TOKENS_LIMIT}")
    if settings.block_tokens > 4096:
        raise InvalidArgument(f"kv_block_tokens {settings.block_tokens} is above 4096")
    if settings.max_step_sequences > settings.max_step_tokens:
        raise InvalidArgument(f"max_step_sequences {settings.max_step_sequences} is above max_step_tokens "
                              f"{settings.max_step_tokens}")
    if settings.prefill_chunk_tokens > settings.max_step_tokens:
        raise InvalidArgument(f"prefill_chunk_tokens {settings.prefill_chunk_tokens} is above max_step_tokens "
                              f"{settings.max_step_tokens}")
    return settings


def calibration_spec(request: worker_pb2.CalibrateRequest, worker_dtype: str) -> calibration.CalibrationSpec:
    """A Calibrate request's spec (the worker's --dtype, when it has one, wins, as for LoadShard)."""
    asked = dtype_from_enum(request.dtype) if request.dtype else ""
    if asked and asked not in COMPUTE_DTYPES:
        raise InvalidArgument(f"dtype {asked} cannot be a compute dtype (float32, float16 or bfloat16)")
    if request.max_ms < 0:
        raise InvalidArgument(f"max_ms must be >= 0 (0 = the default), got {request.max_ms}")
    return calibration.CalibrationSpec(request.family, request.config_json, worker_dtype or asked or "float32",
                                       request.sequences, request.tokens, request.context_tokens,
                                       request.max_ms / 1000 if request.max_ms else calibration.DEFAULT_MAX_S)


def error_response(step_id: int, exc: BaseException) -> worker_pb2.ForwardResponse:
    code, message = status_of(exc)
    return worker_pb2.ForwardResponse(step_id=step_id,
                                      error=tensor_pb2.ErrorStatus(code=code.value[0], message=message))


# Forward on the wire: hidden states parsed and sent without protobuf's copies (shardline/tensor_wire.py)
FORWARD_PARSER = TensorParser(worker_pb2.ForwardRequest, "hidden")
RESPONSE_TENSOR = worker_pb2.ForwardResponse.DESCRIPTOR.fields_by_name["tensor"].number
Reply = worker_pb2.ForwardResponse | Beside[worker_pb2.ForwardResponse]

MAX_STEP_TOKENS_LIMIT = 65_536
MAX_PEERS = 4096
# a Forward stream's requests received and not yet answered, at most: twice a sender's default window, so a
# well-behaved sender never waits for it, and a flooding one meets gRPC's flow control (memory stays bounded)
FORWARD_OPEN_LIMIT = 2 * LinkSettings().window
MAX_CALIBRATION_PAYLOAD = 64 * 2**20


class WorkerServicer(worker_pb2_grpc.ShardWorkerServicer):
    def __init__(self, set_serving: Callable[[bool], Awaitable[None]], links: LinkSettings | None = None,
                 memory_budget_bytes: int = 0, device: DeviceSettings | None = None) -> None:
        links = links or LinkSettings()
        self.lifecycle = ShardLifecycle(set_serving, device, memory_budget_bytes)
        self.relay = Relay(self.lifecycle, links)
        self.identity = links.identity
        self.memory_limit_bytes = self.runtime_bytes = 0  # a process's --worker-memory-mb, and its runtime's RSS
        self.fence = Fence()  # who this worker is, and the coordinator epoch it registered in (shardline/fencing.py)
        self.forward_bound = FORWARD_OPEN_LIMIT  # requests open on one Forward stream at most (back-pressure)
        # the worker's parts as the server, tests and benchmarks reach them
        self.compute, self.metrics, self.links = self.lifecycle.compute, self.lifecycle.metrics, self.relay.links

    @property
    def shard(self) -> Shard | None:
        return self.lifecycle.shard

    def _fenced(self, context: Any, rpc: str) -> None:
        """A control call from a replaced coordinator, or meant for the worker this address had before, is
        refused (FAILED_PRECONDITION), counted (shardline:worker_fenced_calls_total) and logged."""
        try:
            self.fence.check({k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)})
        except FailedPrecondition as exc:
            self.metrics.fenced.labels(rpc).inc()
            log.warning("refused %s: %s", rpc, exc.message)
            raise

    # -- LoadShard -------------------------------------------------------------------------------------
    @rpc_errors
    async def LoadShard(self, request: Any, context: Any) -> AsyncIterator[worker_pb2.LoadShardProgress]:
        self._fenced(context, "LoadShard")
        spec, settings, wire_dtype = self._load_order(request)
        async with contextlib.aclosing(self.lifecycle.load(spec, settings, wire_dtype)) as progress:
            async for p in progress:
                yield _progress_proto(p)

    def _load_order(self, request: worker_pb2.LoadShardRequest) -> tuple[ShardSpec, KVSettings, str]:
        """What a LoadShard asks for: the shard, its KV settings and its wire dtype; errors name the field."""
        if not request.model:
            raise InvalidArgument("model is empty")
        if not 0 <= request.start_layer < request.end_layer:
            raise InvalidArgument(f"layer range [{request.start_layer}, {request.end_layer}) is empty or negative "
                                  "(need 0 <= start_layer < end_layer)")
        if not request.parameters_address:
            raise InvalidArgument("parameters_address is empty")
        asked = dtype_from_enum(request.dtype) if request.dtype else ""
        if asked and asked not in COMPUTE_DTYPES:
            raise InvalidArgument(f"dtype {asked} cannot be a compute dtype (float32, float16 or bfloat16)")
        device = self.lifecycle.device
        dtype = device.compute_dtype(asked)  # the worker's --dtype, when it has one, wins
        try:
            check_dtype(device.device, dtype, "dtype")
        except DeviceError as exc:
            raise InvalidArgument(str(exc)) from None
        wire_dtype = wire_dtype_from_enum(request.wire_dtype, dtype)
        spec = ShardSpec(request.model, request.start_layer, request.end_layer, dtype, request.parameters_address,
                         self.identity, quantize=quantization_from_enum(request.quantize), device=str(device.device),
                         engine=device.engine, digest=request.weights_digest)
        return spec, kv_settings(request), wire_dtype

    # -- Forward ---------------------------------------------------------------------------------------
    async def Forward(self, request_iterator: Any, context: Any) -> AsyncIterator[Reply]:
        """Requests arrive as `Parsed` (FORWARD_PARSER, registered by `add_to_server`); replies go out as
        messages or `Beside`s (their tensor serialized beside them), in the order the requests came, except
        that a request refused at once, or relayed to the next stage, is answered as soon as its reply is
        known. The plumbing (a reader, the compute thread, the bound on open requests) is StepFlow's."""
        flow: StepFlow[Reply] = StepFlow(request_iterator, self._accept, self._answer, _failed, self.forward_bound)
        async with contextlib.aclosing(flow.replies()) as replies:
            async for reply in replies:
                yield reply

    def _accept(self, item: Parsed[worker_pb2.ForwardRequest] | worker_pb2.ForwardRequest) -> Pending | Reply:
        received = time.monotonic()
        parsed = item if isinstance(item, Parsed) else Parsed(item)
        req, hidden_data = parsed.message, parsed.data
        try:
            step = step_from_proto(req, hidden_data)
            size = req.ByteSize() + (len(hidden_data) if hidden_data is not None else 0)
            queued = self.relay.submit(step, req.start_layer, req.route, size)
        except Exception as exc:  # noqa: BLE001 - answered on the stream, which goes on
            return error_response(req.step_id, exc)
        return Pending(queued.result, queued.settle, (req, received, queued.next_layer))

    def _answer(self, pending: Pending) -> Reply | Coroutine[Any, Any, Reply]:
        """A finished step's reply: the result, an error, or (a route going on) the next stage's reply."""
        req, received, next_layer = pending.data
        try:
            result: StepResult = pending.future.result()
        except Exception as exc:  # noqa: BLE001
            return error_response(req.step_id, exc)
        if tracing.on():
            self._trace(req, received)
        if not req.route or not result.kept:  # the end of the route, or nothing left to pass on
            response = response_from_result(req.step_id, result, list(req.failed))
            self.relay.count_out(response.nbytes)
            return response
        if result.tensor is None:
            return error_response(req.step_id, RuntimeError("no hidden states to pass on"))
        reply = self.relay.pass_on(req.route[0], onward_request(req, result, next_layer), result.tensor,
                                   req.timeout_ms, received)
        return _relayed(req.step_id, reply)

    def _trace(self, req: worker_pb2.ForwardRequest, received: float) -> None:
        """A span per traced request of this step: this stage's part of it, from receipt (its wait in the
        compute queue included) to its result."""
        shard = self.lifecycle.shard
        if shard is None:
            return
        stage = shard.runtime.stage
        now = time.time_ns()
        tracing.step_spans(f"stage [{stage.start}, {stage.end})", (s.traceparent for s in req.sequences),
                           now - int((time.monotonic() - received) * 1e9), now, step_id=req.step_id,
                           step_tokens=sum(s.num_tokens for s in req.sequences), sequences=len(req.sequences),
                           layers=f"[{stage.start}, {stage.end})")

    # -- UnloadShard -----------------------------------------------------------------------------------
    @rpc_errors
    async def UnloadShard(self, request: Any, context: Any) -> worker_pb2.UnloadShardResponse:
        self._fenced(context, "UnloadShard")
        unloaded = await self.lifecycle.unload(request.model, self.relay.forget_peers)
        if unloaded is None:
            return worker_pb2.UnloadShardResponse()
        freed, ended = unloaded
        return worker_pb2.UnloadShardResponse(freed_weight_bytes=freed, sessions_ended=ended)

    # -- Calibrate --------------------------------------------------------------------------------------
    @rpc_errors
    async def Calibrate(self, request: Any, context: Any) -> worker_pb2.CalibrateResponse:
        self._fenced(context, "Calibrate")
        if len(request.payload) > MAX_CALIBRATION_PAYLOAD:
            raise InvalidArgument(f"payload has {len(request.payload)} bytes; at most {MAX_CALIBRATION_PAYLOAD}")
        if not request.family:  # a link probe: the echo alone
            return worker_pb2.CalibrateResponse(payload=request.payload)
        done = await self.lifecycle.calibrate(calibration_spec(request, self.lifecycle.device.dtype))
        return worker_pb2.CalibrateResponse(seconds_per_layer=done.seconds_per_layer, repeats=done.repeats,
                                            activation_bytes_per_token=done.activation_bytes_per_token,
                                            threads=done.threads, payload=request.payload)

    # -- EndSession / SetPeers / GetStatus -------------------------------------------------------------
    @rpc_errors
    async def EndSession(self, request: Any, context: Any) -> worker_pb2.EndSessionResponse:
        self._fenced(context, "EndSession")
        if any(not sid for sid in request.session_ids):
            raise InvalidArgument("session_ids holds an empty id")
        return worker_pb2.EndSessionResponse(ended=await self.lifecycle.end_sessions(list(request.session_ids)))

    @rpc_errors
    async def SetPeers(self, request: Any, context: Any) -> worker_pb2.SetPeersResponse:
        self._fenced(context, "SetPeers")
        addresses = list(request.addresses)
        if len(addresses) > MAX_PEERS:
            raise InvalidArgument(f"{len(addresses)} peers; a plan has at most {MAX_PEERS} workers")
        for a in addresses:
            if not is_host_port(a):
                raise InvalidArgument(f"peer {a[:64]!r} is not HOST:PORT")
        self.relay.set_peers(frozenset(addresses))
        return worker_pb2.SetPeersResponse()

    @rpc_errors
    async def GetStatus(self, request: Any, context: Any) -> worker_pb2.GetStatusResponse:
        rss = psutil.Process().memory_info().rss
        held = self.lifecycle
        shard = held.shard
        if shard is None:
            return worker_pb2.GetStatusResponse(state=STATES[held.state], rss_bytes=rss, last_error=held.last_error,
                                                device=device_proto(held.device, held.device.dtype), loads=held.loads,
                                                memory_limit_bytes=self.memory_limit_bytes,
                                                runtime_bytes=self.runtime_bytes)
        runtime = shard.runtime
        return worker_pb2.GetStatusResponse(device=device_proto(held.device, shard.spec.dtype),
            state=STATES[held.state], model=shard.spec.model, start_layer=shard.spec.start,
            end_layer=shard.spec.end, weight_bytes=shard.weight_bytes, sessions=len(runtime.sessions),
            kv_cache_bytes=runtime.kv_bytes, rss_bytes=rss, has_embedding=runtime.stage.is_first,
            has_head=runtime.stage.is_last, metrics=_metrics_proto(runtime), kv=_kv_proto(runtime),
            wire_dtype=dtype_to_enum(runtime.wire_dtype), quantize=quantization_to_enum(shard.spec.quantize),
            loads=held.loads, weights_digest=shard.digest, memory_limit_bytes=self.memory_limit_bytes,
            runtime_bytes=self.runtime_bytes)

    async def close(self) -> None:
        await self.relay.close()
        await self.lifecycle.close()


def _progress_proto(p: Progress) -> worker_pb2.LoadShardProgress:
    return worker_pb2.LoadShardProgress(phase=PHASES[p.phase], bytes_done=p.bytes_done, bytes_total=p.bytes_total,
                                        tensors_done=p.tensors_done, tensors_total=p.tensors_total, tensor=p.tensor)


def _metrics_proto(runtime: StageRuntime) -> worker_pb2.StageMetrics:
    m = runtime.metrics
    uptime = time.monotonic() - m.started
    return worker_pb2.StageMetrics(uptime_ms=int(uptime * 1000), busy_ms=int(m.busy_s * 1000),
                                   idle_ms=int(max(0.0, uptime - m.busy_s) * 1000), queue_depth=m.queued,
                                   steps=m.steps, tokens=m.tokens, bytes_in=m.bytes_in, bytes_out=m.bytes_out,
                                   prefill_tokens=m.prefill_tokens, prefix_tokens_reused=m.prefix_reused,
                                   prefix_blocks=len(runtime.prefix.blocks), prefix_cache_bytes=runtime.prefix.nbytes,
                                   prefix_evictions=m.prefix_evictions)


def _kv_proto(runtime: StageRuntime) -> worker_pb2.KVCapacity:
    pool, layout = runtime.pool, runtime.pool.layout
    return worker_pb2.KVCapacity(
        block_tokens=layout.block_tokens, block_bytes=layout.block_bytes, blocks_total=pool.blocks_total,
        blocks_used=pool.blocks_used, capacity_tokens=pool.blocks_total * layout.block_tokens,
        capacity_bytes=pool.blocks_total * layout.block_bytes, headroom_bytes=runtime.headroom_bytes,
        memory_budget_bytes=runtime.budget_bytes, sessions_expired=runtime.metrics.sessions_expired,
        max_step_tokens=runtime.settings.max_step_tokens)


async def _relayed(step_id: int, reply: Awaitable[worker_pb2.ForwardResponse]) -> worker_pb2.ForwardResponse:
    """The next stage's reply to a relayed step, under this stream's step id."""
    response = await reply
    response.step_id = step_id
    return response


def _failed(pending: Pending, exc: Exception) -> worker_pb2.ForwardResponse:
    return error_response(pending.data[0].step_id, exc)


def add_to_server(servicer: WorkerServicer, server: Any) -> None:
    """The ShardWorker service as the generated `add_ShardWorkerServicer_to_server` registers it, except that
    Forward's hidden states are parsed and sent beside their messages (shardline/tensor_wire.py)."""
    service = worker_pb2.DESCRIPTOR.services_by_name["ShardWorker"]
    handlers = {}
    for method in service.methods:
        kind = ("stream" if method.client_streaming else "unary") + "_" + (
            "stream" if method.server_streaming else "unary")
        request_type = message_factory.GetMessageClass(method.input_type)
        handlers[method.name] = getattr(grpc, f"{kind}_rpc_method_handler")(
            getattr(servicer, method.name), request_deserializer=request_type.FromString,
            response_serializer=serialize)
    handlers["Forward"] = grpc.stream_stream_rpc_method_handler(
        servicer.Forward, request_deserializer=FORWARD_PARSER.parse, response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
