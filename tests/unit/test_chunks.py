from __future__ import annotations

import pytest

from shardline.chunks import decode_chunk, encode_chunk
from shardline.v1 import parameters_pb2


@pytest.mark.parametrize("data", [b"", b"x", bytes(range(256)) * 700])
def test_chunk_codec_agrees_with_protobuf(data):
    wire = encode_chunk("model.layers.3.mlp.up_proj.weight", 4096, 2**33, data)
    assert parameters_pb2.TensorChunk.FromString(wire) == parameters_pb2.TensorChunk(
        name="model.layers.3.mlp.up_proj.weight", offset_bytes=4096, total_size_bytes=2**33, data=data)
    proto_wire = parameters_pb2.TensorChunk(name="é", offset_bytes=0, total_size_bytes=len(data),
                                            data=data).SerializeToString()
    chunk = decode_chunk(proto_wire)
    assert (chunk.name, chunk.offset_bytes, chunk.total_size_bytes, bytes(chunk.data)) == ("é", 0, len(data), data)


def test_truncated_chunk_is_refused():
    wire = encode_chunk("t", 0, 10, b"0123456789")
    with pytest.raises(ValueError, match="truncated"):
        decode_chunk(wire[:-3])
