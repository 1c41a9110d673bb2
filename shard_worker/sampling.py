"""Turning the last token's logits into a token id, per request: greedy, temperature, top-k, top-p, min-p
(the logit biases and penalties before them: shard_worker/scoring.py).

Sampling is seeded by (seed, position), not by a generator that lives in the session, so the same request
gives the same tokens however it is batched, and a cache rebuilt elsewhere samples the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardline.errors import Internal, InvalidArgument, ShardlineError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0            # 0 = no limit
    top_p: float = 1.0        # 1 = no limit
    seed: int = 0
    min_p: float = 0.0        # 0 = no limit
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None         # the sampled id's log probability and this many best (None: not asked)
    prompt_logprobs: int | None = None  # each prompt id's, and this many best at its position
    prompt_tokens: int = 0    # positions [0, prompt_tokens) are the prompt

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.frequency_penalty) or bool(self.presence_penalty)

    @property
    def needs_ids(self) -> bool:
        """The last stage needs the sequence's ids (each slice carries its own)."""
        return self.penalized or self.prompt_logprobs is not None


def sample_one(logits: torch.Tensor, params: Sampling, position: int) -> int:
    """A token id from one row of float32 logits [vocab]."""
    if params.temperature <= 0.0:
        return int(torch.argmax(logits))
    # shifted so the best score is 0 before dividing: a tiny temperature gives -inf elsewhere, never inf/NaN
    scores = (logits - logits.max()) / params.temperature
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
    if params.min_p > 0.0:  # transformers' MinPLogitsWarper: relative to the best id's probability
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    # on the logits' device: a seed gives the same tokens on the same kind of device
    generator = torch.Generator(device=logits.device).manual_seed((params.seed * 1_000_003 + position) % (2**63))
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, params: list[Sampling], positions: list[int],
           finite: list[bool] | None = None) -> list[int | ShardlineError]:
    """One token id per row of [B, vocab] logits; `positions` is the position each sampled token takes. A row
    that cannot be sampled (its logits hold NaN or inf, its values fail) gets an error instead: the other
    rows are unaffected. `finite`: each row's model logits were finite (given when `logits` were masked, where
    -inf marks an id never to sample)."""
    if finite is None:
        finite = torch.isfinite(logits).all(dim=-1).tolist()
    if all(finite) and all(p.temperature <= 0.0 for p in params):
        return [int(t) for t in torch.argmax(logits, dim=-1).tolist()]  # one copy from the device
    out: list[int | ShardlineError] = []
    for row, p, pos, ok in zip(logits, params, positions, finite, strict=True):
        if not ok:
            out.append(Internal(f"the logits at position {pos} hold NaN or inf: this sequence cannot be sampled"))
            continue
        try:
            out.append(sample_one(row, p, pos))
        except (RuntimeError, ValueError) as exc:
            out.append(InvalidArgument(f"sampling at position {pos} failed with {p}: {exc}"))
    return out
