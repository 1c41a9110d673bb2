"""Forward's zero-copy wire (shardline/tensor_wire.py) on real workers: hidden states big enough for the
zero-copy path give the same results as protobuf's own encoding, bad tensors are refused per step with
INVALID_ARGUMENT naming the field, and bytes that do not frame end the call with INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from shardline.codec import decode_tensor, encode_tensor, from_numpy, tensor_field_bytes, to_numpy
from shardline.server import CHANNEL_OPTIONS
from shardline.stream import HIDDEN_FIELD
from shardline.tensor_wire import Beside
from shardline.v1 import tensor_pb2, worker_pb2
from tests.helpers import Chain, error_of, load, seq, worker_stub

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
ROWS = 300  # x 64 float32 = 76.8 KB: above the parser's 64 KB threshold
SETTINGS = {"prefill_chunk_tokens": 512, "max_step_tokens": 1024}


@pytest.fixture()
def split(workers, parameters):
    """tiny-llama whole on one worker, and as [0, 3) + [3, 6) on two more."""
    whole, first, second = workers(3)
    load(whole.address, "tiny-llama", 0, 6, parameters.address, **SETTINGS)
    load(first.address, "tiny-llama", 0, 3, parameters.address, **SETTINGS)
    load(second.address, "tiny-llama", 3, 6, parameters.address, **SETTINGS)
    return whole, first, second


def hidden_of(response: worker_pb2.ForwardResponse) -> np.ndarray:
    assert not response.HasField("error") and not response.sequence_errors, error_of(response).message
    return to_numpy(decode_tensor(response.tensor))


def send_raw(address: str, messages: list[bytes]) -> list[worker_pb2.ForwardResponse]:
    """Bytes as they are on a Forward stream (the stub's serializer bypassed)."""
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    forward = channel.stream_stream("/shardline.v1.ShardWorker/Forward", request_serializer=lambda b: b,
                                    response_deserializer=worker_pb2.ForwardResponse.FromString)
    try:
        return sorted(forward(iter(messages), timeout=60), key=lambda r: r.step_id)
    finally:
        channel.close()


def test_hidden_states_through_a_chain_equal_the_whole_model(split):
    """Stage 0 sends 76.8 KB of hidden states on its StageStream (tensor beside the message), stage 1 parses
    them in place and answers its hidden states beside its response: the same as one worker with every layer."""
    whole, first, second = split
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, 128, ROWS)]
    sequences = [seq("a", 0, 120), seq("b", 0, ROWS - 120)]
    together = hidden_of(Chain([whole.address]).step(sequences, tokens, worker_pb2.OUTPUT_KIND_HIDDEN))
    chained = hidden_of(Chain([first.address, second.address]).step(sequences, tokens,
                                                                    worker_pb2.OUTPUT_KIND_HIDDEN))
    assert together.shape == (ROWS, 64)
    np.testing.assert_allclose(chained, together, rtol=0, atol=1e-5)


def test_zero_copy_and_protobuf_encodings_give_the_same_answer(split):
    _, _, second = split
    hidden = from_numpy(np.random.default_rng(1).standard_normal((ROWS, 64)).astype(np.float32))

    def request(step_id: int, session: str) -> worker_pb2.ForwardRequest:
        return worker_pb2.ForwardRequest(step_id=step_id, start_layer=3, output=worker_pb2.OUTPUT_KIND_LOGITS,
                                         sequences=[seq(session, 0, 150), seq(session + "2", 0, ROWS - 150)])

    protobufs = request(1, "p")
    protobufs.hidden.CopyFrom(encode_tensor(hidden))
    tensor_last = request(2, "q").SerializeToString() + tensor_field_bytes(HIDDEN_FIELD, hidden)
    responses = send_raw(second.address, [protobufs.SerializeToString(), tensor_last,
                                          Beside(request(3, "r"), HIDDEN_FIELD, hidden).serialize()])
    logits = [hidden_of(r) for r in responses]
    assert logits[0].shape == (ROWS, 128)
    assert np.array_equal(logits[0], logits[1]) and np.array_equal(logits[0], logits[2])


@pytest.mark.parametrize("tensor, field_text", [
    (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[ROWS, 64], data=bytes(ROWS * 256 - 4)),
     "hidden.data is 76796 bytes"),
    (tensor_pb2.Tensor(dtype=77, shape=[ROWS, 64], data=bytes(ROWS * 256)), "dtype 77 is not a known"),
    (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[ROWS, 65], data=bytes(ROWS * 260)), "hidden.shape"),
])
def test_a_bad_big_tensor_is_refused_and_the_stream_goes_on(split, tensor, field_text):
    _, _, second = split
    bad = worker_pb2.ForwardRequest(step_id=1, start_layer=3, sequences=[seq("bad", 0, ROWS)], hidden=tensor)
    good = Beside(worker_pb2.ForwardRequest(step_id=2, start_layer=3, sequences=[seq("good", 0, ROWS)]),
                  HIDDEN_FIELD, from_numpy(np.zeros((ROWS, 64), np.float32)))
    responses = send_raw(second.address, [bad.SerializeToString(), good.serialize()])
    assert responses[0].error.code == INVALID and field_text in responses[0].error.message
    assert not responses[1].HasField("error") and len(responses[1].token_ids) == 1


@pytest.mark.parametrize("cut", [1, 1000, ROWS * 256])
def test_a_truncated_big_message_is_invalid_argument(split, cut):
    _, _, second = split
    wire = Beside(worker_pb2.ForwardRequest(step_id=1, start_layer=3, sequences=[seq("t", 0, ROWS)]),
                  HIDDEN_FIELD, from_numpy(np.zeros((ROWS, 64), np.float32))).serialize()
    with pytest.raises(grpc.RpcError) as info:
        send_raw(second.address, [wire[:-cut]])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ForwardRequest" in info.value.details()
    # the worker serves on
    assert worker_stub(second.address).GetStatus(worker_pb2.GetStatusRequest(), timeout=10).start_layer == 3
