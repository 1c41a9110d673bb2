from __future__ import annotations

import torch

from shard_worker.sampling import Sampling, sample


def test_greedy_takes_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 0.0]])
    assert sample(logits, [Sampling(), Sampling()], [0, 0]) == [1, 0]


def test_seeded_sampling_repeats_and_depends_on_seed():
    logits = torch.zeros(1, 1000)
    p = Sampling(temperature=1.0, seed=7)
    first = [sample(logits, [p], [i])[0] for i in range(20)]
    assert first == [sample(logits, [p], [i])[0] for i in range(20)]
    assert first != [sample(logits, [Sampling(temperature=1.0, seed=8)], [i])[0] for i in range(20)]


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    top2 = {sample(logits, [Sampling(temperature=5.0, top_k=2, seed=s)], [0])[0] for s in range(200)}
    assert top2 == {0, 1}
    nucleus = {sample(logits, [Sampling(temperature=1.0, top_p=0.5, seed=s)], [0])[0] for s in range(200)}
    assert nucleus == {0}  # token 0 alone holds ~64% of the mass
