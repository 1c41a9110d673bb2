"""The client-facing API over a real SmolLM2 cluster, through the Python SDK."""

from __future__ import annotations

import itertools
import time

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardline.client import Client
from shardline.errors import DeadlineExceeded, InvalidArgument, NotFound
from shardline.v1 import worker_pb2
from tests.helpers import worker_stub

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def client(smollm2_cluster):
    coordinator, _ = smollm2_cluster
    with Client(coordinator.address, timeout=120) as c:
        c.wait_ready(timeout=120)
        yield c


@pytest.fixture(scope="module")
def reference(smollm2_store):
    path = smollm2_store.path("smollm2")
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_greedy_equals_transformers_generate(client, reference):
    tokenizer, model = reference
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
        expected = [t for t in expected if t != tokenizer.eos_token_id]
        result = client.generate(prompt, max_tokens=16, temperature=0)
        assert result.token_ids == expected, prompt
        assert result.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert result.finish_reason in ("length", "stop") and result.prompt_tokens == ids.shape[1]


def test_seed_repeats_and_stream_matches(client):
    first = client.generate("Once upon a time", max_tokens=24, temperature=0.9, top_p=0.95, seed=11)
    again = client.generate("Once upon a time", max_tokens=24, temperature=0.9, top_p=0.95, seed=11)
    other = client.generate("Once upon a time", max_tokens=24, temperature=0.9, top_p=0.95, seed=12)
    assert first.text == again.text and first.token_ids == again.token_ids
    assert other.token_ids != first.token_ids
    chunks = list(client.generate("Once upon a time", max_tokens=24, temperature=0.9, top_p=0.95, seed=11,
                                  stream=True))
    assert "".join(c.text for c in chunks) == first.text
    assert chunks[-1].finish_reason == first.finish_reason and all(c.finish_reason is None for c in chunks[:-1])


def test_stop_sequence_and_chat(client):
    greedy = client.generate("The capital of France is", max_tokens=16, temperature=0)
    cut = greedy.text.index("answer") if "answer" in greedy.text else len(greedy.text) // 2
    stop = greedy.text[cut: cut + 4]
    stopped = client.generate("The capital of France is", max_tokens=16, temperature=0, stop=[stop])
    assert stopped.finish_reason == "stop" and stopped.text == greedy.text[: greedy.text.index(stop)]
    chat = client.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=20, temperature=0)
    assert "Paris" in chat.text and chat.prompt_tokens > 10


def test_a_resumed_stream_gives_the_text_the_undisturbed_one_gives(client):
    """Resuming after every point of a stream whose text is held back (a stop sequence's prefix, a word cut
    in tokens): the text that follows is exactly what the undisturbed stream gave after that point, and a
    stop sequence that straddles the break still ends it."""
    from shardline.v1 import coordinator_pb2

    stub = client.stub
    prompt = "The capital of France is"
    greedy = client.generate(prompt, max_tokens=16, temperature=0)
    stop = greedy.text[len(greedy.text) // 2: len(greedy.text) // 2 + 5]
    for params in (dict(max_tokens=16, temperature=0.0), dict(max_tokens=16, temperature=0.0, stop=[stop]),
                   dict(max_tokens=16, temperature=0.9, seed=5, min_tokens=3, stop=[" the"])):
        request = coordinator_pb2.GenerateRequest(prompt=prompt, **params)
        whole = list(stub.Generate(request, timeout=60))
        tokens = [t for m in whole for t in m.token_ids]
        for k in range(1, len(tokens)):
            received = [m for m in whole if m.token_ids][:k]  # one token per message
            again = coordinator_pb2.GenerateRequest()
            again.CopyFrom(request)
            again.resume_token_ids[:] = tokens[:k]
            again.model = whole[0].model
            rest = list(stub.Generate(again, timeout=60))
            assert "".join(m.text for m in received + rest) == "".join(m.text for m in whole), (params, k)
            assert [t for m in rest for t in m.token_ids] == tokens[k:] and rest[-1].finish_reason == \
                whole[-1].finish_reason, (params, k)
        if params.get("stop") == [stop]:
            assert whole[-1].finish_reason == coordinator_pb2.FINISH_REASON_STOP


@pytest.mark.parametrize("params, field", [
    (dict(prompt=""), "prompt"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=20000), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_tokens=9000), "8192"),
])
def test_bad_requests_name_the_field_and_the_cluster_keeps_serving(client, params, field):
    prompt = params.pop("prompt", "Hello")
    with pytest.raises(InvalidArgument) as err:
        client.generate(prompt, **params)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.message
    assert client.generate("Hello", max_tokens=2, temperature=0).completion_tokens == 2


def test_unknown_model_is_not_found(client):
    with pytest.raises(NotFound, match="'gpt-9'"):
        client.generate("Hello", model="gpt-9")


def test_expired_deadline_frees_the_kv_cache_on_every_stage(client, smollm2_cluster):
    _, servers = smollm2_cluster
    with pytest.raises(DeadlineExceeded):
        client.generate("Tell me a long story", max_tokens=2000, temperature=0.8, seed=1, timeout=1.5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        statuses = [worker_stub(s.address).GetStatus(worker_pb2.GetStatusRequest()) for s in servers]
        if all(s.sessions == 0 and s.kv_cache_bytes == 0 for s in statuses):
            break
        time.sleep(0.2)
    assert all(s.sessions == 0 and s.kv_cache_bytes == 0 for s in statuses), statuses


def test_models_and_status(client, smollm2_cluster):
    (model,) = client.list_models()
    assert (model.name, model.family, model.num_layers, model.ready) == ("smollm2", "llama", 30, True)
    assert model.context_tokens == 8192 and model.task == "generate" and model.has_tokenizer
    status = client.cluster_status()
    assert status.ready and status.state == "ready" and len(status.workers) == 3
    ranges = [(w.start_layer, w.end_layer) for w in status.workers]
    assert ranges[0][0] == 0 and ranges[-1][1] == 30 and all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(w.state == "ready" and w.weight_bytes > 0 and w.rss_bytes > 0 for w in status.workers)
