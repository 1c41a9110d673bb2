"""What the last stage does with a sequence's logits besides sampling: the logit biases and penalties that
change them first (in transformers' order), and the log probabilities it reports (of the model's own logits,
before any change: what evaluation harnesses score).

Penalties need the ids the sequence has seen; the coordinator sends them with each slice (SequenceSlice
token_ids) and the stage keeps them per session (`StageRuntime.history`), so a replay rebuilds them too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from shard_worker.sampling import Sampling
from shardline.scores import TokenScore

SCORE_ROWS = 64  # prompt rows turned into vocabulary-wide log probabilities at a time (memory: rows x vocab)


@dataclass(frozen=True)
class SequenceScores:
    sampled: TokenScore | None = None       # the sampled id's (Sampling.logprobs)
    prompt: tuple[TokenScore, ...] = ()     # prompt ids scored in this step (Sampling.prompt_logprobs)


def changes_logits(s: Sampling) -> bool:
    return bool(s.logit_bias) or s.penalized


def allowed_ids(bits: bytes, vocab: int, device: torch.device) -> torch.Tensor:
    """A bitmask of 32-bit little-endian words (bit j of word i: id 32 i + j) as a bool tensor [vocab]."""
    words = torch.frombuffer(bytearray(bits), dtype=torch.int32).to(device)
    unpacked = ((words.unsqueeze(1) >> torch.arange(32, device=device)) & 1).flatten().bool()
    out = torch.zeros(vocab, dtype=torch.bool, device=device)
    n = min(vocab, unpacked.numel())
    out[:n] = unpacked[:n]
    return out


def adjust(row: torch.Tensor, s: Sampling, history: Sequence[int], allowed: bytes = b"") -> torch.Tensor:
    """One sequence's logits [vocab] after its logit bias, repetition penalty, then frequency and presence
    penalties; `history` is every id at the positions before the one being sampled (prompt, then output).
    Biases and the repetition penalty are transformers' SequenceBiasLogitsProcessor (one-id sequences) and
    RepetitionPenaltyLogitsProcessor; frequency and presence are OpenAI's, over the output ids only. Ids
    outside `allowed` (structured output's mask, when given) are -inf: never sampled."""
    out = row.float().clone()
    if s.logit_bias:
        ids = torch.tensor([i for i, _ in s.logit_bias], device=out.device)
        out[ids] += torch.tensor([b for _, b in s.logit_bias], device=out.device)
    if s.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), device=out.device)
        score = out[seen]
        out[seen] = torch.where(score < 0, score * s.repetition_penalty, score / s.repetition_penalty)
    output = history[s.prompt_tokens:]
    if (s.frequency_penalty or s.presence_penalty) and output:
        ids, counts = torch.unique(torch.tensor(list(output), device=out.device), return_counts=True)
        out[ids] -= s.frequency_penalty * counts.to(out.dtype) + s.presence_penalty
    if allowed:
        out = out.masked_fill(~allowed_ids(allowed, out.shape[-1], out.device), float("-inf"))
    return out


def scores(logprobs: torch.Tensor, positions: Sequence[int], ids: Sequence[int], k: int) -> list[TokenScore]:
    """Rows of log probabilities [n, vocab]: row i scores id ids[i] at positions[i], with its k best."""
    chosen = logprobs.gather(1, torch.tensor(list(ids), device=logprobs.device).unsqueeze(1)).squeeze(1).tolist()
    if k:
        best = torch.topk(logprobs, k, dim=-1)
        values, indexes = best.values.tolist(), best.indices.tolist()
    else:
        values = indexes = [[] for _ in ids]
    return [TokenScore(p, int(t), float(lp), tuple(zip(ix, v, strict=True)))
            for p, t, lp, ix, v in zip(positions, ids, chosen, indexes, values, strict=True)]


class PromptScorer:
    """Scores a prompt slice by slice. A slice's rows score the ids that follow them in the slice; its last
    row scores the next slice's first id, so that row's log probabilities wait here (one row per session
    whose prompt is not all fed) until the next slice comes."""

    def __init__(self) -> None:
        self.waiting: dict[str, torch.Tensor] = {}  # session id -> its last row's log probabilities [vocab]

    def score(self, session_id: str, start: int, ids: Sequence[int], s: Sampling,
              logits_of: Callable[[int, int], torch.Tensor]) -> list[TokenScore]:
        """`logits_of(first, upto)`: the model's logits of the slice's rows [first, upto). Positions scored:
        those in [max(start, 1), min(start + len(ids), prompt_tokens))."""
        k, end, out = s.prompt_logprobs or 0, start + len(ids), []
        before = self.waiting.pop(session_id, None)
        if before is not None and 1 <= start < s.prompt_tokens:
            out += scores(before.unsqueeze(0), [start], [ids[0]], k)
        last = max(0, min(end, s.prompt_tokens) - start - 1)  # rows [0, last) score the ids at rows [1, last]
        keep = end < s.prompt_tokens  # the last row scores the next slice's first id
        needed = len(ids) if keep else last
        for first in range(0, needed, SCORE_ROWS):
            upto = min(first + SCORE_ROWS, needed)
            logprobs = torch.log_softmax(logits_of(first, upto).float(), dim=-1)
            n = max(0, min(upto, last) - first)
            if n:
                out += scores(logprobs[:n], range(start + first + 1, start + first + 1 + n),
                              ids[first + 1: first + 1 + n], k)
            if keep and upto == needed:
                self.waiting[session_id] = logprobs[-1].clone()
        return out

    def forget(self, session_id: str) -> None:
        self.waiting.pop(session_id, None)

    def clear(self) -> None:
        self.waiting.clear()
