"""Generation requests are checked before the tokenizer or any worker: limits, sampling values, min_tokens."""

from __future__ import annotations

import struct
import time

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.serving.generation import GenerationRequest, check_parameters
from shardline.errors import InvalidArgument


def f32(x: float) -> float:
    """x as the proto's float field carries it."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


@pytest.fixture()
def config(tmp_path):
    return CoordinatorConfig(store=tmp_path)


def refused(config, **fields) -> str:
    with pytest.raises(InvalidArgument) as err:
        check_parameters(GenerationRequest(**{"prompt": "Hello", **fields}), config)
    return err.value.message


def test_the_defaults_pass(config):
    check_parameters(GenerationRequest(prompt="Hello", stop=("\n",) * 16, max_tokens=16, min_tokens=16), config)


@pytest.mark.parametrize("fields, message", [
    (dict(stop=("x" * 100_000,)), "stop[0] is 100000 bytes; the limit is 256 (max_stop_bytes)"),
    (dict(stop=("ok", "é" * 200)), "stop[1] is 400 bytes; the limit is 256 (max_stop_bytes)"),
    (dict(stop=("s",) * 17), "stop holds 17 sequences; the limit is 16 (max_stop_sequences)"),
    (dict(stop=("",)), "stop[0] is empty"),
    (dict(prompt="x" * 300_000), "prompt is 300000 bytes; the limit is 262144 (max_prompt_bytes)"),
    (dict(prompt="", messages=(("user", "hi"),) * 257), "the limit is 256 (max_chat_messages)"),
    (dict(prompt="", messages=(("user", "x" * 200_000),) * 2), "262144 (max_prompt_bytes)"),
    (dict(prompt="", messages=(("r" * 10_000, "hi"),)), "messages[0].role 'rrrr"),
    (dict(model="m" * 10_000), "model is 10000 characters"),
    (dict(max_tokens=0), "max_tokens must be between 1 and 2048 (max_tokens_limit)"),
    (dict(max_tokens=8, min_tokens=9), "min_tokens must be between 0 and max_tokens, got 9"),
    (dict(min_tokens=-1), "min_tokens must be between 0 and 2048"),
    (dict(min_tokens=5000), "min_tokens must be between 0 and 2048"),
])
def test_limits_name_the_field_and_the_limit(config, fields, message):
    start = time.perf_counter()
    assert message in refused(config, **fields)
    assert time.perf_counter() - start < 0.1
    assert len(refused(config, **fields)) < 300  # never echoes the input


def test_a_long_prompt_is_refused_by_a_smaller_byte_limit(tmp_path):
    config = CoordinatorConfig(store=tmp_path, max_prompt_bytes=65_536)
    assert "prompt is 100000 bytes; the limit is 65536" in refused(config, prompt="y" * 100_000)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), f32(1e-39), 1e-4, -0.5, 101.0])
def test_poison_temperatures_are_refused(config, value):
    assert "temperature must be 0 (greedy) or between 0.001 and 100" in refused(config, temperature=value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), f32(1e-40), 0.0, -0.1, 1.5])
def test_poison_top_p_is_refused(config, value):
    assert "top_p must be in (0, 1]" in refused(config, top_p=value)


@pytest.mark.parametrize("fields", [dict(temperature=0.0), dict(temperature=1e-3), dict(temperature=100.0),
                                    dict(top_p=f32(1e-30)), dict(top_p=1.0), dict(top_k=0), dict(top_k=50)])
def test_sane_sampling_values_pass(config, fields):
    check_parameters(GenerationRequest(prompt="Hello", **fields), config)


def test_top_k_below_zero_is_refused(config):
    assert "top_k must be >= 0" in refused(config, top_k=-1)


def test_an_infer_whose_embeddings_exceed_a_response_is_refused():
    from coordinator.serving.embedding import check_response_size

    check_response_size(1024, 16384)  # the default max_infer_batch, 16384 floats each: fits exactly
    with pytest.raises(InvalidArgument, match="a response holds at most 67108864 bytes"):
        check_response_size(1025, 16384)
