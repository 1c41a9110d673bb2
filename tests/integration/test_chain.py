"""Chains of real worker servers give what the whole model gives in transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import Chain, load, seq

SPLITS = [(0, 2), (2, 5), (5, 6)]


def reference(store, name):
    return AutoModelForCausalLM.from_pretrained(store.path(name), dtype=torch.float32).eval()


def chain_for(workers, parameters, model, splits):
    servers = workers(len(splits))
    for server, (a, b) in zip(servers, splits, strict=True):
        load(server.address, model, a, b, parameters.address)
    return Chain([s.address for s in servers])


def ref_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def ref_greedy(model, ids, steps):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_random_model_chain_matches_transformers(model, store, parameters, workers):
    chain = chain_for(workers, parameters, model, SPLITS)
    ref = reference(store, model)
    prompt = [5, 17, 3, 99, 42, 7, 1]
    np.testing.assert_allclose(chain.logits("p", 0, prompt), ref_logits(ref, prompt), atol=1e-4, rtol=0)
    assert chain.greedy("g", prompt, 20) == ref_greedy(ref, prompt, 20)


def test_mixed_batch_equals_each_sequence_alone(store, parameters, workers):
    chain = chain_for(workers, parameters, "tiny-llama", SPLITS)
    a, b, c = [1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24]
    # alone: a, then b, then c (prefill), then one more token each at its own position
    alone = [chain.logits(f"alone-{i}", 0, s) for i, s in enumerate((a, b, c))]
    alone_next = [chain.logits(f"alone-{i}", len(s), [30 + i]) for i, s in enumerate((a, b, c))]
    # together: b and c prefilled first; then one batch holds a's prefill next to b's and c's decode steps
    chain.logits("mixed-b", 0, b)
    chain.logits("mixed-c", 0, c)
    from shardline.v1 import worker_pb2
    from tests.helpers import decode_tensor, to_numpy

    response = chain.step([seq("mixed-a", 0, len(a)), seq("mixed-b", len(b), 1), seq("mixed-c", len(c), 1)],
                          a + [31, 32], worker_pb2.OUTPUT_KIND_LOGITS)
    assert not response.HasField("error"), response.error.message
    together = to_numpy(decode_tensor(response.tensor))
    np.testing.assert_allclose(together[: len(a)], alone[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(together[len(a)], alone_next[1][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(together[len(a) + 1], alone_next[2][0], atol=1e-5, rtol=0)
