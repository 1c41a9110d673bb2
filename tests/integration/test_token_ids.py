"""Any model can be driven without text: a random Llama with no tokenizer, served over two workers, takes its
prompt as token ids and answers token ids, equal to transformers' greedy generation of the same model; and a
random import can borrow a stored model's tokenizer (`--tokenizer`) to serve text."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from coordinator.serving.textmodel import TextModel
from shardline.client import Client
from shardline.errors import FailedPrecondition, InvalidArgument
from shardline.v1 import coordinator_pb2

PROMPTS = [[5, 17, 99, 3], [42], [7, 7, 7, 7, 7, 7, 7, 120]]


@pytest.fixture(scope="module")
def tokenless(tokenless_cluster):
    """tiny-llama (random, no tokenizer in the store) over two workers: a client."""
    with Client(tokenless_cluster.address, timeout=60) as client:
        yield client


def test_prompt_token_ids_give_transformers_greedy_tokens_on_a_model_without_tokenizer(tokenless, store):
    model = AutoModelForCausalLM.from_pretrained(store.path("tiny-llama"), dtype=torch.float32).eval()
    for prompt in PROMPTS:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                                 pad_token_id=0)[0, len(prompt):].tolist()
        result = tokenless.generate(prompt, max_tokens=10, temperature=0, ignore_eos=True)
        assert result.token_ids == out and len(out) == 10
        assert result.text == "" and result.prompt_tokens == len(prompt)
        streamed = [t for chunk in tokenless.generate(prompt, max_tokens=10, temperature=0, ignore_eos=True,
                                                      stream=True) for t in chunk.token_ids]
        assert streamed == out


def test_text_on_a_model_without_tokenizer_and_bad_ids_are_refused_clearly(tokenless):
    with pytest.raises(FailedPrecondition, match="prompt_token_ids"):
        tokenless.generate("hello", max_tokens=4)
    with pytest.raises(InvalidArgument, match=r"prompt_token_ids\[1\] is 128, outside the model's vocabulary"):
        tokenless.generate([1, 128], max_tokens=4)
    with pytest.raises(InvalidArgument, match=r"prompt_token_ids\[0\] is -1"):
        tokenless.generate([-1], max_tokens=4)
    with pytest.raises(InvalidArgument, match="stop sequences need the model's tokenizer"):
        tokenless.generate([1, 2], max_tokens=4, stop=["x"])
    both = coordinator_pb2.GenerateRequest(prompt="hi", prompt_token_ids=[1], max_tokens=2)
    with pytest.raises(grpc.RpcError) as err:
        list(tokenless.stub.Generate(both, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not prompt and prompt_token_ids" in \
        err.value.details()
    assert len(tokenless.generate([1, 2, 3], max_tokens=3, temperature=0, ignore_eos=True).token_ids) == 3
    (model,) = tokenless.list_models()
    assert (model.name, model.task, model.has_tokenizer, model.context_tokens) == ("tiny-llama", "generate", False,
                                                                                   2048)


def test_a_random_import_borrows_a_stored_tokenizer(smollm2_store):
    env = {**os.environ, "SHARDLINE_STORE": str(smollm2_store.root)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "coordinator.cli", "import", "--random", "llama", "--hidden",
                               "64", "--layers", "2", "--tokenizer", "smollm2", *args], env=env, capture_output=True,
                              text=True, timeout=120)

    small = cli("--vocab", "1000", "--name", "borrow-small")
    assert small.returncode == 1 and "give --vocab 49152 or more" in small.stderr
    assert not smollm2_store.has("borrow-small")
    made = cli("--name", "borrowed")
    assert made.returncode == 0, made.stderr
    text = TextModel(smollm2_store.path("borrowed"))
    reference = TextModel(smollm2_store.path("smollm2"))
    assert text.vocab_size == 49152 and text.stop_ids == reference.stop_ids
    assert text.encode("The capital of France is") == reference.encode("The capital of France is")
