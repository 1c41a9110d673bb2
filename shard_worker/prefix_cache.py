"""A stage's prefix store: the keys and values of prompt prefixes, kept after their sessions so that a new
session starting with the same tokens copies them instead of computing them again (README "Prefix cache").

Blocks are keyed by the chain hash the coordinator sends (coordinator/serving/prefix.py: block i's hash covers every
token of blocks 0..i, so equal hashes mean equal prefixes). Each block holds `block_tokens` positions of every
layer of this stage and counts as one block of the stage's KV pool, but only inside its free blocks: a
session that needs room evicts prefix blocks, least recently used first (children before their parents, so a
chain shrinks from its end), and a block is never evicted while it is pinned by a copy in progress (its
reference count). The store is a cache: losing a block only costs its recomputation, and a stage that lacks a
prefix the coordinator names answers NOT_FOUND for that sequence, which the coordinator heals with the full
prefill.

A new session gets a copy of the prefix in its own buffers (a memcpy per layer, far cheaper than the layers'
compute), so a session's buffers stay contiguous and attention reads them in place as before.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

from shard_worker.kv_cache import KVPool, SessionCache
from shardline.errors import InvalidArgument, NotFound, ResourceExhausted

MAX_HASH_BYTES = 64


@dataclass
class PrefixBlock:
    """Keys and values of one block: [layers, kv_heads, block_tokens, head_dim] each."""

    keys: torch.Tensor
    values: torch.Tensor
    refs: int = 0  # copies in progress that read it: never evicted meanwhile


@dataclass
class PrefixStore:
    pool: KVPool
    blocks: collections.OrderedDict[bytes, PrefixBlock] = field(default_factory=collections.OrderedDict)
    evictions: int = 0  # blocks evicted to make room, in all

    def __post_init__(self) -> None:
        self.pool.reclaim = self.evict

    @property
    def nbytes(self) -> int:
        return len(self.blocks) * self.pool.layout.block_bytes

    def evict(self, n: int, keep: frozenset[bytes] = frozenset()) -> int:
        """Free up to `n` blocks, least recently used first, skipping pinned ones and `keep`; returns how
        many. Stops at the `n`th victim: no pass over the whole store per block."""
        victims: list[bytes] = []
        for key, block in self.blocks.items():
            if len(victims) >= n:
                break
            if not block.refs and key not in keep:
                victims.append(key)
        for key in victims:
            del self.blocks[key]
        freed = len(victims)
        self.pool.cached -= freed
        self.evictions += freed
        return freed

    def clear(self) -> None:
        self.pool.cached -= len(self.blocks)
        self.blocks.clear()

    def _touch(self, hashes: list[bytes]) -> None:
        """Most recently used, children older than their parents (a chain is evicted from its end)."""
        for h in reversed(hashes):
            if h in self.blocks:
                self.blocks.move_to_end(h)

    def start(self, where: str, cache: SessionCache, hashes: list[bytes], tokens: int, positions: int) -> None:
        """A new session's positions [0, tokens) from the store: reserve its room for `positions` and copy
        the blocks in. NOT_FOUND when a block is missing (evicted, or this stage restarted); the cache holds
        nothing afterwards if this raises."""
        bt = self.pool.layout.block_tokens
        need = -(-tokens // bt)
        if need > len(hashes):
            raise InvalidArgument(f"{where}.prefix_tokens is {tokens}: {need} blocks of {bt} positions, but "
                                  f"{where}.prefix_blocks names {len(hashes)}")
        names = hashes[:need]
        missing = next((i for i, h in enumerate(names) if h not in self.blocks), None)
        if missing is not None:
            raise NotFound(f"{where}.prefix_blocks[{missing}] is not held on this stage (evicted, or the worker "
                           "restarted): send the whole prefill")
        self._touch(names)
        used = [self.blocks[h] for h in names]
        for b in used:
            b.refs += 1
        try:
            try:
                cache.reserve(positions)
            except ResourceExhausted:
                for b in used:  # the prefix's own blocks may be what the session needs: let them go
                    b.refs -= 1
                used = []
                cache.reserve(positions)
                if any(h not in self.blocks for h in names):
                    cache.release()
                    raise NotFound(f"{where}.prefix_blocks: the prefix was evicted to make room for this session "
                                   "on this stage: send the whole prefill") from None
                used = [self.blocks[h] for h in names]
                for b in used:  # pinned again for the copy: the finally below unpins exactly these
                    b.refs += 1
            try:
                for layer in range(len(cache.keys)):
                    cache.keys[layer][:, :tokens] = torch.cat([b.keys[layer] for b in used], dim=1)[:, :tokens]
                    cache.values[layer][:, :tokens] = torch.cat([b.values[layer] for b in used],
                                                                dim=1)[:, :tokens]
            except BaseException:
                cache.release()  # not yet one of the step's caches: nobody else would give its blocks back
                raise
            cache.length = tokens
        finally:
            for b in used:
                b.refs -= 1

    def save(self, cache: SessionCache, hashes: list[bytes], upto: int) -> None:
        """Keep the session's full blocks below position `upto` named by `hashes` (those not held yet), as
        far as free blocks allow after evicting older prefix blocks; never fails the step."""
        bt = self.pool.layout.block_tokens
        full = min(len(hashes), upto // bt, cache.blocks)
        names = hashes[:full]
        chain = frozenset(names)  # never evict this chain's own blocks to store its later ones
        self._touch(names)
        for i, h in enumerate(names):
            if h in self.blocks:
                continue
            if self.pool.blocks_free < 1 and (not self.evict(1, keep=chain) or self.pool.blocks_free < 1):
                return
            sl = slice(i * bt, (i + 1) * bt)
            keys = torch.stack([k[:, sl] for k in cache.keys])
            values = torch.stack([v[:, sl] for v in cache.values])
            self.pool.cached += 1
            self.blocks[h] = PrefixBlock(keys, values)
            self._touch(names[: i + 1])  # its parents stay more recent than it


def check_hashes(where: str, hashes: list[bytes]) -> None:
    bad = next((i for i, h in enumerate(hashes) if not 0 < len(h) <= MAX_HASH_BYTES), None)
    if bad is not None:
        raise InvalidArgument(f"{where}.prefix_blocks[{bad}] is {len(hashes[bad])} bytes; a block hash has 1 to "
                              f"{MAX_HASH_BYTES}")
