"""Calibrate on a real worker: one layer of a model timed from its config alone (no weights move), the
payload echoed for link measurements, and bad input refused with INVALID_ARGUMENT naming what is wrong."""

from __future__ import annotations

import re

import grpc
import pytest

from shardline.v1 import tensor_pb2, worker_pb2
from tests.helpers import load, worker_stub


def request(store, model="tiny-llama", **fields):
    manifest = store.manifest(model)
    base = dict(family=manifest.family, config_json=store.config_json(model), dtype=tensor_pb2.DTYPE_FLOAT32,
                sequences=4, tokens=8, context_tokens=32, max_ms=5000)
    return worker_pb2.CalibrateRequest(**{**base, **fields})


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_calibrate_times_one_layer_and_echoes(workers, store, model):
    (worker,) = workers(1)
    reply = worker_stub(worker.address).Calibrate(request(store, model, payload=b"x" * 100_000), timeout=60)
    assert 0 < reply.seconds_per_layer < 1.0
    assert 1 <= reply.repeats <= 11 and reply.threads >= 1
    assert reply.activation_bytes_per_token == 64 * 4  # hidden 64, float32
    assert reply.payload == b"x" * 100_000
    assert worker.servicer.shard is None  # nothing loaded: the calibration's layer is gone


def test_an_empty_family_only_echoes(workers):
    (worker,) = workers(1)
    reply = worker_stub(worker.address).Calibrate(worker_pb2.CalibrateRequest(payload=b"abc"), timeout=10)
    assert reply.payload == b"abc" and reply.seconds_per_layer == 0


BAD = [
    (dict(family="t5"), "family 't5' is not one this worker runs"),
    (dict(config_json="{not json"), "config_json is not a llama config"),
    (dict(config_json="[1, 2]"), "config_json is not a llama config"),
    (dict(dtype=tensor_pb2.DTYPE_INT64), "dtype int64 cannot be a compute dtype"),
    (dict(sequences=0), "sequences must be 1 .. 1024, got 0"),
    (dict(sequences=2000), "sequences must be 1 .. 1024, got 2000"),
    (dict(tokens=0), "tokens must be >= 1"),
    (dict(sequences=1024, tokens=1000), "sequences \\* tokens <= 65536, got 1024 x 1000"),
    (dict(context_tokens=-1), "context_tokens must be 0 .. 131072, got -1"),
    (dict(max_ms=-5), "max_ms must be >= 0"),
    (dict(max_ms=600_000), "max_ms must be 1 .. 60000"),
    (dict(config_json='{"hidden_size": 65536, "intermediate_size": 262144, "num_hidden_layers": 2, '
                      '"num_attention_heads": 64, "vocab_size": 128}'),
     "one layer of this config with its step needs .* MiB \\(weights .* MiB\\); this worker offers .* MiB"),
]


@pytest.mark.parametrize("fields, message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_calibrations_are_invalid_arguments_naming_what_is_wrong(workers, store, fields, message):
    (worker,) = workers(1)
    with pytest.raises(grpc.RpcError) as info:
        worker_stub(worker.address).Calibrate(request(store, **fields), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, info.value.details()), info.value.details()


def test_a_worker_serving_a_shard_refuses_to_calibrate(workers, store, parameters):
    # timing on its compute thread would stall its live steps, and its memory holds the shard and KV pool
    (worker,) = workers(1)
    load(worker.address, "tiny-llama", 0, 3, parameters.address)
    with pytest.raises(grpc.RpcError) as info:
        worker_stub(worker.address).Calibrate(request(store), timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "serves tiny-llama layers [0, 3)" in info.value.details()
    echo = worker_stub(worker.address).Calibrate(worker_pb2.CalibrateRequest(payload=b"ab"), timeout=10)
    assert echo.payload == b"ab"  # the link probes still answer


def test_the_memory_check_counts_the_step_activations(workers, store):
    # a small layer, but 1024 sequences of 64 tokens over a long context: the attention scores alone are GiBs
    (worker,) = workers(1)
    with pytest.raises(grpc.RpcError) as info:
        worker_stub(worker.address).Calibrate(request(store, sequences=1024, tokens=64, context_tokens=100_000),
                                              timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(r"activations \d+ MiB\); this worker offers", info.value.details()), info.value.details()
