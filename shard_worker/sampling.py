"""Turning the last token's logits into a token id, per request: greedy, temperature, top-k, top-p.

Sampling is seeded by (seed, position), not by a generator that lives in the session, so the same request
gives the same tokens however it is batched, and a cache rebuilt elsewhere samples the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0            # 0 = no limit
    top_p: float = 1.0        # 1 = no limit
    seed: int = 0


def sample_one(logits: torch.Tensor, params: Sampling, position: int) -> int:
    """A token id from one row of float32 logits [vocab]."""
    if params.temperature <= 0.0:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if 0.0 < params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the first token)
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    generator = torch.Generator().manual_seed((params.seed * 1_000_003 + position) % (2**63))
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, params: list[Sampling], positions: list[int]) -> list[int]:
    """One token id per row of [B, vocab] logits; `positions` is the position each sampled token takes."""
    greedy = [p.temperature <= 0.0 for p in params]
    if all(greedy):
        return [int(t) for t in torch.argmax(logits, dim=-1)]
    return [sample_one(row, p, pos) for row, p, pos in zip(logits, params, positions, strict=True)]
