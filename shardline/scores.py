"""A token's log probability at a position, and the likeliest ids there: what the last stage reports
(shard_worker/scoring.py) and the coordinator passes on to callers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenScore:
    """`token_id`'s log probability at `position`, and the k likeliest (id, log probability), best first."""

    position: int
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
