"""A stage: the modules of a contiguous layer range, run over a packed batch of sequences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shard_worker.families import Family, StageModules
from shard_worker.kv_cache import BatchCache, KVLayout, KVPool, SessionCache
from shard_worker.quantize import check_supported, quantize_int8


@dataclass(frozen=True)
class Packing:
    """How a packed batch ([T, ...] rows, sequence after sequence) maps onto a padded [B, N, ...] one."""

    starts: list[int]
    counts: list[int]

    @property
    def width(self) -> int:
        return max(self.counts)

    def rows(self) -> torch.Tensor:
        """Row of each packed token in the flattened padded batch."""
        width = self.width
        return torch.cat([torch.arange(n) + b * width for b, n in enumerate(self.counts)])

    def positions(self) -> torch.Tensor:
        """[B, N] positions; pad slots repeat their sequence's last position (valid for learned tables)."""
        j = torch.arange(self.width)
        return torch.stack([s + torch.clamp(j, max=n - 1) for s, n in zip(self.starts, self.counts, strict=True)])

    def padding_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [B, 1, 1, N] for encoders: every token sees its own sequence's tokens."""
        valid = torch.arange(self.width)[None, :] < torch.tensor(self.counts)[:, None]
        return torch.zeros(valid.shape, dtype=dtype).masked_fill_(~valid, torch.finfo(dtype).min)[:, None, None]

    def pad(self, packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if len(self.counts) == 1:
            return packed[None]
        padded = packed.new_zeros((len(self.counts) * self.width, *packed.shape[1:]))
        padded[rows] = packed
        return padded.view(len(self.counts), self.width, *packed.shape[1:])

    def unpad(self, padded: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if len(self.counts) == 1:
            return padded[0]
        return padded.reshape(-1, *padded.shape[2:])[rows]


class Stage:
    """Layers [start, end) of one model; embeds at the first stage, norms (and owns the head) at the last."""

    def __init__(self, family: Family, config: Any, modules: StageModules, start: int, end: int,
                 dtype: torch.dtype, device: torch.device | None = None) -> None:
        self.family, self.config, self.modules = family, config, modules.eval()
        self.start, self.end, self.dtype = start, end, dtype
        self.device = device or torch.device("cpu")
        self.is_first = start == 0
        self.is_last = end == family.num_layers(config)
        self.hidden_size = int(config.hidden_size)
        self.vocab_size = int(config.vocab_size)
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0))
        self.kv_heads, self.head_dim = family.kv_shape(config)
        self.causal = family.causal

    def release(self) -> None:
        """Drop the weights (the stage is being unloaded): every parameter and buffer moves to the meta
        device, so their memory goes with the last reference to the tensors, not to the stage."""
        self.modules.to_empty(device="meta")
        if self.device.type == "cuda":  # the freed blocks go back to the device, not to this process's cache
            torch.cuda.empty_cache()

    def kv_layout(self, block_tokens: int) -> KVLayout:
        return KVLayout(self.end - self.start, self.kv_heads, self.head_dim, self.dtype, block_tokens, self.device)

    def new_session(self, pool: KVPool) -> SessionCache:
        return SessionCache(pool)

    @torch.inference_mode()
    def forward(self, sessions: list[SessionCache], packing: Packing, token_ids: torch.Tensor | None,
                hidden: torch.Tensor | None) -> torch.Tensor:
        """Run the packed batch through this stage's layers; returns packed [T, hidden] (normed at the last
        stage). Each session's cache is written at [start, start + count) and its length set after.

        Sequences with the same token count run as one padded batch, so a prefill chunk never pads the
        one-token decode steps batched beside it."""
        counts = packing.counts
        if len(set(counts)) == 1 or not self.causal:  # encoders: one padded batch, nothing cached
            return self._forward_uniform(sessions, packing, token_ids, hidden)
        offsets = [0]
        for n in counts:
            offsets.append(offsets[-1] + n)
        source = token_ids if self.is_first else hidden
        if source is None:
            raise ValueError("the first stage needs token ids, the others hidden states")
        out: torch.Tensor | None = None
        for count in sorted(set(counts)):
            members = [i for i, n in enumerate(counts) if n == count]
            rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in members]).to(source.device)
            part = source[rows]
            result = self._forward_uniform([sessions[i] for i in members],
                                           Packing([packing.starts[i] for i in members], [count] * len(members)),
                                           part if self.is_first else None, None if self.is_first else part)
            if out is None:
                out = result.new_empty((offsets[-1], *result.shape[1:]))
            out[rows] = result
        if out is None:
            raise ValueError("empty batch")
        return out

    def _forward_uniform(self, sessions: list[SessionCache], packing: Packing, token_ids: torch.Tensor | None,
                         hidden: torch.Tensor | None) -> torch.Tensor:
        rows = packing.rows().to(self.device)
        positions = packing.positions().to(self.device)
        if self.is_first:
            if token_ids is None:
                raise ValueError("the first stage needs token ids")
            x = self.family.embed(self.modules, packing.pad(token_ids, rows), positions)
        else:
            if hidden is None:
                raise ValueError("this stage needs hidden states")
            x = packing.pad(hidden, rows)
        x = x.to(self.dtype)
        rope = self.family.rope(self.modules, x, positions)
        if self.causal:  # the "shardline" attention reads each session's cache in place: no mask to build
            cache = BatchCache(sessions, packing.starts, packing.counts[0], self.start)
            with cache.activate():
                for layer in self.modules.layers.values():
                    x = self.family.run_layer(layer, x, positions, None, cache, rope)
        else:
            mask = packing.padding_mask(self.dtype).to(self.device)
            for layer in self.modules.layers.values():
                x = self.family.run_layer(layer, x, positions, mask, None, rope)
        if self.is_last and self.modules.norm is not None:
            x = self.modules.norm(x)
        for session, start, count in zip(sessions, packing.starts, packing.counts, strict=True):
            session.length = start + count
        return packing.unpad(x, rows)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.modules.head is None:
            raise ValueError("this stage has no LM head")
        return self.modules.head(hidden).float()  # type: ignore[no-any-return]


def build_stage(family: Family, config: Any, start: int, end: int, tensors: dict[str, torch.Tensor],
                dtype: torch.dtype, quantize: str = "", device: torch.device | None = None) -> Stage:
    """A stage for [start, end) built on the meta device and filled with `tensors` (checkpoint names), which
    are on `device` already (shard_worker/weights.py moves each as it arrives; others are moved here);
    `quantize` "int8": the decoder layers' linear weights become int8 (shard_worker/quantize.py)."""
    device = device or torch.device("cpu")
    modules = family.build(config, start, end)
    family.load(config, modules, {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()})
    if quantize:
        check_supported(quantize, family.name, family.quantizations)
        for layer in modules.layers.values():
            quantize_int8(layer, dtype)
    if modules.rotary is not None:  # computed on the host at build: moved, kept in float32
        modules.rotary.to(device=device, dtype=torch.float32)
    return Stage(family, config, modules, start, end, dtype, device)
