"""Messages with one big Tensor field, on the wire without protobuf's copies of the tensor's bytes.

Protobuf's Python runtime copies a bytes field when a message is built, again when it is serialized, and twice
more when one is parsed and its `.data` read; for a 16 MB hidden state that is most of a hop's cost.

- Sending: `Beside(message, field_number, tensor)` serializes the message without the tensor and joins the
  Tensor field's wire bytes to it: one copy of the payload (protobuf allows fields in any order). The tensor
  goes first, so that the receiver finds it without walking the other fields.
- Receiving: `TensorParser(MessageType, "field")` is a request or response deserializer. It cuts the field
  out of the bytes, parses everything else with protobuf (so every other field, new ones included, parses as
  usual), parses the Tensor's own small fields (dtype, shape, ...) into the message's field, and leaves its
  `data` empty: the payload is `Parsed.data`, a memoryview into the received bytes (no copy). Whatever this
  path does not expect (the field twice, a wire type it does not walk, bytes that do not frame) goes to
  protobuf's own parser instead, so the accept / reject decisions are always protobuf's: bytes that do not
  parse raise and become INVALID_ARGUMENT (shardline/malformed.py).

Validation of the tensor itself (dtype known, shape x itemsize == len(data)) stays in `decode_tensor`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from shardline.codec import RawTensor, decode_tensor, tensor_field_parts
from shardline.v1 import tensor_pb2

M = TypeVar("M", bound=Message)

_DATA = tensor_pb2.Tensor.DESCRIPTOR.fields_by_name["data"].number
LENGTH_DELIMITED = 2


def read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """(value, position after it); ValueError when the bytes end inside it or it runs past 10 bytes."""
    value = shift = 0
    end = min(len(buf), pos + 10)
    while pos < end:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated or overlong varint")


def skip_field(buf: memoryview, pos: int, wire_type: int) -> int:
    """The position after a field's value (its key already read); ValueError on a wire type not walked here
    (groups) or a value that runs past the end."""
    if wire_type == 0:
        return read_varint(buf, pos)[1]
    if wire_type == LENGTH_DELIMITED:
        length, pos = read_varint(buf, pos)
        end = pos + length
    elif wire_type == 1:
        end = pos + 8
    elif wire_type == 5:
        end = pos + 4
    else:
        raise ValueError(f"wire type {wire_type} is not walked here")
    if end > len(buf):
        raise ValueError("truncated: a field runs past the end of the message")
    return end


def find_field(buf: memoryview, number: int) -> tuple[int, int, int] | None:
    """The first length-delimited field `number` at the top level of `buf`: (start of its key, start of its
    value, end); None when absent. ValueError when the bytes before it do not frame."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = read_varint(buf, pos)
        if key >> 3 == number and key & 7 == LENGTH_DELIMITED:
            length, pos = read_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated: a field runs past the end of the message")
            return start, pos, pos + length
        pos = skip_field(buf, pos, key & 7)
    return None


@dataclass(frozen=True)
class Beside(Generic[M]):
    """A message and a tensor for one of its Tensor fields (left unset in `message`), kept apart until they
    go on the wire: `serialize` is a request or response serializer."""

    message: M
    field_number: int
    tensor: RawTensor | None = None

    def serialize(self) -> bytes:
        head = self.message.SerializeToString()
        if self.tensor is None:
            return head
        return b"".join([*tensor_field_parts(self.field_number, self.tensor), head])

    @property
    def nbytes(self) -> int:
        """About the size on the wire (the tensor's payload and the message's fields)."""
        return self.message.ByteSize() + (self.tensor.nbytes if self.tensor is not None else 0)


def serialize(message: Beside[Any] | Message) -> bytes:
    """A serializer for a method that sends either `Beside`s or plain messages."""
    return message.serialize() if isinstance(message, Beside) else message.SerializeToString()


@dataclass(frozen=True)
class Parsed(Generic[M]):
    """A received message and the payload of its tensor field. `data` is None when the payload stayed in
    the message (read `message.<field>.data`); else the field's `data` is empty and this holds it."""

    message: M
    data: memoryview | None = None

    def tensor(self, field: str) -> RawTensor:
        """The field's tensor, validated (INVALID_ARGUMENT naming `field` when it is not what it says)."""
        return decode_tensor(getattr(self.message, field), field, self.data)


class TensorParser(Generic[M]):
    """A deserializer for `message_type` that leaves `field`'s tensor payload in the received bytes."""

    def __init__(self, message_type: type[M], field: str, min_bytes: int = 64 * 1024) -> None:
        self.message_type = message_type
        self.min_bytes = min_bytes  # below this, protobuf's parse (in C) beats walking the fields in Python
        self.DESCRIPTOR = message_type.DESCRIPTOR  # malformed.py names the type after it
        self.field = field
        self.number = message_type.DESCRIPTOR.fields_by_name[field].number
        self._parse: Callable[[bytes], M] = message_type.FromString

    def parse(self, message: bytes) -> Parsed[M]:
        if len(message) < self.min_bytes:
            return Parsed(self._parse(message))
        buf = memoryview(message)
        try:
            span = find_field(buf, self.number)
        except ValueError:
            span = None  # protobuf decides (and names what is wrong)
        if span is None:
            return Parsed(self._parse(message))
        start, value, end = span
        rest = bytes(buf[end:]) if start == 0 else b"".join([buf[:start], buf[end:]])
        parsed = self._parse(rest)
        if parsed.HasField(self.field):  # the field came twice (protobuf merges them): its own parser
            return Parsed(self._parse(message))
        tensor = buf[value:end]
        try:
            data_span = _last_data(tensor)
        except ValueError:
            return Parsed(self._parse(message))
        target = getattr(parsed, self.field)
        if data_span is None:
            target.MergeFromString(tensor)
            target.SetInParent()
            return Parsed(parsed, tensor[0:0])
        d_start, d_value, d_end = data_span
        target.MergeFromString(b"".join([tensor[:d_start], tensor[d_end:]]))
        target.SetInParent()
        return Parsed(parsed, tensor[d_value:d_end])


def _last_data(tensor: memoryview) -> tuple[int, int, int] | None:
    """The span of a Tensor's data field (the last one wins, as in protobuf); ValueError when it has several
    (rare: left to protobuf) or does not frame."""
    found = None
    pos = 0
    while pos < len(tensor):
        start = pos
        key, pos = read_varint(tensor, pos)
        if key >> 3 == _DATA and key & 7 == LENGTH_DELIMITED:
            if found is not None:
                raise ValueError("data appears twice")
            length, pos = read_varint(tensor, pos)
            if pos + length > len(tensor):
                raise ValueError("truncated: data runs past the end of the tensor")
            found = (start, pos, pos + length)
            pos += length
        else:
            pos = skip_field(tensor, pos, key & 7)
    return found
