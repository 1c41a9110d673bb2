"""The bulk path of the parameter service: `shardline.v1.TensorChunk` on the wire without protobuf's copies.

Protobuf's Python runtime copies a bytes field into the message, again when serializing and twice more when
parsing and reading it back; for weights that is most of the cost. These functions write and read the same
wire format (a test checks them against protobuf's own) with one copy to send and none to receive: the
chunk's data comes back as a memoryview into the received message.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardline.codec import _varint
from shardline.v1 import parameters_pb2

_FIELDS = parameters_pb2.TensorChunk.DESCRIPTOR.fields_by_name
_NAME, _OFFSET, _TOTAL, _DATA = (_FIELDS[n].number for n in ("name", "offset_bytes", "total_size_bytes", "data"))


@dataclass(frozen=True)
class Chunk:
    name: str
    offset_bytes: int
    total_size_bytes: int
    data: memoryview


def encode_chunk(name: str, offset_bytes: int, total_size_bytes: int, data: bytes) -> bytes:
    head = parameters_pb2.TensorChunk(name=name, offset_bytes=offset_bytes,
                                      total_size_bytes=total_size_bytes).SerializeToString()
    return b"".join([head, _varint(_DATA << 3 | 2), _varint(len(data)), data])


def serialize_response(message: bytes | parameters_pb2.TensorChunk) -> bytes:
    """Response serializer for FetchTensors: pre-encoded chunks pass through as they are."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint in TensorChunk")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def decode_chunk(message: bytes) -> Chunk:
    """Parse a TensorChunk; `data` is a view into `message`, not a copy. Unknown fields are skipped."""
    buf = memoryview(message)
    name, offset, total, data = "", 0, 0, buf[0:0]
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
            if number == _OFFSET:
                offset = value
            elif number == _TOTAL:
                total = value
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated field in TensorChunk")
            if number == _NAME:
                name = bytes(buf[pos: pos + length]).decode()
            elif number == _DATA:
                data = buf[pos: pos + length]
            pos += length
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type} in TensorChunk")
    return Chunk(name, offset, total, data)
