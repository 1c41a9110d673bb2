"""One decode step's attention over sessions of different lengths, per layer: the padded batch the first
tranche built (every session's whole past copied into a [B, heads, L, dim] tensor, one SDPA call with a
mask) against reading each session's cache in place (`BatchCache.attend`, one SDPA call per session), in
the same run, with SmolLM2's shapes (9 query heads, 3 KV heads, head dim 64, float32).

    python bench/attention.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from shard_worker.kv_cache import BatchCache, KVLayout, KVPool  # noqa: E402

HEADS, KV_HEADS, DIM = 9, 3, 64
REPEAT = 20


def sessions(batch: int, context: int) -> tuple[list, list[int]]:
    pool = KVPool(KVLayout(1, KV_HEADS, DIM, torch.float32, 16), 1 << 30)
    from shard_worker.kv_cache import SessionCache

    out, starts = [], []
    for b in range(batch):
        length = context - (b * 7) % max(1, context // 4)  # lengths differ, as in a real batch
        s = SessionCache(pool)
        s.reserve(length + 1)
        s.keys[0][:, :length] = torch.randn(KV_HEADS, length, DIM)
        s.values[0][:, :length] = torch.randn(KV_HEADS, length, DIM)
        s.length = length
        out.append(s)
        starts.append(length)
    return out, starts


def padded(caches: list, starts: list[int], query: torch.Tensor) -> torch.Tensor:
    """The first tranche's way: copy every past into one padded tensor, mask the pad, one call."""
    batch = len(caches)
    total = max(starts) + 1
    keys = query.new_zeros(batch, KV_HEADS, total, DIM)
    values = query.new_zeros(batch, KV_HEADS, total, DIM)
    for b, (c, start) in enumerate(zip(caches, starts, strict=True)):
        keys[b, :, : start + 1] = c.keys[0][:, : start + 1]
        values[b, :, : start + 1] = c.values[0][:, : start + 1]
    allowed = torch.arange(total)[None, :] <= torch.tensor(starts)[:, None]
    mask = torch.zeros(batch, 1, 1, total).masked_fill_(~allowed[:, None, None, :], float("-inf"))
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True).transpose(1, 2)


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    fn()
    runs = []
    for _ in range(REPEAT):
        began = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - began)
    return statistics.median(runs)


def main() -> None:
    print("| sessions x context | padded copy (first tranche) | in place (now) | ratio |")
    print("|---|---:|---:|---:|")
    for batch, context in ((16, 128), (64, 128), (16, 1500), (64, 1500), (16, 4000)):
        caches, starts = sessions(batch, context)
        query = torch.randn(batch, HEADS, 1, DIM)
        cache = BatchCache(caches, starts, 1, 0)
        for c, start in zip(caches, starts, strict=True):
            c.write(0, start, torch.randn(KV_HEADS, 1, DIM), torch.randn(KV_HEADS, 1, DIM))
        a = padded(caches, starts, query)
        b = cache.attend(0, query, None)
        if not torch.allclose(a, b, atol=1e-4):
            raise AssertionError("the two attentions differ")
        t_pad = timed(lambda: padded(caches, starts, query))  # noqa: B023
        t_now = timed(lambda: cache.attend(0, query, None))  # noqa: B023
        print(f"| {batch} x {context} | {t_pad * 1e3:.2f} ms | {t_now * 1e3:.2f} ms | {t_now / t_pad:.2f}x the time |")


if __name__ == "__main__":
    main()
