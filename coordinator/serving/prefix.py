"""The coordinator's half of the prefix cache (README "Prefix cache"): it hashes the full KV blocks of every
prompt it prefills as a chain, remembers which chains its chain of stages was asked to keep, and starts a new
session past the longest one it remembers.

Block i's hash covers every token of blocks 0..i (the previous block's hash and this block's ids), so one
hash names a whole prefix: equal hashes mean equal tokens at every position before the block's end. The
stages keep the blocks' keys and values (shard_worker/prefix_cache.py); the coordinator only decides how many
positions a new session skips, and tells every stage the same, since a later stage receives hidden states for
the computed positions only. What it remembers is a guess: a stage may have evicted a block since (its
sessions needed the room), in which case it answers NOT_FOUND for that sequence and the stream replays with
the whole prefill, after the guess is forgotten. The index is per chain and starts empty on every new one.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coordinator.serving.streams import Stream

DIGEST_BYTES = 16


def chain_hashes(ids: list[int], block_tokens: int, tenant: str = "") -> list[bytes]:
    """The chain hash of every full block of `ids`, from block 0; a tenant's chains start from its own salt, so
    no two tenants' blocks ever share a hash (and a stage never serves one tenant's prefix to another)."""
    out: list[bytes] = []
    previous = hashlib.blake2b(tenant.encode(), digest_size=DIGEST_BYTES).digest() if tenant else b""
    for end in range(block_tokens, len(ids) + 1, block_tokens):
        block = array("q", ids[end - block_tokens: end]).tobytes()
        previous = hashlib.blake2b(previous + block, digest_size=DIGEST_BYTES).digest()
        out.append(previous)
    return out


def reusable_tokens(prompt_tokens: int, matched_blocks: int, block_tokens: int) -> int:
    """Positions a new session may copy: the matched blocks, but never the last prompt token (its logits give
    the first sampled token, so it is always computed)."""
    return max(0, min(matched_blocks * block_tokens, prompt_tokens - 1))


class PrefixIndex:
    """The block hashes the stages of one chain were asked to keep, least recently used first, bounded by
    the chain's KV capacity in blocks (a stage can never hold more)."""

    def __init__(self, block_tokens: int, capacity_blocks: int) -> None:
        self.block_tokens, self.capacity_blocks = block_tokens, capacity_blocks
        self._held: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.hits = self.misses = 0  # sessions started past a prefix / prefixes a stage no longer held

    def __len__(self) -> int:
        return len(self._held)

    def match(self, hashes: list[bytes]) -> int:
        """How many leading blocks of `hashes` the stages should hold."""
        n = 0
        while n < len(hashes) and hashes[n] in self._held:
            n += 1
        for h in reversed(hashes[:n]):  # as the stages do: a chain ages from its end
            self._held.move_to_end(h)
        return n

    def add(self, hashes: list[bytes]) -> None:
        for h in reversed(hashes):
            self._held[h] = None
            self._held.move_to_end(h)
        while len(self._held) > self.capacity_blocks:
            self._held.popitem(last=False)

    def forget(self, hashes: list[bytes]) -> None:
        self.misses += 1
        for h in hashes:
            self._held.pop(h, None)


def start_past_prefix(stream: Stream, prefixes: PrefixIndex) -> None:
    """A new session: hash its full blocks, and start it past the longest prefix the stages keep."""
    stream.prefix_hashes = chain_hashes(stream.pending, prefixes.block_tokens, stream.tenant)
    skip = reusable_tokens(len(stream.pending), prefixes.match(stream.prefix_hashes), prefixes.block_tokens)
    if skip:
        prefixes.hits += 1
        stream.prefix_tokens = stream.position = skip
        del stream.pending[:skip]


def blocks_to_name(stream: Stream, n: int, prefixes: PrefixIndex | None) -> list[bytes]:
    """The block hashes a slice names to the stages: when its session completes blocks by the slice's end
    (to keep), or starts from the prefix store (its first slice; `prefix_tokens` says how far)."""
    hashes = stream.prefix_hashes
    if not hashes or prefixes is None:
        return []
    bt = prefixes.block_tokens
    full = min(len(hashes), max((stream.position + n) // bt, -(-stream.prefix_tokens // bt)))
    if not stream.prefix_tokens and full <= stream.position // bt:
        return []
    return hashes[:full]
