"""The KServe v2 / Open Inference Protocol gRPC API on the coordinator's public port: the service
`inference.GRPCInferenceService` (ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata,
ModelInfer, and Triton's ModelStreamInfer), so that `tritonclient.grpc` and other KServe v2 clients work
unchanged. A thin edge, like coordinator/api/servicer.py: it turns tensors into the core's own requests
(coordinator/api/kserve_inputs.py: the GenerationRequest and EmbedRequest the native API's protos become) and runs
them through the same core (coordinator/fleet/requests.py: `generate` and `infer`), so every check and limit of the
native API applies, with the same messages.

Models are named as in shardline: `name` (its default version) or `name@version`; a request's model_version,
when given, is the version (`name` + model_version = `name@version`). An empty name is the cluster's model.

Generate models (task generate), as Triton's LLM backends (vLLM, TensorRT-LLM) take them:
- inputs: text_input BYTES [1] (the prompt; [1, 1], a batch of one, is taken too); optional max_tokens
  INT32, min_tokens INT32, temperature FP32, top_p FP32, top_k INT32, seed UINT64 (or INT64), ignore_eos
  BOOL, stream BOOL, each [1]; stop BYTES [-1] (stop sequences); sampling_parameters BYTES [1], a JSON object
  with any of max_tokens, min_tokens, temperature, top_p, top_k, seed, stop (a string or a list) and
  ignore_eos (a value given both as an input and in the JSON is refused), and, named as vLLM's SamplingParams
  (which Triton's vLLM backend passes on) name them, logprobs (k), repetition_penalty, frequency_penalty,
  presence_penalty, min_p and logit_bias ({"token id": bias}): the native API's meaning and checks.
- output: text_output BYTES, shape [1] (or [1, 1] when text_input was [1, 1]); with logprobs, also logprobs
  BYTES [1]: JSON, for each token of the response's text (and, on the last, the token that ended it),
  {token_id, token, logprob, top: [{token_id, token, logprob}, ...]}.
- ModelInfer answers the whole text. ModelStreamInfer answers one response per piece of text when the
  request asks to stream (the request parameter `stream` = true, or the input `stream` = true), else one
  response with the whole text. Every stream response carries the parameter `triton_final_response`, true
  on a request's last one (Triton's decoupled convention); with `triton_enable_empty_final_response`
  (tritonclient's `enable_empty_final_response=True`) the last piece is followed by a response without
  outputs that carries it. The last text response also carries finish_reason ("length" or "stop"),
  prompt_tokens, completion_tokens and cached as parameters.
Embedding models (task embed): text_input BYTES [-1] (or [-1, 1]); optional normalize BOOL [1], pooling
BYTES [1] ("mean" or "cls") and truncate BOOL [1] (cut texts over the model's positions instead of
refusing them) -> embeddings FP32 [batch, hidden], and the parameter `tokens`.

Inputs come as typed `contents` or as `raw_input_contents` (one entry per input, little-endian; BYTES
elements each a 4-byte little-endian length, then the bytes: every length is checked against the bytes
left, nothing is read past the end, and the element count must be the shape's). Outputs are sent as
raw_output_contents, which tritonclient reads. A request is at most the port's max_request_bytes (gRPC
refuses a larger one); sampling_parameters at most MAX_SAMPLING_JSON_BYTES. Request parameters other than
`stream` and `triton_enable_empty_final_response` are ignored, as a Triton backend ignores those it does not
read; shared memory is not offered (an input in a shared-memory region is refused).

Errors, as Triton reports them (its core keeps a status's code since server#3399; an unknown model is
NOT_FOUND "Request for unknown model: ...", a version not ready UNAVAILABLE):

  what                                                          status
  ------------------------------------------------------------  ------------------------------------------
  an unknown input or output, an input given twice, a wrong     INVALID_ARGUMENT, naming the input
  datatype or shape, raw contents that do not match the shape,
  text that is not UTF-8, text_input missing, a bad
  sampling_parameters, a value that does not fit its field
  any value the native API refuses (max_tokens, temperature,    INVALID_ARGUMENT, the native message
  top_p, a prompt too long, a batch too large, ...)
  an unknown model or version                                   NOT_FOUND "Request for unknown model: ..."
  a model loading or not ready; the coordinator draining        UNAVAILABLE
  a model without a tokenizer (text cannot be encoded)          FAILED_PRECONDITION
  the cluster at capacity (Triton: a full queue)                UNAVAILABLE
  a message over max_request_bytes (gRPC's own limit)           RESOURCE_EXHAUSTED
  no API key, or an unknown one (when the port has API keys)    UNAUTHENTICATED
  anything unexpected (logged with its traceback)               INTERNAL "internal error; ..."

ModelReady answers ready=false for a model it does not know (as Triton does), never an error. In
ModelStreamInfer a request's error is a response with error_message (its infer_response names the request:
id, model, triton_final_response = true) and the stream stays open for the next request, as in Triton;
requests on one stream run concurrently (at most max_active_streams at once; more wait unread) and their
responses interleave (match them by id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, cast

import grpc
import numpy as np

import shardline
from coordinator.api.kserve_inputs import (
    EMBED_INPUTS,
    EMBEDDINGS,
    GENERATE_INPUTS,
    LOGPROBS_OUTPUT,
    TEXT_OUTPUT,
    bool_parameter,
    check_outputs,
    generate_request,
    infer_request,
    read_inputs,
    requested_model,
)
from coordinator.api.quotas import charge
from coordinator.api.servicer import CoordinatorServicer
from coordinator.fleet.requests import generate, infer
from coordinator.serving.embedding import EmbedRequest
from coordinator.serving.generation import GenerationRequest, Logprob, Piece
from coordinator.serving.request_log import MAX_REQUEST_ID_CHARS, request_id_of
from coordinator.store.models import ModelTask
from shardline import tracing
from shardline.errors import (
    NotFound,
    ResourceExhausted,
    ShardlineError,
    Unavailable,
    grpc_errors,
    status_of,
)
from shardline.kserve import grpc_predict_v2_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"  # the specification's name: the methods' paths use it
EXTENSIONS = ["parameters"]  # request and response parameters; no shared memory, no model repository
STREAM_BUFFER = 64  # responses of one ModelStreamInfer waiting for the client to read them
UNKNOWN_MODEL = "Request for unknown model: "


@contextlib.contextmanager
def triton_errors() -> Iterator[None]:
    """An unknown model is reported as Triton words it (clients match "Request for unknown model"), and a
    cluster at capacity as Triton reports a full queue: UNAVAILABLE, which Triton clients retry."""
    try:
        yield
    except NotFound as exc:
        raise NotFound(UNKNOWN_MODEL + exc.message) from None
    except ResourceExhausted as exc:
        raise Unavailable(exc.message) from None


# ---- tensors out --------------------------------------------------------------------------------------

def bytes_tensor(values: list[bytes]) -> bytes:
    return b"".join(len(v).to_bytes(4, "little") + v for v in values)


@dataclass(frozen=True)
class Job:
    """One KServe request, checked and turned into the core's request."""

    request: Any                     # the ModelInferRequest
    name: str                        # the model's name, as responses give it
    version: str                     # the version it runs on
    native: GenerationRequest | EmbedRequest  # the core's request
    shape: tuple[int, ...] = (1,)    # text_output's shape: text_input's rank
    stream: bool = False
    empty_final: bool = False
    context: Any = None              # the call's grpc context (its metadata may carry a trace context)
    method: str = "ModelInfer"

    @property
    def embeds(self) -> bool:
        return isinstance(self.native, EmbedRequest)

    def client_id(self) -> str:
        """The caller's id for the request log: `x-request-id` metadata, else the request's own `id`."""
        return request_id_of(self.context) or str(self.request.id)[:MAX_REQUEST_ID_CHARS]

    def response(self) -> pb.ModelInferResponse:
        r = self.request
        return pb.ModelInferResponse(model_name=self.name, model_version=self.version, id=r.id)

    def text(self, text: str, last: Piece | None = None, final: bool | None = None,
             logprobs: list[Logprob] | None = None) -> pb.ModelInferResponse:
        response = self.response()
        response.outputs.add(name=TEXT_OUTPUT, datatype="BYTES", shape=self.shape)
        response.raw_output_contents.append(bytes_tensor([text.encode("utf-8", "replace")]))
        if cast(GenerationRequest, self.native).logprobs is not None:  # asked (sampling_parameters.logprobs)
            response.outputs.add(name=LOGPROBS_OUTPUT, datatype="BYTES", shape=[1])
            response.raw_output_contents.append(bytes_tensor([logprobs_json(logprobs or [])]))
        p = response.parameters
        if last is not None:
            p["finish_reason"].string_param = last.finish_reason
            p["prompt_tokens"].int64_param = last.prompt_tokens
            p["completion_tokens"].int64_param = last.completion_tokens
            p["cached"].bool_param = last.cached
        if final is not None:
            p["triton_final_response"].bool_param = final
        return response


def logprobs_json(logprobs: list[Logprob]) -> bytes:
    """The `logprobs` output: for each token of the response's text, its id, text and log probability, and the
    likeliest tokens at its position (JSON, as Triton's vLLM backend sends its log probabilities as text)."""
    return json.dumps([{"token_id": t.token_id, "token": t.token, "logprob": t.logprob,
                        "top": [{"token_id": i, "token": text, "logprob": lp} for i, text, lp in t.top]}
                       for t in logprobs]).encode()


def final_only(request: Any, version: str = "") -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=version or request.model_version,
                                     id=request.id)
    response.parameters["triton_final_response"].bool_param = True
    return response


# ---- the service --------------------------------------------------------------------------------------

class KServeServicer:
    """inference.GRPCInferenceService over the coordinator's fleet; its generations count among the
    coordinator's active sessions."""

    def __init__(self, core: CoordinatorServicer) -> None:
        self.core = core

    @property
    def fleet(self) -> Any:
        return self.core.fleet

    @grpc_errors
    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        # as health checking: every model name's default version has a ready replica, and no drain
        return pb.ServerReadyResponse(ready=self.fleet.serves_every_name and not self.fleet.draining)

    @grpc_errors
    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        try:
            deployment = self.fleet.find(requested_model(request.name, request.version))
        except ShardlineError:  # unknown, loading, or a name no model has: not ready
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=bool(deployment.ready_replicas) and not self.fleet.draining)

    @grpc_errors
    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="shardline", version=shardline.__version__, extensions=EXTENSIONS)

    @grpc_errors
    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        with triton_errors():
            deployment = self.fleet.find(requested_model(request.name, request.version))
        name = deployment.spec.name
        response = pb.ModelMetadataResponse(name=request.name or name, platform="shardline",
                                            versions=self.fleet.versions().get(name, [deployment.spec.version]))
        Meta = pb.ModelMetadataResponse.TensorMetadata
        if deployment.task == ModelTask.EMBED:
            specs, outputs = EMBED_INPUTS, [Meta(name=EMBEDDINGS, datatype="FP32",
                                                 shape=[-1, deployment.text.hidden_size])]
        else:
            specs, outputs = GENERATE_INPUTS, [Meta(name=TEXT_OUTPUT, datatype="BYTES", shape=[-1])]
        response.inputs.extend(Meta(name=n, datatype=s.datatypes[0], shape=s.shape) for n, s in specs.items())
        response.outputs.extend(outputs)
        return response

    def job(self, request: Any, context: Any, method: str) -> Job:
        """Every check of the KServe shape of a request; the values are the core's to check."""
        model = requested_model(request.model_name, request.model_version)
        with triton_errors():
            deployment = self.fleet.find(model)
        label, name, version = model or deployment.key, request.model_name or deployment.spec.name, \
            deployment.spec.version
        empty_final = bool_parameter(request.parameters, "triton_enable_empty_final_response")
        if deployment.task == ModelTask.EMBED:
            check_outputs(request, (EMBEDDINGS,), label)
            return Job(request, name, version, infer_request(model, read_inputs(request, EMBED_INPUTS, label)),
                       empty_final=empty_final, context=context, method=method)
        check_outputs(request, (TEXT_OUTPUT, LOGPROBS_OUTPUT), label)
        inputs = read_inputs(request, GENERATE_INPUTS, label)
        stream = bool_parameter(request.parameters, "stream") or bool("stream" in inputs and
                                                                       inputs["stream"].values[0])
        text = inputs.get("text_input")
        shape = text.shape if text is not None else (1,)
        return Job(request, name, version, generate_request(model, inputs), shape, stream, empty_final,
                   context, method)

    async def pieces(self, job: Job) -> AsyncGenerator[Piece, None]:
        """The generation's pieces from the core, as the native Generate runs it (traced as it is)."""
        req = cast(GenerationRequest, job.native)
        self.core.active_sessions += 1
        try:
            with self.core.quotas.admitted(self.core.key_of(job.context)) as usage, \
                    tracing.request_span(f"shardline.kserve.{job.method}", job.context, model=req.model) as span:
                native = generate(self.fleet, self.core.cache, req, uuid.uuid4().hex, trace=tracing.traceparent(span),
                                  client_id=job.client_id(), tenant=self.core.caller(job.context)[0])
                async with contextlib.aclosing(cast(AsyncGenerator[Piece, None], native)) as pieces:
                    async for piece in pieces:
                        charge(usage, piece)
                        yield piece
                        if piece.finish_reason and span is not None:
                            span.set_attributes({"prompt_tokens": piece.prompt_tokens, "cached": piece.cached,
                                                 "completion_tokens": piece.completion_tokens})
        finally:
            self.core.active_sessions -= 1

    async def whole(self, job: Job, final: bool | None) -> pb.ModelInferResponse:
        texts: list[str] = []
        logprobs: list[Logprob] = []
        last: Piece | None = None
        async for piece in self.pieces(job):
            texts.append(piece.text)
            logprobs += piece.logprobs
            last = piece
        return job.text("".join(texts), last, final, logprobs)

    async def embed(self, job: Job, final: bool | None) -> pb.ModelInferResponse:
        with self.core.quotas.admitted(self.core.key_of(job.context)) as usage:
            vectors, tokens = await infer(self.fleet, cast(EmbedRequest, job.native), job.client_id())
            usage.tokens += tokens
        response = job.response()
        response.outputs.add(name=EMBEDDINGS, datatype="FP32", shape=list(vectors.shape))
        response.raw_output_contents.append(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
        response.parameters["tokens"].int64_param = tokens
        if final is not None:
            response.parameters["triton_final_response"].bool_param = final
        return response

    @grpc_errors
    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        with triton_errors():
            job = self.job(request, context, "ModelInfer")
            return await (self.embed(job, None) if job.embeds else self.whole(job, None))

    async def answer(self, request: Any, context: Any) -> AsyncGenerator[pb.ModelInferResponse, None]:
        """One stream request's responses (Triton's decoupled convention)."""
        with triton_errors():
            job = self.job(request, context, "ModelStreamInfer")
            if job.embeds or not job.stream:
                response = await (self.embed(job, not job.empty_final) if job.embeds
                                  else self.whole(job, not job.empty_final))
                yield response
            else:
                async for piece in self.pieces(job):
                    last = bool(piece.finish_reason)
                    yield job.text(piece.text, piece if last else None, last and not job.empty_final,
                                   piece.logprobs)
            if job.empty_final:
                yield final_only(request, job.version)

    @grpc_errors
    async def ModelStreamInfer(self, requests: AsyncIterator[Any],
                               context: Any) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request runs as it arrives (at most max_active_streams at once: more wait unread); an error
        is that request's last response, and the stream goes on."""
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue(STREAM_BUFFER)
        slots = asyncio.Semaphore(max(1, self.fleet.config.max_active_streams))
        running: set[asyncio.Task[None]] = set()

        async def one(request: Any) -> None:
            try:
                self.core.still_admitted(context)  # each request of a long stream: a revoked key stops here
                async with contextlib.aclosing(self.answer(request, context)) as responses:
                    async for response in responses:
                        await out.put(pb.ModelStreamInferResponse(infer_response=response))
            except Exception as exc:  # noqa: BLE001 - the error table decides what the caller sees
                _, message = status_of(exc)
                await out.put(pb.ModelStreamInferResponse(error_message=message, infer_response=final_only(request)))
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for request in requests:
                    await slots.acquire()
                    task = asyncio.create_task(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
            except Exception:  # noqa: BLE001 - the request side broke: answer what was asked, then end
                log.warning("ModelStreamInfer: reading requests failed", exc_info=True)
            while running:
                await asyncio.wait(set(running))
            await out.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await out.get()) is not None:
                yield item
        finally:  # the call ended (or was cancelled): stop every request of it, freeing their streams
            for task in (reader, *running):
                task.cancel()
            await asyncio.gather(reader, *running, return_exceptions=True)


def add_to_server(servicer: KServeServicer, server: grpc.aio.Server) -> None:
    """Registers the servicer as inference.GRPCInferenceService: the methods are /inference.GRPCInferenceService/
    <Method>, what KServe v2 clients call (the messages' protobuf package is shardline.kserve: see the proto)."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        kind = ("stream" if method.client_streaming else "unary") + "_" + (
            "stream" if method.server_streaming else "unary")
        handlers[method.name] = getattr(grpc, f"{kind}_rpc_method_handler")(
            getattr(servicer, method.name), request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
