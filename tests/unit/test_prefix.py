"""The prefix cache's pure parts: chain hashes and the coordinator's index, and a stage's prefix store inside
its KV pool (eviction order, pinning, sessions first)."""

from __future__ import annotations

import pytest
import torch

from coordinator.serving.prefix import PrefixIndex, chain_hashes, reusable_tokens
from shard_worker.kv_cache import KVLayout, KVPool, SessionCache
from shard_worker.prefix_cache import PrefixStore
from shardline.errors import InvalidArgument, NotFound, ResourceExhausted

BT = 4


def test_a_block_hash_names_its_whole_prefix():
    a = chain_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BT)
    assert len(a) == 2  # full blocks only
    b = chain_hashes([9, 2, 3, 4, 5, 6, 7, 8], BT)
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different first: a different prefix
    c = chain_hashes([1, 2, 3, 4, 5, 6, 7, 0], BT)
    assert c[0] == a[0] and c[1] != a[1]  # the same first block, a different second one


def test_the_last_prompt_token_is_always_computed():
    assert reusable_tokens(9, 2, BT) == 8
    assert reusable_tokens(8, 2, BT) == 7  # the whole prompt is cached: its last token still runs
    assert reusable_tokens(1, 0, BT) == 0


def test_the_index_is_bounded_and_forgets_what_a_stage_lacked():
    index = PrefixIndex(BT, capacity_blocks=4)
    a, b = chain_hashes(list(range(12)), BT), chain_hashes(list(range(50, 62)), BT)
    index.add(a)
    assert index.match(a + b) == 3
    index.add(b[:2])  # the oldest of `a` goes: its last block (a chain ages from its end)
    assert len(index) == 4 and index.match(a) == 2
    index.forget(a[:1])
    assert index.match(a) == 0 and index.misses == 1


def session(pool: KVPool, positions: int, seed: int) -> SessionCache:
    cache = SessionCache(pool)
    cache.reserve(positions)
    g = torch.Generator().manual_seed(seed)
    for t in (*cache.keys, *cache.values):
        t.copy_(torch.randn(t.shape, generator=g))
    cache.length = positions
    return cache


def test_a_new_session_copies_the_prefix_and_sessions_evict_it_when_short():
    pool = KVPool(KVLayout(layers=2, kv_heads=2, head_dim=3, dtype=torch.float32, block_tokens=BT), 10)
    store = PrefixStore(pool)
    hashes = chain_hashes(list(range(12)), BT)
    source = session(pool, 12, seed=1)
    keys, values = [k[:, :10].clone() for k in source.keys], [v[:, :10].clone() for v in source.values]
    store.save(source, hashes, upto=12)
    assert len(store.blocks) == 3 and pool.cached == 3 and pool.blocks_used == 3
    source.release()
    copy = SessionCache(pool)
    store.start("sequences[0]", copy, hashes, tokens=10, positions=12)
    assert copy.length == 10 and pool.blocks_used == 3
    for layer in range(2):
        assert torch.equal(copy.keys[layer][:, :10], keys[layer])
        assert torch.equal(copy.values[layer][:, :10], values[layer])
    with pytest.raises(InvalidArgument, match="prefix_blocks names 1"):
        store.start("sequences[0]", SessionCache(pool), hashes[:1], tokens=8, positions=9)
    # a session that needs every block evicts the prefixes, deepest first, and is never refused for them
    big = SessionCache(pool)
    big.reserve(6 * BT)  # 3 used + 3 cached + 6 > 10
    assert pool.blocks_used == 9 and len(store.blocks) == 1 and hashes[0] in store.blocks and store.evictions == 2
    with pytest.raises(NotFound, match=r"prefix_blocks\[1\] is not held"):
        store.start("sequences[0]", SessionCache(pool), hashes, tokens=8, positions=9)
    with pytest.raises(ResourceExhausted):
        SessionCache(pool).reserve(3 * BT)


def test_a_prefix_whose_blocks_the_session_needs_is_given_up_not_refused():
    pool = KVPool(KVLayout(layers=1, kv_heads=1, head_dim=2, dtype=torch.float32, block_tokens=BT), 4)
    store = PrefixStore(pool)
    hashes = chain_hashes(list(range(8)), BT)
    source = session(pool, 8, seed=2)
    store.save(source, hashes, upto=8)
    source.release()
    # 4 blocks in all, 2 cached: a session of 4 blocks needs the prefix's own blocks
    with pytest.raises(NotFound, match="evicted to make room"):
        store.start("sequences[0]", SessionCache(pool), hashes, tokens=8, positions=16)
    assert pool.blocks_used == 0 and pool.cached == 0


def test_saving_a_chain_never_evicts_its_own_earlier_blocks():
    pool = KVPool(KVLayout(layers=1, kv_heads=1, head_dim=2, dtype=torch.float32, block_tokens=BT), 5)
    store = PrefixStore(pool)
    hashes = chain_hashes(list(range(3 * BT)), BT)
    source = session(pool, 3 * BT, seed=3)  # 3 blocks used, 2 free: room for the chain's first two only
    store.save(source, hashes, upto=3 * BT)
    assert list(store.blocks) and set(store.blocks) == set(hashes[:2]) and store.evictions == 0
    source.release()
    copy = SessionCache(pool)
    store.start("sequences[0]", copy, hashes, tokens=2 * BT, positions=2 * BT + 1)  # the stored prefix is usable
    assert copy.length == 2 * BT and all(b.refs == 0 for b in store.blocks.values())
