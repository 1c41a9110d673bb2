"""Sentence embeddings from all-MiniLM-L6-v2 split over 2 workers equal the whole model's, pooled as
sentence-transformers does (mean over tokens, then unit length)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from shard_worker.server import start_worker
from shardline.client import Client
from shardline.codec import encode_tensor, from_numpy
from shardline.errors import FailedPrecondition, InvalidArgument
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc

SENTENCES = ["A man is eating food.", "A man is riding a horse.", "The new movie is awesome.",
             "Sharding a model across machines lets it serve more users.", "", "Bonjour tout le monde",
             "short", "A much longer sentence that goes on and on about layers, shards, workers and streams."]


@pytest.fixture(scope="module")
def encoder_cluster(loop, minilm_store, parameters):
    config = CoordinatorConfig(store=minilm_store.root, model="minilm", workers=2, port=0,
                               parameters_address=parameters.address, max_infer_batch=64, infer_micro_batch=3,
                               max_infer_tokens=2000, heartbeat_timeout_ms=3_600_000)
    coordinator = loop.run(start_coordinator(config))
    servers = [loop.run(start_worker()) for _ in range(2)]
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
    for server in servers:
        registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=server.address,
                                                                      memory_budget_bytes=2**30))
    with Client(coordinator.address, timeout=120) as client:
        client.wait_ready(timeout=120)
        yield client, coordinator
    for server in servers:
        loop.run(server.stop(0))
    loop.run(coordinator.stop())


def reference(path, sentences):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


@pytest.mark.smoke
def test_split_embeddings_match_the_whole_model(encoder_cluster, minilm_store):
    client, _ = encoder_cluster
    status = client.cluster_status()
    (a, b), (c, d) = [(w.start_layer, w.end_layer) for w in status.workers]
    assert a == 0 and b == c and d == 6 and 0 < b < 6  # really split in two
    ours = client.embed(SENTENCES)
    expected = reference(minilm_store.path("minilm"), SENTENCES)
    assert ours.shape == (len(SENTENCES), 384)
    cosine = (ours * expected).sum(axis=1)
    assert cosine.min() >= 0.9999, cosine
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


def test_infer_bad_input_names_the_field(encoder_cluster):
    client, coordinator = encoder_cluster
    stub = coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(coordinator.address))

    def infer(**fields):
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(coordinator_pb2.InferRequest(**fields), timeout=30)
        return err.value

    floats = encode_tensor(from_numpy(np.zeros((2, 4), np.float32)))
    err = infer(input_ids=floats)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "input_ids.dtype is float32" in err.details()
    err = infer(input_ids=encode_tensor(from_numpy(np.zeros((8,), np.int64))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "input_ids.shape [8]" in err.details()
    ids, mask = np.ones((2, 4), np.int64), np.ones((2, 5), np.int64)
    err = infer(input_ids=encode_tensor(from_numpy(ids)), attention_mask=encode_tensor(from_numpy(mask)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "attention_mask.shape [2, 5]" in err.details()
    err = infer(texts=["x"] * 65)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "above the limit of 64" in err.details()
    err = infer()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument):
        client.embed([])
    with pytest.raises(FailedPrecondition, match=r"is an encoder.*the SDK's embed\(\)"):
        client.generate("hello")
    (model,) = client.list_models()
    assert model.task == "embed" and model.has_tokenizer
    # token ids with a mask give what the texts give
    assert client.embed(["short"]).shape == (1, 384)
    good = stub.Infer(coordinator_pb2.InferRequest(input_ids=encode_tensor(from_numpy(np.array(
        [[101, 2460, 102, 0]], np.int64))), attention_mask=encode_tensor(from_numpy(np.array([[1, 1, 1, 0]])))))
    assert good.tokens == 3


def test_infer_tokens_are_bounded_and_the_cluster_keeps_serving(encoder_cluster):
    client, coordinator = encoder_cluster
    stub = coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(coordinator.address))
    with pytest.raises(InvalidArgument, match=r"the limit is 2000 \(max_infer_tokens\)"):
        client.embed(["a sentence of several words that adds up to many tokens " * 4] * 64)
    ids = encode_tensor(from_numpy(np.full((8, 300), 1000, np.int64)))
    with pytest.raises(grpc.RpcError) as err:
        stub.Infer(coordinator_pb2.InferRequest(input_ids=ids), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "2400 tokens" in err.value.details()
    assert client.embed(["still serving"]).shape == (1, 384)


def test_an_over_long_text_is_refused_or_truncated_when_asked_and_the_log_shows_texts_only_when_asked(
        encoder_cluster, caplog):
    client, coordinator = encoder_cluster
    long = "layers " * 600
    with pytest.raises(InvalidArgument, match=r"texts\[1\] is 602 tokens; model 'minilm' takes at most 512"):
        client.embed(["short", long])
    found = client.embeddings(["short", long], truncate=True)
    assert found.truncated == 1 and found.tokens == 3 + 512 and found.vectors.shape == (2, 384)
    assert client.embeddings(["short"], truncate=True).truncated == 0
    with caplog.at_level("INFO", logger="shardline.requests"):
        client.embed(["private words"])
        coordinator.fleet.config.log_prompts = True
        try:
            client.embed(["private words"])
        finally:
            coordinator.fleet.config.log_prompts = False
    hidden, shown = [r.getMessage() for r in caplog.records if r.name == "shardline.requests"][-2:]
    assert "private" not in hidden and "prompt=" not in hidden and "outcome=infer" in hidden
    assert shown.endswith('prompt=["private words"]')
