"""The one table between protos and domain values (coordinator/wire.py): every value of each side maps, and
a request comes through whole."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.serving.constraints import GrammarKind, Structure
from coordinator.serving.embedding import Pooling
from coordinator.serving.generation import FinishReason, GenerationRequest, Turn
from coordinator.serving.tools import Tool, ToolCall
from coordinator.wire import FINISH, POOLING, embed_request, generation_request
from shardline.codec import encode_tensor, from_numpy
from shardline.errors import InvalidArgument
from shardline.v1 import coordinator_pb2


def test_every_finish_reason_has_its_proto_value_and_no_two_share_one():
    assert set(FINISH) == set(FinishReason)
    assert sorted(FINISH.values()) == sorted(coordinator_pb2.FinishReason.values())


def test_every_proto_pooling_maps_and_every_pooling_is_reachable():
    assert set(POOLING) == set(coordinator_pb2.Pooling.values())
    assert set(POOLING.values()) == set(Pooling)


def test_a_generate_request_comes_through_whole():
    proto = coordinator_pb2.GenerateRequest(model="m@2", prompt="hi", max_tokens=7, temperature=0.5, top_k=3,
                                            top_p=0.25, seed=11, stop=["x"], min_tokens=2, ignore_eos=True,
                                            prompt_token_ids=[1, 2])
    proto.messages.add(role="user", content="yo")
    proto.messages.add(role="assistant", tool_calls=[coordinator_pb2.ToolCall(id="c1", name="f", arguments="{}")])
    proto.messages.add(role="tool", content="42", tool_call_id="c1")
    proto.tools.add(name="f", description="d", parameters='{"type": "object"}')
    proto.tool_choice = "f"
    proto.logprobs, proto.prompt_logprobs, proto.repetition_penalty = 3, 0, 1.5
    proto.logit_bias[7] = -1.0
    proto.frequency_penalty, proto.presence_penalty, proto.min_p = 0.5, 0.25, 0.125
    proto.regex = "[ab]+"
    assert generation_request(proto) == GenerationRequest(
        model="m@2", prompt="hi", max_tokens=7, temperature=0.5, top_k=3, top_p=0.25,
        messages=(Turn("user", "yo"), Turn("assistant", "", (ToolCall("c1", "f", "{}"),)),
                  Turn("tool", "42", (), "c1")),
        seed=11, stop=("x",), min_tokens=2, ignore_eos=True, prompt_ids=(1, 2), logprobs=3, prompt_logprobs=0,
        repetition_penalty=1.5, logit_bias=((7, -1.0),), frequency_penalty=0.5, presence_penalty=0.25, min_p=0.125,
        structure=Structure(GrammarKind.REGEX, "[ab]+"), tools=(Tool("f", "d", '{"type": "object"}'),),
        tool_choice="f")
    with pytest.raises(InvalidArgument, match="at most one of json_schema, json_object, regex and grammar"):
        generation_request(coordinator_pb2.GenerateRequest(regex="a", json_object=True))
    unset = generation_request(coordinator_pb2.GenerateRequest())
    assert (unset.max_tokens, unset.temperature, unset.top_p, unset.seed) == (None, None, None, None)


def test_an_infer_request_comes_through_and_bad_ones_name_their_field():
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    proto = coordinator_pb2.InferRequest(model="e", input_ids=encode_tensor(from_numpy(ids)), normalize=False,
                                         pooling=coordinator_pb2.POOLING_CLS)
    req = embed_request(proto)
    assert (req.model, req.batch, req.pooling, req.normalize, req.texts) == ("e", 1, Pooling.CLS, False, ())
    assert embed_request(coordinator_pb2.InferRequest(texts=["a", "b"])).normalize is True
    with pytest.raises(InvalidArgument, match="not both"):
        embed_request(coordinator_pb2.InferRequest(texts=["a"], input_ids=proto.input_ids))
    with pytest.raises(InvalidArgument, match="pooling 9"):
        embed_request(coordinator_pb2.InferRequest(texts=["a"], pooling=9))  # type: ignore[arg-type]
    bad = coordinator_pb2.InferRequest(input_ids=encode_tensor(from_numpy(ids)))
    bad.input_ids.data = b"\0"
    with pytest.raises(InvalidArgument, match="input_ids.data"):
        embed_request(bad)
