"""Tensors on the wire: `shardline.v1.Tensor` <-> RawTensor (dtype name, shape, bytes) <-> numpy.

Row-major, little-endian, no padding; bf16 travels as raw 2-byte values. No torch here: the server side
turns RawTensor into torch tensors itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import numpy as np

from shardline.errors import InvalidArgument
from shardline.v1 import tensor_pb2

# dtype name -> (wire enum, bytes per element, safetensors name)
DTYPES: dict[str, tuple[int, int, str]] = {
    "float32": (tensor_pb2.DTYPE_FLOAT32, 4, "F32"),
    "float16": (tensor_pb2.DTYPE_FLOAT16, 2, "F16"),
    "bfloat16": (tensor_pb2.DTYPE_BFLOAT16, 2, "BF16"),
    "int64": (tensor_pb2.DTYPE_INT64, 8, "I64"),
    "int32": (tensor_pb2.DTYPE_INT32, 4, "I32"),
    "uint8": (tensor_pb2.DTYPE_UINT8, 1, "U8"),
    "int8": (tensor_pb2.DTYPE_INT8, 1, "I8"),
}
_BY_ENUM = {enum: name for name, (enum, _, _) in DTYPES.items()}
_BY_SAFETENSORS = {st: name for name, (_, _, st) in DTYPES.items()}
_NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
          "uint8": np.uint8, "int8": np.int8}


def itemsize(dtype: str) -> int:
    return DTYPES[dtype][1]


def dtype_from_enum(value: int) -> str:
    if value not in _BY_ENUM:
        raise InvalidArgument(f"dtype {value} is not a known shardline.v1.DType")
    return _BY_ENUM[value]


def dtype_to_enum(dtype: str) -> tensor_pb2.DType:
    return cast(tensor_pb2.DType, DTYPES[dtype][0])


def dtype_from_safetensors(name: str) -> str:
    if name not in _BY_SAFETENSORS:
        raise InvalidArgument(f"safetensors dtype {name!r} is not supported (supported: {sorted(_BY_SAFETENSORS)})")
    return _BY_SAFETENSORS[name]


def safetensors_name(dtype: str) -> str:
    return DTYPES[dtype][2]


@dataclass(frozen=True)
class RawTensor:
    """A tensor as bytes: what travels, before any framework sees it."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview  # a memoryview: a view into received bytes (shardline/tensor_wire.py), no copy

    @property
    def nbytes(self) -> int:
        return len(self.data)


def decode_tensor(msg: tensor_pb2.Tensor, field: str = "tensor", payload: bytes | memoryview | None = None,
                  ) -> RawTensor:
    """Validate and unpack a wire tensor; errors name `field`. `payload`: its data when it was received beside
    the message (shardline/tensor_wire.py), else `msg.data` is read."""
    if msg.dtype == tensor_pb2.DTYPE_UNSPECIFIED:
        raise InvalidArgument(f"{field}.dtype is unspecified")
    dtype = dtype_from_enum(msg.dtype)
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape {list(shape)} has a negative dimension")
    expected = math.prod(shape) * itemsize(dtype)
    data = msg.data if payload is None else payload  # each .data access copies the bytes: read it once
    if len(data) != expected:
        raise InvalidArgument(
            f"{field}.data is {len(data)} bytes but dtype {dtype} and shape {list(shape)} need {expected}")
    return RawTensor(dtype, shape, data)


def fill_tensor(target: tensor_pb2.Tensor, raw: RawTensor) -> None:
    """Set a message's Tensor field in place (passing a Tensor to a constructor deep-copies it: slow)."""
    target.dtype = dtype_to_enum(raw.dtype)
    target.shape[:] = raw.shape
    target.data = raw.data if isinstance(raw.data, bytes) else bytes(raw.data)


def encode_tensor(raw: RawTensor) -> tensor_pb2.Tensor:
    msg = tensor_pb2.Tensor()
    fill_tensor(msg, raw)
    return msg


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tensor_field_bytes(field_number: int, raw: RawTensor) -> bytes:
    """The wire bytes of a Tensor submessage field, built with one copy of the payload.

    Appended to a serialized message that lacks the field, they give the same message as setting it
    (protobuf's wire format allows fields in any order): large tensors skip protobuf's serializer, which
    copies them more than once.
    """
    return b"".join(tensor_field_parts(field_number, raw))


def tensor_field_parts(field_number: int, raw: RawTensor) -> list[bytes | memoryview]:
    """tensor_field_bytes in pieces, the payload not copied: join them with the rest of a message's bytes."""
    head = tensor_pb2.Tensor(dtype=dtype_to_enum(raw.dtype), shape=list(raw.shape)).SerializeToString()
    data_key = _varint(3 << 3 | 2)  # Tensor.data = 3, length-delimited
    data_len = _varint(len(raw.data))
    body = len(head) + len(data_key) + len(data_len) + len(raw.data)
    return [_varint(field_number << 3 | 2), _varint(body), head, data_key, data_len, raw.data]


def to_numpy(raw: RawTensor) -> np.ndarray:
    """A read-only numpy view (bf16 is widened to float32, as numpy has no bf16)."""
    if raw.dtype == "bfloat16":
        halves = np.frombuffer(raw.data, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(raw.shape)
    return np.frombuffer(raw.data, dtype=np.dtype(_NUMPY[raw.dtype]).newbyteorder("<")).reshape(raw.shape)


def from_numpy(array: np.ndarray) -> RawTensor:
    name = array.dtype.name
    if name not in _NUMPY:
        raise InvalidArgument(f"numpy dtype {name} is not supported (supported: {sorted(_NUMPY)})")
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return RawTensor(name, tuple(array.shape), little.tobytes())
