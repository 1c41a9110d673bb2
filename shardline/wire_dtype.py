"""Compressed activations: which dtypes hidden states may travel in between stages, and how a link's is chosen.

Each stage sends its hidden states to the next one in its *wire dtype* (LoadShard `wire_dtype`), converting at
the producer; the receiver accepts any of WIRE_DTYPES and converts to its own compute dtype. int8 travels with a
per-row float32 scale (ForwardRequest.hidden_scale): row i is `hidden[i] * scale[i]`, scale = max|row| / 127.

The wire dtype belongs to the link's producer, so it is fixed per link when the plan is loaded: the
coordinator's `wire_dtype` (every link) or `link_wire_dtypes` (link i = stage i -> stage i + 1). It is not
carried per step: a route that changes (failover, another replica) keeps each producer's choice, and a
receiver never needs to know in advance what it will be sent. Only hidden states between stages are
compressed: token ids go to the first stage as ids, and what the last stage answers (token ids, float32
logits, final hidden states) is never compressed, so sampling and scores see full precision.
"""

from __future__ import annotations

from shardline.codec import dtype_from_enum, dtype_to_enum
from shardline.errors import InvalidArgument
from shardline.v1 import tensor_pb2, worker_pb2

WIRE_DTYPES = ("float32", "float16", "bfloat16", "int8")
WIRE_PATTERN = "^(float32|float16|bfloat16|int8)$"
BYTES_PER_VALUE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def check_wire_dtype(name: str, field: str = "wire_dtype") -> str:
    """`name` if hidden states may travel in it; INVALID_ARGUMENT naming it and the choices otherwise."""
    if name not in WIRE_DTYPES:
        raise InvalidArgument(f"{field} {name} is not a wire dtype for hidden states (supported: "
                              f"{', '.join(WIRE_DTYPES)}; int8 travels with hidden_scale)")
    return name


def wire_dtype_from_enum(value: int, compute_dtype: str, field: str = "wire_dtype") -> str:
    """The wire dtype a LoadShard asks for: UNSPECIFIED = the compute dtype."""
    if value == tensor_pb2.DTYPE_UNSPECIFIED:
        return compute_dtype
    return check_wire_dtype(dtype_from_enum(value), field)


def wire_dtype_to_enum(name: str) -> tensor_pb2.DType:
    return dtype_to_enum(check_wire_dtype(name))


def quantization_enum(name: str) -> worker_pb2.WeightQuantization:
    """LoadShard's `quantize` for a config's "" (none) or "int8"."""
    if name not in ("", "int8"):
        raise InvalidArgument(f"quantize {name!r} is not a weight quantization (supported: int8)")
    return worker_pb2.WEIGHT_QUANTIZATION_INT8 if name else worker_pb2.WEIGHT_QUANTIZATION_NONE


def link_dtypes(stages: int, default: str, per_link: dict[int, str]) -> list[str]:
    """The wire dtype of each stage's outgoing link (the last stage's is unused: it answers the caller). Links
    beyond a chain (one narrowed by a failover) are ignored."""
    return [check_wire_dtype(per_link.get(i, default), f"link {i} wire dtype") for i in range(stages)]
