"""The KServe v2 / Open Inference Protocol gRPC API on the coordinator's public port: the service
`inference.GRPCInferenceService` (ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata,
ModelInfer, and Triton's ModelStreamInfer), so that `tritonclient.grpc` and other KServe v2 clients work
unchanged. A thin edge, like coordinator/api/servicer.py: it turns tensors into the native GenerateRequest or
InferRequest and runs them through the same core (coordinator/serving/inference.py: `generate` and `infer`), so every
check and limit of the native API applies, with the same messages.

Models are named as in shardline: `name` (its default version) or `name@version`; a request's model_version,
when given, is the version (`name` + model_version = `name@version`). An empty name is the cluster's model.

Generate models (task generate), as Triton's LLM backends (vLLM, TensorRT-LLM) take them:
- inputs: text_input BYTES [1] (the prompt; [1, 1], a batch of one, is taken too); optional max_tokens
  INT32, min_tokens INT32, temperature FP32, top_p FP32, top_k INT32, seed UINT64 (or INT64), ignore_eos
  BOOL, stream BOOL, each [1]; stop BYTES [-1] (stop sequences); sampling_parameters BYTES [1], a JSON object
  with any of max_tokens, min_tokens, temperature, top_p, top_k, seed, stop (a string or a list) and
  ignore_eos (a value given both as an input and in the JSON is refused).
- output: text_output BYTES, shape [1] (or [1, 1] when text_input was [1, 1]).
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
import math
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import grpc
import numpy as np

import shardline
from coordinator.api.servicer import CoordinatorServicer
from coordinator.serving.generation import MAX_MODEL_NAME_CHARS, Piece, shown
from coordinator.serving.inference import generate, infer, request_from_proto
from coordinator.serving.request_log import MAX_REQUEST_ID_CHARS, request_id_of
from shardline import tracing
from shardline.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ShardlineError,
    Unavailable,
    grpc_errors,
    status_of,
)
from shardline.kserve import grpc_predict_v2_pb2 as pb
from shardline.v1 import coordinator_pb2

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"  # the specification's name: the methods' paths use it
EXTENSIONS = ["parameters"]  # request and response parameters; no shared memory, no model repository
MAX_SAMPLING_JSON_BYTES = 64 * 1024
STREAM_BUFFER = 64  # responses of one ModelStreamInfer waiting for the client to read them
UNKNOWN_MODEL = "Request for unknown model: "


@dataclass(frozen=True)
class Spec:
    """An input: its datatypes (the first is the one metadata shows), its shape in metadata, and
    the shapes taken: `one` ([1] or [1, 1]), `list` ([n] or [1, n]) or `batch` ([n] or [n, 1])."""

    datatypes: tuple[str, ...]
    shape: tuple[int, ...]
    form: str = "one"


GENERATE_INPUTS: dict[str, Spec] = {
    "text_input": Spec(("BYTES",), (1,)),
    "max_tokens": Spec(("INT32",), (1,)),
    "min_tokens": Spec(("INT32",), (1,)),
    "temperature": Spec(("FP32",), (1,)),
    "top_p": Spec(("FP32",), (1,)),
    "top_k": Spec(("INT32",), (1,)),
    "seed": Spec(("UINT64", "INT64"), (1,)),
    "stop": Spec(("BYTES",), (-1,), "list"),
    "ignore_eos": Spec(("BOOL",), (1,)),
    "stream": Spec(("BOOL",), (1,)),
    "sampling_parameters": Spec(("BYTES",), (1,)),
}
EMBED_INPUTS: dict[str, Spec] = {
    "text_input": Spec(("BYTES",), (-1,), "batch"),
    "normalize": Spec(("BOOL",), (1,)),
    "pooling": Spec(("BYTES",), (1,)),
    "truncate": Spec(("BOOL",), (1,)),
}
TEXT_OUTPUT, EMBEDDINGS = "text_output", "embeddings"
POOLING = {"mean": coordinator_pb2.POOLING_MEAN, "cls": coordinator_pb2.POOLING_CLS}

# how the values of each datatype travel: their contents field, and a raw item (BYTES: length-prefixed)
CONTENTS = {"BYTES": "bytes_contents", "BOOL": "bool_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents"}
RAW: dict[str, np.dtype[Any]] = {"BOOL": np.dtype("u1"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
                                 "UINT64": np.dtype("<u8"), "FP32": np.dtype("<f4")}

# sampling fields: the input or JSON key, and the GenerateRequest field's kind (for messages and JSON types)
SAMPLING = {"max_tokens": "int32", "min_tokens": "int32", "temperature": "float", "top_p": "float",
            "top_k": "int32", "seed": "uint64", "stop": "strings", "ignore_eos": "bool"}


# ---- tensors in ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    values: list[Any]

    def texts(self) -> list[str]:
        out = []
        for i, value in enumerate(self.values):
            try:
                out.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidArgument(f"input {self.name!r}: element {i} is not valid UTF-8") from None
        return out


def shape_text(shape: Any) -> str:
    dims = [str(d) for d in list(shape)[:4]]
    return "[" + ", ".join(dims) + (", ..." if len(shape) > 4 else "") + "]"


def element_count(name: str, shape: tuple[int, ...], spec: Spec, model: str) -> int:
    """The elements an input's shape holds, if it is one the input takes."""
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {name!r} has shape {shape_text(shape)}: a dimension is negative")
    taken = {"one": ("[1] (or [1, 1], a batch of one)", len(shape) in (1, 2) and all(d == 1 for d in shape)),
             "list": ("[-1] (or [1, -1])", len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)),
             "batch": ("[-1] (or [-1, 1])", len(shape) == 1 or (len(shape) == 2 and shape[1] == 1))}
    expected, ok = taken[spec.form]
    if not ok:
        raise InvalidArgument(f"input {name!r} has shape {shape_text(shape)}; model {model!r} takes it with "
                              f"shape {expected}")
    return math.prod(shape)


def raw_values(name: str, datatype: str, data: bytes, count: int) -> list[Any]:
    """Values from raw contents, checked against the count the shape gives; never read past the end."""
    if datatype == "BYTES":
        values: list[Any] = []
        view, pos, end = memoryview(data), 0, len(data)
        while pos < end:
            if len(values) == count:
                raise InvalidArgument(f"input {name!r}: raw contents hold more than the {count} elements its shape "
                                      "says")
            if end - pos < 4:
                raise InvalidArgument(f"input {name!r}: raw contents end inside the 4-byte length of element "
                                      f"{len(values)}")
            size = int.from_bytes(view[pos:pos + 4], "little")
            pos += 4
            if size > end - pos:
                raise InvalidArgument(f"input {name!r}: element {len(values)} declares {size} bytes and "
                                      f"{end - pos} remain")
            values.append(bytes(view[pos:pos + size]))
            pos += size
        if len(values) != count:
            raise InvalidArgument(f"input {name!r}: raw contents hold {len(values)} elements; its shape says "
                                  f"{count}")
        return values
    dtype = RAW[datatype]
    if len(data) != count * dtype.itemsize:
        raise InvalidArgument(f"input {name!r}: raw contents are {len(data)} bytes; {count} {datatype} "
                              f"elements are {count * dtype.itemsize}")
    array = np.frombuffer(data, dtype)
    return [bool(v) for v in array] if datatype == "BOOL" else array.tolist()


def read_inputs(request: Any, specs: Mapping[str, Spec], model: str) -> dict[str, Tensor]:
    """The request's inputs, each checked against the model's: name, datatype, shape, contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"raw_input_contents holds {len(raw)} entries for {len(request.inputs)} inputs: "
                              "send one per input, in the order of inputs")
    out: dict[str, Tensor] = {}
    for i, t in enumerate(request.inputs):
        name = t.name
        spec = specs.get(name)
        if spec is None:
            raise InvalidArgument(f"unexpected input {shown(name)} for model {model!r}; its inputs: "
                                  f"{', '.join(specs)}")
        if name in out:
            raise InvalidArgument(f"input {name!r} is given twice")
        if "shared_memory_region" in t.parameters:
            raise InvalidArgument(f"input {name!r} is in a shared-memory region; this server takes inputs in "
                                  "the request only")
        if t.datatype not in spec.datatypes:
            raise InvalidArgument(f"input {name!r} has datatype {shown(t.datatype)}; model {model!r} expects "
                                  f"{' or '.join(spec.datatypes)}")
        shape = tuple(t.shape)
        count = element_count(name, shape, spec, model)
        if raw:
            if t.HasField("contents") and t.contents.ByteSize():
                raise InvalidArgument(f"input {name!r} has contents, and the request has raw_input_contents: "
                                      "send every input one way")
            values = raw_values(name, t.datatype, raw[i], count)
        else:
            field = CONTENTS[t.datatype]
            values = list(getattr(t.contents, field))
            if len(values) != count:
                raise InvalidArgument(f"input {name!r} holds {len(values)} values in contents.{field}; its shape "
                                      f"{shape_text(shape)} says {count}")
        out[name] = Tensor(name, t.datatype, shape, values)
    return out


def check_outputs(request: Any, names: tuple[str, ...], model: str) -> None:
    for output in request.outputs:
        if output.name not in names:
            raise InvalidArgument(f"unexpected output {shown(output.name)} for model {model!r}; its outputs: "
                                  f"{', '.join(names)}")


def bool_parameter(parameters: Any, key: str) -> bool:
    if key not in parameters:
        return False
    value = parameters[key]
    if value.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgument(f"parameter {key!r} must be a bool")
    return bool(value.bool_param)


# ---- requests for the core ----------------------------------------------------------------------------

def sampling_json(tensor: Tensor) -> dict[str, Any]:
    """sampling_parameters: a JSON object of the sampling fields, each of its JSON type (null = unset)."""
    text = tensor.values[0]
    if len(text) > MAX_SAMPLING_JSON_BYTES:
        raise InvalidArgument(f"sampling_parameters is {len(text)} bytes; the limit is {MAX_SAMPLING_JSON_BYTES}")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"sampling_parameters is not JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("sampling_parameters must be a JSON object")
    out: dict[str, Any] = {}
    for key, value in data.items():
        kind = SAMPLING.get(key)
        if kind is None:
            raise InvalidArgument(f"sampling_parameters: unknown key {shown(key)}; known: {', '.join(SAMPLING)}")
        if value is None:
            continue
        if kind == "strings" and isinstance(value, str):
            value = [value]
        ok = {"int32": isinstance(value, int) and not isinstance(value, bool),
              "uint64": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, int | float) and not isinstance(value, bool),
              "bool": isinstance(value, bool),
              "strings": isinstance(value, list) and all(isinstance(s, str) for s in value)}[kind]
        if not ok:
            expected = {"int32": "an integer", "uint64": "an integer", "float": "a number", "bool": "true or false",
                        "strings": "a string or a list of strings"}[kind]
            raise InvalidArgument(f"sampling_parameters.{key} must be {expected}, got {shown(json.dumps(value))}")
        out[key] = value
    return out


def generate_request(model: str, inputs: dict[str, Tensor]) -> coordinator_pb2.GenerateRequest:
    """The native request for a generation; its values are checked by the core, as the native API's."""
    text = inputs.get("text_input")
    if text is None:
        raise InvalidArgument(f"input 'text_input' is missing: model {model!r} needs the prompt (BYTES, shape [1])")
    request = coordinator_pb2.GenerateRequest(model=model, prompt=text.texts()[0])
    fields: dict[str, Any] = {k: inputs[k].values[0] for k in SAMPLING if k in inputs and k != "stop"}
    if "stop" in inputs:
        fields["stop"] = inputs["stop"].texts()
    if "sampling_parameters" in inputs:
        for key, value in sampling_json(inputs["sampling_parameters"]).items():
            if key in fields:
                raise InvalidArgument(f"{key} is given both as an input and in sampling_parameters")
            fields[key] = value
    for key, value in fields.items():
        try:
            if key == "stop":
                request.stop.extend(value)
            else:
                setattr(request, key, value)
        except (TypeError, ValueError, OverflowError):
            raise InvalidArgument(f"{key} {shown(str(value))} does not fit its field ({SAMPLING[key]})") from None
    return request


def infer_request(model: str, inputs: dict[str, Tensor]) -> coordinator_pb2.InferRequest:
    text = inputs.get("text_input")
    if text is None:
        raise InvalidArgument(f"input 'text_input' is missing: model {model!r} needs the texts to embed (BYTES, "
                              "shape [-1])")
    request = coordinator_pb2.InferRequest(model=model, texts=text.texts())
    if "normalize" in inputs:
        request.normalize = inputs["normalize"].values[0]
    if "truncate" in inputs:  # a text over the model's positions: cut to them, instead of INVALID_ARGUMENT
        request.truncate = inputs["truncate"].values[0]
    if "pooling" in inputs:
        pooling = inputs["pooling"].texts()[0]
        if pooling not in POOLING:
            raise InvalidArgument(f"input 'pooling' is {shown(pooling)}; it is one of {', '.join(POOLING)}")
        request.pooling = POOLING[pooling]
    return request


def requested_model(name: str, version: str) -> str:
    """`name` or `name@version`, as shardline names models."""
    for field, value in (("model_name", name), ("model_version", version)):
        if len(value) > MAX_MODEL_NAME_CHARS:
            raise InvalidArgument(f"{field} is {len(value)} characters; a model name has at most "
                                  f"{MAX_MODEL_NAME_CHARS}")
    if not version:
        return name
    if "@" in name:
        raise InvalidArgument(f"model_name {name!r} names a version and model_version {version!r} another: give "
                              "the version one way")
    return f"{name}@{version}"


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
    task: str                        # generate or embed
    native: Any                      # coordinator_pb2.GenerateRequest or InferRequest
    shape: tuple[int, ...] = (1,)    # text_output's shape: text_input's rank
    stream: bool = False
    empty_final: bool = False
    context: Any = None              # the call's grpc context (its metadata may carry a trace context)
    method: str = "ModelInfer"

    def client_id(self) -> str:
        """The caller's id for the request log: `x-request-id` metadata, else the request's own `id`."""
        return request_id_of(self.context) or str(self.request.id)[:MAX_REQUEST_ID_CHARS]

    def response(self) -> pb.ModelInferResponse:
        r = self.request
        return pb.ModelInferResponse(model_name=self.name, model_version=self.version, id=r.id)

    def text(self, text: str, last: Piece | None = None, final: bool | None = None) -> pb.ModelInferResponse:
        response = self.response()
        response.outputs.add(name=TEXT_OUTPUT, datatype="BYTES", shape=self.shape)
        response.raw_output_contents.append(bytes_tensor([text.encode("utf-8", "replace")]))
        p = response.parameters
        if last is not None:
            p["finish_reason"].string_param = last.finish_reason
            p["prompt_tokens"].int64_param = last.prompt_tokens
            p["completion_tokens"].int64_param = last.completion_tokens
            p["cached"].bool_param = last.cached
        if final is not None:
            p["triton_final_response"].bool_param = final
        return response


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
        if deployment.task == "embed":
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
        if deployment.task == "embed":
            check_outputs(request, (EMBEDDINGS,), label)
            return Job(request, name, version, "embed", infer_request(model, read_inputs(request, EMBED_INPUTS, label)),
                       empty_final=empty_final, context=context, method=method)
        check_outputs(request, (TEXT_OUTPUT,), label)
        inputs = read_inputs(request, GENERATE_INPUTS, label)
        stream = bool_parameter(request.parameters, "stream") or bool("stream" in inputs and
                                                                       inputs["stream"].values[0])
        text = inputs.get("text_input")
        shape = text.shape if text is not None else (1,)
        return Job(request, name, version, "generate", generate_request(model, inputs), shape, stream, empty_final,
                   context, method)

    async def pieces(self, job: Job) -> AsyncGenerator[Piece, None]:
        """The generation's pieces from the core, as the native Generate runs it (traced as it is)."""
        req = request_from_proto(job.native)
        self.core.active_sessions += 1
        try:
            with tracing.request_span(f"shardline.kserve.{job.method}", job.context, model=req.model) as span:
                native = generate(self.fleet, self.core.cache, req, uuid.uuid4().hex, trace=tracing.traceparent(span),
                                  client_id=job.client_id())
                async with contextlib.aclosing(cast(AsyncGenerator[Piece, None], native)) as pieces:
                    async for piece in pieces:
                        yield piece
                        if piece.finish_reason and span is not None:
                            span.set_attributes({"prompt_tokens": piece.prompt_tokens, "cached": piece.cached,
                                                 "completion_tokens": piece.completion_tokens})
        finally:
            self.core.active_sessions -= 1

    async def whole(self, job: Job, final: bool | None) -> pb.ModelInferResponse:
        texts: list[str] = []
        last: Piece | None = None
        async for piece in self.pieces(job):
            texts.append(piece.text)
            last = piece
        return job.text("".join(texts), last, final)

    async def embed(self, job: Job, final: bool | None) -> pb.ModelInferResponse:
        vectors, tokens = await infer(self.fleet, job.native, job.client_id())
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
            return await (self.embed(job, None) if job.task == "embed" else self.whole(job, None))

    async def answer(self, request: Any, context: Any) -> AsyncGenerator[pb.ModelInferResponse, None]:
        """One stream request's responses (Triton's decoupled convention)."""
        with triton_errors():
            job = self.job(request, context, "ModelStreamInfer")
            if job.task == "embed" or not job.stream:
                response = await (self.embed(job, not job.empty_final) if job.task == "embed"
                                  else self.whole(job, not job.empty_final))
                yield response
            else:
                async for piece in self.pieces(job):
                    last = bool(piece.finish_reason)
                    yield job.text(piece.text, piece if last else None, last and not job.empty_final)
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
