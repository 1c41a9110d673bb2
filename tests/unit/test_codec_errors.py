from __future__ import annotations

import grpc
import numpy as np
import pytest

from shardline.codec import decode_tensor, encode_tensor, from_numpy, to_numpy
from shardline.errors import DataLoss, InvalidArgument, NotFound, error_for_code, status_of
from shardline.v1 import tensor_pb2


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.int32, np.uint8])
def test_tensor_round_trip(dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    back = to_numpy(decode_tensor(encode_tensor(from_numpy(array))))
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_bfloat16_bytes_widen_to_float32():
    values = np.array([1.0, -2.5, 0.15625], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_BFLOAT16, shape=[3], data=bf16)
    assert np.array_equal(to_numpy(decode_tensor(msg)), values)


@pytest.mark.parametrize("msg, words", [
    (tensor_pb2.Tensor(shape=[2]), "dtype is unspecified"),
    (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20), "need 24"),
    (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[-1], data=b""), "negative"),
    (tensor_pb2.Tensor(dtype=77, shape=[1], data=b"\0"), "not a known"),
])
def test_bad_tensor_names_the_field(msg, words):
    with pytest.raises(InvalidArgument, match=words) as err:
        decode_tensor(msg, "hidden")
    assert "hidden" in str(err.value) or "77" in str(err.value)


def test_error_table_both_ways():
    for exc in (InvalidArgument("x"), NotFound("y"), DataLoss("z")):
        code, message = status_of(exc)
        assert type(error_for_code(code, message)) is type(exc)
    code, message = status_of(RuntimeError("secret detail"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message


def test_appended_tensor_field_parses_as_the_message_with_the_field_set():
    from shardline.codec import tensor_field_bytes
    from shardline.v1 import worker_pb2

    raw = from_numpy(np.arange(3000, dtype=np.float32).reshape(1000, 3))
    head = worker_pb2.ForwardRequest(step_id=9, start_layer=4, route=["a:1"], token_ids=[])
    wire = head.SerializeToString() + tensor_field_bytes(4, raw)
    parsed = worker_pb2.ForwardRequest.FromString(wire)
    expected = worker_pb2.ForwardRequest(step_id=9, start_layer=4, route=["a:1"], hidden=encode_tensor(raw))
    assert parsed == expected
    assert np.array_equal(to_numpy(decode_tensor(parsed.hidden)), to_numpy(raw))
