"""Log probabilities, penalties and biases through the native API and the SDK, on SmolLM2, against transformers
(issue 30.1, 30.3); bad values refused before admission, naming the field and the limit."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

from shardline.client import AsyncClient, Client
from shardline.errors import InvalidArgument
from tests.integration.test_scoring import OpenAIPenalties

PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):",
           "The three primary colors are", "My favourite food is"]


@pytest.fixture(scope="module")
def reference(smollm2_store):
    path = smollm2_store.path("smollm2")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def test_logprobs_of_prompt_and_tokens_equal_transformers_log_softmax(smollm2_cluster, reference):
    coordinator, _ = smollm2_cluster
    model, tokenizer = reference
    with Client(coordinator.address, timeout=300) as client:
        client.wait_ready(timeout=120)
        result = client.generate(PROMPTS[0], max_tokens=8, temperature=0, logprobs=5, prompt_logprobs=1)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids + result.token_ids])).logits[0].float(), dim=-1)
    assert len(result.logprobs) == len(result.token_ids) == 8
    for i, (lp, token) in enumerate(zip(result.logprobs, result.token_ids, strict=True)):
        row = ref[len(ids) - 1 + i]
        assert lp.token_id == token and abs(lp.logprob - row[token]) < 1e-4
        assert [t[0] for t in lp.top] == torch.topk(row, 5).indices.tolist()
        assert lp.top[0][0] == token  # greedy: the likeliest
        assert lp.token == tokenizer.decode([token])
    assert [p.token_id for p in result.prompt_logprobs] == ids
    assert result.prompt_logprobs[0].logprob is None  # nothing comes before the first
    for pos, p in enumerate(result.prompt_logprobs[1:], start=1):
        assert abs(p.logprob - ref[pos - 1, ids[pos]]) < 1e-4 and len(p.top) == 1


def test_penalties_and_biases_equal_transformers_processors_on_5_prompts_of_64_tokens(smollm2_cluster, reference):
    coordinator, _ = smollm2_cluster
    model, tokenizer = reference
    bias = {tokenizer(" the")["input_ids"][0]: -5.0, tokenizer(" a")["input_ids"][0]: 3.0}

    async def all_at_once():  # batched together, as callers would send them
        async with AsyncClient(coordinator.address, timeout=300) as client:
            return await asyncio.gather(*(client.generate(
                p, max_tokens=64, temperature=0, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.5,
                presence_penalty=0.3, logit_bias=bias) for p in PROMPTS))

    results = asyncio.run(all_at_once())
    for prompt, result in zip(PROMPTS, results, strict=True):
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=None,
                                 repetition_penalty=1.3, sequence_bias={(k,): v for k, v in bias.items()},
                                 logits_processor=LogitsProcessorList([OpenAIPenalties(len(ids), 0.5, 0.3)]))
        assert result.token_ids == ref[0, len(ids):].tolist(), prompt


def test_bad_scoring_values_are_refused_naming_the_field_and_the_limit(smollm2_cluster):
    coordinator, _ = smollm2_cluster
    cases = [({"logprobs": 21}, "max_logprobs"), ({"prompt_logprobs": -1}, "prompt_logprobs"),
             ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"frequency_penalty": 2.5}, "frequency_penalty"),
             ({"min_p": 1.5}, "min_p"), ({"logit_bias": {10**6: 1.0}}, "vocabulary"),
             ({"logit_bias": {5: 101.0}}, "-100 and 100")]
    with Client(coordinator.address, timeout=300) as client:
        client.wait_ready(timeout=120)
        for params, words in cases:
            with pytest.raises(InvalidArgument, match=words.replace("(", r"\(")):
                client.generate("Hello", max_tokens=2, **params)
        assert len(client.generate("Hello", max_tokens=2, temperature=0).token_ids) == 2
