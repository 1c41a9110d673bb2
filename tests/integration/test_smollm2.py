"""The built-in SmolLM2-135M-Instruct split over two and three real workers equals the whole model in
transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import Chain, load


@pytest.mark.parametrize("ranges", [
    pytest.param([(0, 15), (15, 30)], id="two-workers", marks=pytest.mark.smoke),
    pytest.param([(0, 10), (10, 20), (20, 30)], id="three-workers"),
])
def test_smollm2_split_over_workers_matches_transformers(smollm2_store, parameters, workers, ranges):
    path = smollm2_store.path("smollm2")
    manifest = smollm2_store.manifest("smollm2")
    assert manifest.num_layers == 30
    servers = workers(len(ranges))
    for server, (a, b) in zip(servers, ranges, strict=True):
        load(server.address, "smollm2", a, b, parameters.address)
    chain = Chain([s.address for s in servers])

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is")["input_ids"]
    with torch.no_grad():
        ref_logits = model(torch.tensor([ids])).logits[0].numpy()
        ref_tokens = model.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20,
                                    do_sample=False)[0, len(ids):].tolist()
    np.testing.assert_allclose(chain.logits("prefill", 0, ids), ref_logits, atol=1e-4, rtol=0)
    tokens = chain.greedy("greedy", ids, 20)
    assert tokens == ref_tokens
    assert "Paris" in tokenizer.decode(tokens)
