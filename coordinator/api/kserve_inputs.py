"""KServe v2 requests in: each input checked against the model's (name, datatype, shape, contents, typed or
raw), then turned into the core's own request (coordinator/serving: GenerationRequest, EmbedRequest). The
protocol as a client sees it, and the errors, are described in coordinator/api/kserve.py."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.serving.embedding import EmbedRequest, Pooling
from coordinator.serving.generation import MAX_MODEL_NAME_CHARS, GenerationRequest, shown
from shardline.errors import InvalidArgument

MAX_SAMPLING_JSON_BYTES = 64 * 1024


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
TEXT_OUTPUT, EMBEDDINGS, LOGPROBS_OUTPUT = "text_output", "embeddings", "logprobs"

# how the values of each datatype travel: their contents field, and a raw item (BYTES: length-prefixed)
CONTENTS = {"BYTES": "bytes_contents", "BOOL": "bool_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents"}
RAW: dict[str, np.dtype[Any]] = {"BOOL": np.dtype("u1"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
                                 "UINT64": np.dtype("<u8"), "FP32": np.dtype("<f4")}

# sampling fields: the input or JSON key, and the GenerateRequest field's kind (for messages and JSON types)
SAMPLING = {"max_tokens": "int32", "min_tokens": "int32", "temperature": "float", "top_p": "float",
            "top_k": "int32", "seed": "uint64", "stop": "strings", "ignore_eos": "bool"}
# sampling_parameters only, with the names vLLM's SamplingParams (and so Triton's vLLM backend) gives them
SCORING = {"logprobs": "int32", "repetition_penalty": "float", "frequency_penalty": "float",
           "presence_penalty": "float", "min_p": "float", "logit_bias": "bias"}
KINDS = {**SAMPLING, **SCORING}


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
        kind = KINDS.get(key)
        if kind is None:
            raise InvalidArgument(f"sampling_parameters: unknown key {shown(key)}; known: {', '.join(KINDS)}")
        if value is None:
            continue
        if kind == "strings" and isinstance(value, str):
            value = [value]
        ok = {"int32": isinstance(value, int) and not isinstance(value, bool),
              "uint64": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, int | float) and not isinstance(value, bool),
              "bool": isinstance(value, bool),
              "strings": isinstance(value, list) and all(isinstance(s, str) for s in value),
              "bias": isinstance(value, dict) and all(_is_id(k) and isinstance(b, int | float)
                                                      and not isinstance(b, bool) and -1e9 < b < 1e9
                                                      for k, b in value.items())}[kind]
        if not ok:
            expected = {"int32": "an integer", "uint64": "an integer", "float": "a number", "bool": "true or false",
                        "strings": "a string or a list of strings",
                        "bias": 'an object of token id -> bias ({"50256": -100})'}[kind]
            raise InvalidArgument(f"sampling_parameters.{key} must be {expected}, got {shown(json.dumps(value))}")
        out[key] = value
    return out


# the native fields' bounds: a KServe value must fit as it would in the native GenerateRequest
BOUNDS = {"int32": (-2**31, 2**31 - 1), "uint64": (0, 2**64 - 1)}


def _is_id(key: str) -> bool:
    return re.fullmatch(r"-?[0-9]{1,19}", key) is not None and -2**63 <= int(key) < 2**63


def fitted(key: str, value: Any) -> Any:
    """`value` as the native request's field would hold it: an integer within its bounds, a float rounded to
    float32 (the native field's type; overflowing to infinity, which the core refuses)."""
    kind = KINDS[key]
    if kind == "bias":
        with np.errstate(over="ignore"):  # a bias past float32 is infinite, which the core refuses
            return tuple(sorted((int(k), float(np.float32(b))) for k, b in value.items()))
    if kind in BOUNDS:
        low, high = BOUNDS[kind]
        if not low <= value <= high:
            raise InvalidArgument(f"{key} {shown(str(value))} does not fit its field ({kind})")
        return int(value)
    try:
        if kind == "float":
            with np.errstate(over="ignore"):
                return float(np.float32(value))
        if kind == "strings":  # JSON may carry a lone surrogate, which no protobuf string (nor UTF-8) holds
            for text in value:
                text.encode("utf-8")
    except (OverflowError, UnicodeEncodeError):
        raise InvalidArgument(f"{key} {shown(str(value))} does not fit its field ({kind})") from None
    return value


def generate_request(model: str, inputs: dict[str, Tensor]) -> GenerationRequest:
    """The core's request for a generation; its values are checked by the core, as the native API's."""
    text = inputs.get("text_input")
    if text is None:
        raise InvalidArgument(f"input 'text_input' is missing: model {model!r} needs the prompt (BYTES, shape [1])")
    fields: dict[str, Any] = {k: inputs[k].values[0] for k in SAMPLING if k in inputs and k != "stop"}
    if "stop" in inputs:
        fields["stop"] = inputs["stop"].texts()
    if "sampling_parameters" in inputs:
        for key, value in sampling_json(inputs["sampling_parameters"]).items():
            if key in fields:
                raise InvalidArgument(f"{key} is given both as an input and in sampling_parameters")
            fields[key] = value
    values = {key: fitted(key, value) for key, value in fields.items()}
    return GenerationRequest(model=model, prompt=text.texts()[0], stop=tuple(values.pop("stop", ())),
                             top_k=values.pop("top_k", 0), min_tokens=values.pop("min_tokens", 0),
                             ignore_eos=bool(values.pop("ignore_eos", False)), **values)


def infer_request(model: str, inputs: dict[str, Tensor]) -> EmbedRequest:
    text = inputs.get("text_input")
    if text is None:
        raise InvalidArgument(f"input 'text_input' is missing: model {model!r} needs the texts to embed (BYTES, "
                              "shape [-1])")
    pooling = Pooling.MEAN
    if "pooling" in inputs:
        named = inputs["pooling"].texts()[0]
        if named not in {p.value for p in Pooling}:
            raise InvalidArgument(f"input 'pooling' is {shown(named)}; it is one of {', '.join(Pooling)}")
        pooling = Pooling(named)
    return EmbedRequest(model=model, texts=tuple(text.texts()), pooling=pooling,
                        normalize=bool(inputs["normalize"].values[0]) if "normalize" in inputs else True,
                        # a text over the model's positions: cut to them, instead of INVALID_ARGUMENT
                        truncate=bool(inputs["truncate"].values[0]) if "truncate" in inputs else False)


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
