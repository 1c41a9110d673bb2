"""KV memory of a stage: a budget of fixed-size blocks, each session's keys and values in whole blocks, and
the attention that reads them in place.

Accounting is exact: a session holds `blocks` blocks from the stage's pool and its buffers are exactly that
large (`blocks * block_tokens` positions per layer), so the bytes a stage reports are the bytes it holds.
Growth takes whole blocks when a step needs them, never by doubling; a step that needs blocks the pool does
not have fails for that sequence only (RESOURCE_EXHAUSTED), before anything is computed.

Attention runs per sequence on views of its own buffers (`attend`), so a decode step never copies any
session's past into a padded batch tensor. It is registered with `transformers` as the attention
implementation "shardline" and finds the batch's caches through `BatchCache.activate`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from shard_worker.device import compute_threads
from shard_worker.transformers_adapter import register_attention
from shardline.errors import ResourceExhausted

ATTENTION = "shardline"


@dataclass(frozen=True)
class KVLayout:
    """The shape of one stage's KV memory."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_tokens: int
    device: torch.device = torch.device("cpu")

    @property
    def token_bytes(self) -> int:
        """Keys and values of one position in every layer of the stage."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def block_bytes(self) -> int:
        return self.block_tokens * self.token_bytes

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_tokens)


class KVPool:
    """The stage's budget of blocks. Only the compute thread takes and gives; status reads the counters."""

    def __init__(self, layout: KVLayout, blocks_total: int) -> None:
        self.layout, self.blocks_total = layout, max(0, blocks_total)
        self.blocks_used = 0  # held by sessions
        self.cached = 0  # held by the prefix store (shard_worker/prefix_cache.py): reclaimable, never refused
        self.reclaim: Callable[[int], int] | None = None  # frees up to n cached blocks, returns how many

    @property
    def blocks_free(self) -> int:
        return self.blocks_total - self.blocks_used - self.cached

    @property
    def bytes_used(self) -> int:
        return self.blocks_used * self.layout.block_bytes

    def take(self, n: int, positions: int) -> None:
        if n > self.blocks_free and self.reclaim is not None:  # sessions come before cached prefixes
            self.reclaim(n - self.blocks_free)
        if n > self.blocks_free:
            raise ResourceExhausted(
                f"KV memory is full on this stage: {positions} positions need {n} more blocks of "
                f"{self.layout.block_tokens} positions, {self.blocks_free} of {self.blocks_total} are free")
        self.blocks_used += n

    def give(self, n: int) -> None:
        self.blocks_used -= n


class SessionCache:
    """One session's keys and values on this stage: per local layer a [kv_heads, blocks * block_tokens,
    head_dim] buffer. `length` counts the committed positions."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.length = 0
        self.blocks = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def nbytes(self) -> int:
        return self.blocks * self.pool.layout.block_bytes

    def reserve(self, positions: int) -> None:
        """Hold room for positions [0, positions): take the blocks missing from the pool (or raise
        ResourceExhausted, changing nothing) and move the committed positions into the larger buffers."""
        layout = self.pool.layout
        blocks = layout.blocks_for(positions)
        if blocks <= self.blocks:
            return
        self.pool.take(blocks - self.blocks, positions)
        shape = (layout.kv_heads, blocks * layout.block_tokens, layout.head_dim)
        try:
            # layer by layer, each old buffer dropped as soon as it is copied: the transient is one layer
            for layer in range(layout.layers):
                k = torch.empty(shape, dtype=layout.dtype, device=layout.device)
                v = torch.empty(shape, dtype=layout.dtype, device=layout.device)
                if layer < len(self.keys):
                    k[:, : self.length] = self.keys[layer][:, : self.length]
                    v[:, : self.length] = self.values[layer][:, : self.length]
                    self.keys[layer], self.values[layer] = k, v
                else:
                    self.keys.append(k)
                    self.values.append(v)
        except BaseException:
            self.pool.give(blocks - self.blocks)  # nothing counted that was not allocated
            raise
        self.blocks = blocks

    def release(self) -> None:
        self.pool.give(self.blocks)
        self.blocks, self.keys, self.values = 0, [], []

    def write(self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store [kv_heads, n, head_dim] at positions [start, start + n) (reserved beforehand)."""
        end = start + key.shape[1]
        self.keys[layer][:, start:end] = key
        self.values[layer][:, start:end] = value


class BatchCache:
    """Duck-typed `transformers` Cache for one forward over a batch of sessions with the same token count.

    Layers call `update(key, value, layer_idx)` with the new keys of every sequence ([B, heads, N, dim]);
    each sequence's rows go into its own session cache. The attention ("shardline") then reads each
    sequence's whole past from its buffers in place.
    """

    _active = threading.local()

    def __init__(self, sessions: list[SessionCache], starts: list[int], count: int, first_layer: int):
        self.sessions, self.starts, self.count = sessions, starts, count
        self.first_layer = first_layer

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        previous = getattr(BatchCache._active, "cache", None)
        BatchCache._active.cache = self
        try:
            yield
        finally:
            BatchCache._active.cache = previous

    @staticmethod
    def active() -> BatchCache | None:
        return getattr(BatchCache._active, "cache", None)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The `cache-update` contract point (shard_worker/transformers_adapter.py): extra arguments, which
        vary by transformers release (`cache_kwargs`, `kwargs=`), carry nothing this cache needs."""
        layer = layer_idx - self.first_layer
        for b, (session, start) in enumerate(zip(self.sessions, self.starts, strict=True)):
            session.write(layer, start, key[b], value[b])
        return key, value

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """query [B, heads, N, dim] -> [B, N, heads, dim]: each sequence against its own past."""
        layer = layer_idx - self.first_layer
        batch, heads, n, dim = query.shape
        out = query.new_empty(batch, n, heads, dim)
        with _one_thread(query.device.type == "cpu" and n == 1):
            self._attend(layer, query, scaling, out)
        return out

    def _attend(self, layer: int, query: torch.Tensor, scaling: float | None, out: torch.Tensor) -> None:
        heads, n = query.shape[1], query.shape[2]
        for b, (session, start) in enumerate(zip(self.sessions, self.starts, strict=True)):
            end = start + n
            keys, values = session.keys[layer][None, :, :end], session.values[layer][None, :, :end]
            gqa = keys.shape[1] != heads
            if n == 1:
                o = F.scaled_dot_product_attention(query[b: b + 1], keys, values, scale=scaling, enable_gqa=gqa)
            elif start == 0:
                o = F.scaled_dot_product_attention(query[b: b + 1], keys, values, is_causal=True, scale=scaling,
                                                   enable_gqa=gqa)
            else:  # a later chunk of a prompt: query j sees positions 0 .. start + j
                at = query.device
                allowed = torch.arange(end, device=at)[None, :] <= (start + torch.arange(n, device=at))[:, None]
                o = F.scaled_dot_product_attention(query[b: b + 1], keys, values, attn_mask=allowed, scale=scaling,
                                                   enable_gqa=gqa)
            out[b] = o[0].transpose(0, 1)


@contextlib.contextmanager
def _one_thread(on: bool) -> Iterator[None]:
    """A decode step's per-sequence attention on the calling thread alone: each call is a few microseconds of
    work, and handing it to torch's other threads (one wake-up per call, 16 sequences x 30 layers a step) costs
    more than it saves, most of all where idle threads sleep (OMP_WAIT_POLICY=PASSIVE, as workers run)."""
    threads = compute_threads()  # the worker's intended count, not torch's global one (another thread's window)
    if not on or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
           **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The "shardline" attention implementation: a causal stage's layers read the active batch's caches."""
    cache = BatchCache.active()
    if cache is None:
        raise RuntimeError("shardline attention runs only inside BatchCache.activate()")
    return cache.attend(int(module.layer_idx), query, scaling), None  # type: ignore[arg-type]


register_attention(ATTENTION, attend)
