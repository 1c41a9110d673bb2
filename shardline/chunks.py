"""The bulk path of the parameter service: `shardline.v1.TensorChunk` on the wire without protobuf's copies.

Protobuf's Python runtime copies a bytes field into the message, again when serializing and twice more when
parsing and reading it back; for weights that is most of the cost. These functions write and read the same
wire format (a test checks them against protobuf's own) with one copy to send and none to receive: the
chunk's data comes back as a memoryview into the received message.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardline.codec import _varint
from shardline.tensor_wire import read_varint, skip_field
from shardline.v1 import parameters_pb2

_FIELDS = parameters_pb2.TensorChunk.DESCRIPTOR.fields_by_name
_NAME, _OFFSET, _TOTAL, _DATA = (_FIELDS[n].number for n in ("name", "offset_bytes", "total_size_bytes", "data"))


@dataclass(frozen=True)
class Chunk:
    name: str
    offset_bytes: int
    total_size_bytes: int
    data: memoryview


def encode_chunk(name: str, offset_bytes: int, total_size_bytes: int, data: bytes | memoryview) -> bytes:
    head = parameters_pb2.TensorChunk(name=name, offset_bytes=offset_bytes,
                                      total_size_bytes=total_size_bytes).SerializeToString()
    return b"".join([head, _varint(_DATA << 3 | 2), _varint(len(data)), data])


def serialize_response(message: bytes | parameters_pb2.TensorChunk) -> bytes:
    """Response serializer for FetchTensors: pre-encoded chunks pass through as they are."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def decode_chunk(message: bytes) -> Chunk:
    """Parse a TensorChunk; `data` is a view into `message`, not a copy. Unknown fields are skipped."""
    buf = memoryview(message)
    name, offset, total, data = "", 0, 0, buf[0:0]
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0 and number in (_OFFSET, _TOTAL):
            value, pos = read_varint(buf, pos)
            if number == _OFFSET:
                offset = value
            else:
                total = value
        elif wire_type == 2 and number in (_NAME, _DATA):
            end = skip_field(buf, pos, wire_type)
            value_start = read_varint(buf, pos)[1]
            if number == _NAME:
                name = bytes(buf[value_start:end]).decode()
            else:
                data = buf[value_start:end]
            pos = end
        else:
            pos = skip_field(buf, pos, wire_type)
    return Chunk(name, offset, total, data)
