"""shardline/tensor_wire.py against protobuf's own parser: the same message (and the same accept / reject
decision) for well-formed, reordered, duplicated, truncated and mutated bytes."""

from __future__ import annotations

import random

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from shardline.codec import encode_tensor, from_numpy, tensor_field_bytes, to_numpy
from shardline.errors import InvalidArgument
from shardline.tensor_wire import Beside, Parsed, TensorParser
from shardline.v1 import tensor_pb2, worker_pb2

PARSER = TensorParser(worker_pb2.ForwardRequest, "hidden", min_bytes=0)  # always the zero-copy walk
HIDDEN = worker_pb2.ForwardRequest.DESCRIPTOR.fields_by_name["hidden"].number


def head() -> worker_pb2.ForwardRequest:
    return worker_pb2.ForwardRequest(step_id=9, start_layer=4, route=["a:1", "b:2"], timeout_ms=70,
                                     sequences=[worker_pb2.SequenceSlice(session_id="s", num_tokens=3)])


def raw(rows: int = 3, cols: int = 5):
    return from_numpy(np.random.default_rng(rows).standard_normal((rows, cols)).astype(np.float32))


def whole(parsed: Parsed[worker_pb2.ForwardRequest]) -> worker_pb2.ForwardRequest:
    """The message as protobuf would have it: the payload put back into its field."""
    message = worker_pb2.ForwardRequest()
    message.CopyFrom(parsed.message)
    if parsed.data is not None:
        assert parsed.message.hidden.data == b"", "the payload is beside the message, not in it"
        message.hidden.data = bytes(parsed.data)
    return message


def outcome(parse, wire: bytes):
    try:
        return ("ok", parse(wire))
    except (DecodeError, ValueError, RuntimeError) as exc:  # upb raises DecodeError; both mean "does not parse"
        return ("error", type(exc).__name__)


def agree(wire: bytes) -> None:
    ours = outcome(lambda w: whole(PARSER.parse(w)), wire)
    theirs = outcome(worker_pb2.ForwardRequest.FromString, wire)
    assert ours[0] == theirs[0], (ours, theirs)
    if ours[0] == "ok":
        assert ours[1] == theirs[1]


def test_beside_serializes_to_the_message_with_the_field_set_and_parses_back_without_a_copy():
    tensor = raw(40, 64)
    wire = Beside(head(), HIDDEN, tensor).serialize()
    expected = head()
    expected.hidden.CopyFrom(encode_tensor(tensor))
    assert worker_pb2.ForwardRequest.FromString(wire) == expected
    parsed = PARSER.parse(wire)
    assert isinstance(parsed.data, memoryview) and parsed.data.obj is wire  # a view into the received bytes
    assert whole(parsed) == expected
    assert np.array_equal(to_numpy(parsed.tensor("hidden")), to_numpy(tensor))


@pytest.mark.parametrize("make", [
    lambda: Beside(head(), HIDDEN, raw()).serialize(),                                 # tensor first (ours)
    lambda: head().SerializeToString() + tensor_field_bytes(HIDDEN, raw()),            # tensor last
    lambda: worker_pb2.ForwardRequest(step_id=1, hidden=encode_tensor(raw())).SerializeToString(),  # protobuf's
    lambda: head().SerializeToString(),                                                # no tensor
    lambda: worker_pb2.ForwardRequest(hidden=tensor_pb2.Tensor(dtype=1, shape=[0, 5])).SerializeToString(),  # empty
    lambda: tensor_field_bytes(HIDDEN, raw()) + tensor_field_bytes(HIDDEN, raw(2, 4)),  # twice: protobuf merges
    lambda: tensor_field_bytes(HIDDEN, raw()) + b"\xea\x02\x03abc" + b"\xf8\x02\x07",    # unknown fields 45, 47
    lambda: b"\x22\x0b\x08\x01\x1a\x02ab\x1a\x03xyz",                                  # data twice in the tensor
    lambda: b"\x22\x00",                                                               # an empty tensor message
    lambda: b"\x20\x05" + tensor_field_bytes(HIDDEN, raw()),                           # field 4 as a varint first
    lambda: b"\x0b\x0c" + tensor_field_bytes(HIDDEN, raw()),                           # a group (not walked here)
])
def test_same_message_as_protobuf(make):
    agree(make())


def test_new_fields_beside_the_tensor_still_parse():
    """Fields numbered after the hidden tensor (another tensor, new scalars) keep working."""
    message = head()
    message.hidden_scale.CopyFrom(encode_tensor(from_numpy(np.ones(3, np.float32))))
    wire = Beside(message, HIDDEN, raw()).serialize()
    parsed = PARSER.parse(wire)
    assert parsed.message.hidden_scale == message.hidden_scale
    agree(wire)


def test_every_truncation_and_random_mutation_agrees_with_protobuf():
    wire = Beside(head(), HIDDEN, raw(4, 8)).serialize()
    for cut in range(len(wire)):
        agree(wire[:cut])
    rng = random.Random(0)
    for _ in range(3000):
        mutated = bytearray(wire)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        agree(bytes(mutated))


def test_truncated_payload_does_not_parse():
    wire = Beside(head(), HIDDEN, raw(100, 100)).serialize()
    with pytest.raises((DecodeError, ValueError)):
        PARSER.parse(wire[:-1000])
    with pytest.raises((DecodeError, ValueError)):
        TensorParser(worker_pb2.ForwardRequest, "hidden").parse(wire[:-1000])  # the default threshold


@pytest.mark.parametrize("tensor, field_text", [
    (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3, 5], data=bytes(59)), "hidden.data is 59 bytes"),
    (tensor_pb2.Tensor(dtype=77, shape=[3, 5], data=bytes(60)), "dtype 77 is not a known"),
    (tensor_pb2.Tensor(shape=[3, 5], data=bytes(60)), "hidden.dtype is unspecified"),
    (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3, -5], data=bytes(60)), "negative dimension"),
])
def test_tensor_beside_is_validated(tensor, field_text):
    wire = worker_pb2.ForwardRequest(hidden=tensor).SerializeToString()
    parsed = PARSER.parse(wire)
    assert parsed.data is not None
    with pytest.raises(InvalidArgument, match=field_text):
        parsed.tensor("hidden")


def test_small_messages_take_protobufs_parse():
    wire = Beside(head(), HIDDEN, raw()).serialize()
    parsed = TensorParser(worker_pb2.ForwardRequest, "hidden").parse(wire)
    assert parsed.data is None and parsed.message.hidden.data  # below 64 KB: in the message
    assert np.array_equal(to_numpy(parsed.tensor("hidden")), to_numpy(raw()))
