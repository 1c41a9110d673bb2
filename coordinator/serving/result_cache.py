"""A bounded LRU cache of finished generations, for requests whose output is determined by their input.

A request is cacheable when it is deterministic: greedy (temperature 0), or sampled with a seed the caller
gave (sampling is seeded by seed and position, so the same seed gives the same tokens). The key is the
deployment's identity (a new version, or the same version loaded again, is another deployment) and every
resolved value that affects the output: the prompt's token ids, max_tokens, temperature, top_k, top_p, the
seed (the caller's; none for greedy without one), stop sequences, min_tokens and ignore_eos. Only whole
results are stored (a cancelled or failed request stores nothing).

The bound is in bytes, counted from what an entry really holds: the key's ids and the result's ids packed as
int32/int64 arrays, the text as UTF-8, plus a fixed overhead per entry for the Python objects around them.
"""

from __future__ import annotations

import array
import collections
from dataclasses import dataclass

from coordinator.serving.generation import FinishReason, Plan

ENTRY_OVERHEAD_BYTES = 600  # the tuple, bytes, str and dict slot of one entry (measured: BENCHMARKS.md)


@dataclass(frozen=True)
class CachedResult:
    text: str
    token_ids: bytes      # int64 ids, packed
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int

    @property
    def ids(self) -> list[int]:
        return array.array("q", self.token_ids).tolist()

    @classmethod
    def of(cls, text: str, ids: list[int], finish_reason: FinishReason, prompt_tokens: int) -> CachedResult:
        return cls(text, array.array("q", ids).tobytes(), finish_reason, prompt_tokens, len(ids))


@dataclass(frozen=True)
class Key:
    """Everything that decides a deterministic request's output, and whose answer it is (`tenant`: the API
    key's name with per-key caches, "" when shared)."""

    tenant: str
    deployment_uid: str
    prompt_ids: bytes  # int64, packed
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None   # the caller's (None: greedy without one)
    stop: tuple[str, ...]
    min_tokens: int
    ignore_eos: bool
    stop_ids: frozenset[int] = frozenset()
    adjusted: tuple[object, ...] = ()  # min_p, the penalties and the logit bias


def cache_key(deployment_uid: str, plan: Plan, seed: int | None, tenant: str = "") -> Key | None:
    """The key of a deterministic request, or None when its output is random (sampled without a seed of the
    caller's)."""
    s = plan.sampling
    if s.temperature != 0 and seed is None:
        return None
    if s.logprobs is not None or s.prompt_logprobs is not None:
        return None  # the cache keeps text and ids, not log probabilities
    return Key(tenant, deployment_uid, array.array("q", plan.prompt_ids).tobytes(), plan.max_tokens, s.temperature,
               s.top_k, s.top_p, seed, plan.stop, plan.min_tokens, plan.ignore_eos, plan.stop_ids,
               (s.min_p, s.repetition_penalty, s.frequency_penalty, s.presence_penalty, s.logit_bias, plan.structure))


def entry_bytes(key: Key, result: CachedResult) -> int:
    """What an entry holds: its packed ids, its text and stop sequences as UTF-8, and the overhead."""
    return (ENTRY_OVERHEAD_BYTES + len(key.prompt_ids) + len(result.token_ids) + len(result.text.encode())
            + sum(len(x.encode()) for x in key.stop))


class ResultCache:
    """LRU over entries, bounded by `max_bytes` (0 = off)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: collections.OrderedDict[Key, tuple[CachedResult, int]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key | None) -> CachedResult | None:
        if key is None or not self.max_bytes:
            return None
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Key | None, result: CachedResult) -> None:
        if key is None or not self.max_bytes:
            return
        size = entry_bytes(key, result)
        if size > self.max_bytes:
            return  # larger than the whole cache: never stored
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (result, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
